"""The issue's own case, on real nginx: a src/mail/ fix lands in ngx_mail_module.so.

nginx built ``--with-mail=dynamic`` (as Debian builds it) compiles the mail proxy into a
module that the master loads with ``load_module`` (dlopen) before forking its workers. A fix
in src/mail/ does not change the ``nginx`` executable:

* ``create --target nginx`` must say so and name the module (exit 13 TARGET_UNCHANGED), not
  "nothing to do";
* ``create --target ngx_mail_module.so`` makes the update; ``apply`` to the master and the
  worker of a running nginx makes an overlong SMTP ``HELO`` answer 501 instead of 250, and
  ``undo`` brings back 250.

Slow (two nginx builds, ~3-5 minutes on 2 cores), so it runs only when
``LIVESPLICE_NGINX_TARBALL`` names an nginx source tarball (tested with 1.22.1, Debian's
``nginx_1.22.1.orig.tar.gz`` from ``apt-get source --download-only nginx``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from livetest import livesplice

TARBALL = os.environ.get("LIVESPLICE_NGINX_TARBALL")
pytestmark = pytest.mark.skipif(
    not TARBALL, reason="set LIVESPLICE_NGINX_TARBALL=nginx-X.Y.Z.tar.gz to build real nginx"
)

CONFIGURE = (
    "./configure --with-mail=dynamic --without-http_rewrite_module --without-http_gzip_module"
)
HELO_FILE = "src/mail/ngx_mail_smtp_handler.c"
HELO_OLD = "    if (s->args.nelts != 1) {\n        ngx_str_set(&s->out, smtp_invalid_argument);"
HELO_NEW = (
    "    if (s->args.nelts != 1\n"
    "        || ((ngx_str_t *) s->args.elts)[0].len > 255)\n    {\n"
    "        ngx_str_set(&s->out, smtp_invalid_argument);"
)


def _source(tmp: Path) -> Path:
    assert TARBALL is not None
    with tarfile.open(TARBALL) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(tmp, filter="data")
    return tmp / top


def _helo_patch(tree: Path, out: Path) -> Path:
    """The fix as a -p1 unified diff (an overlong HELO argument is refused with 501)."""
    text = (tree / HELO_FILE).read_text()
    assert HELO_OLD in text, "not the nginx source this test knows"
    a, b = out.parent / "a", out.parent / "b"
    for side, body in ((a, text), (b, text.replace(HELO_OLD, HELO_NEW, 1))):
        (side / HELO_FILE).parent.mkdir(parents=True)
        (side / HELO_FILE).write_text(body)
    r = subprocess.run(
        ["diff", "-u", f"a/{HELO_FILE}", f"b/{HELO_FILE}"],
        cwd=out.parent,
        capture_output=True,
        text=True,
    )
    out.write_text(r.stdout)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _helo(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()  # the greeting
        s.sendall(b"HELO " + b"x" * 300 + b"\r\n")
        return f.readline().decode().strip()


def test_mail_fix_is_reported_and_applied_to_running_nginx(tmp_path: Path) -> None:
    tree = _source(tmp_path / "src")
    patch = _helo_patch(tree, tmp_path / "patch" / "helo.patch")
    build = f"{CONFIGURE} && make -j2"

    r = livesplice(
        "create",
        "-q",
        "--patch",
        str(patch),
        "--build",
        build,
        "--target",
        "nginx",
        "-o",
        str(tmp_path / "nginx.update"),
        str(tree),
        check=False,
        timeout=1800,
    )
    assert r.returncode == 13, r.stderr
    assert "ngx_mail_module.so" in r.stderr and "nothing to do" not in r.stderr, r.stderr
    update = tmp_path / "mail.update"
    livesplice(
        "create",
        "-q",
        "--patch",
        str(patch),
        "--build",
        build,
        "--target",
        "ngx_mail_module.so",
        "--id",
        "ngxmail1",
        "-o",
        str(update),
        str(tree),
        timeout=1800,
    )

    # the deployed nginx: its own build of the same source, the module where nginx keeps them
    deployed = tmp_path / "deployed"
    subprocess.run(["cp", "-a", str(tree), str(deployed)], check=True)
    subprocess.run(
        f"{CONFIGURE} >/dev/null && make -j2 >/dev/null", shell=True, cwd=deployed, check=True
    )
    run = tmp_path / "run"
    for d in ("logs", "conf", "modules"):
        (run / d).mkdir(parents=True)
    (run / "modules/ngx_mail_module.so").write_bytes(
        (deployed / "objs/ngx_mail_module.so").read_bytes()
    )
    port = _free_port()
    (run / "conf/nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\nerror_log {run}/logs/error.log;\n"
        f"pid {run}/logs/nginx.pid;\nload_module {run}/modules/ngx_mail_module.so;\n"
        "events {}\nmail {\n    auth_http 127.0.0.1:9/auth;\n"
        f"    server {{ listen 127.0.0.1:{port}; protocol smtp; smtp_auth none; "
        "server_name test; }\n}\n"
    )
    master = subprocess.Popen(
        [str(deployed / "objs/nginx"), "-p", str(run), "-c", "conf/nginx.conf"]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
            if children or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert children, "nginx started no worker"
        pids = [str(master.pid), *children]
        assert _helo(port).startswith("250 "), "the unpatched module accepts the HELO"
        r = livesplice("apply", str(update), *(a for p in pids for a in ("--pid", p)))
        assert f"{run}/modules/ngx_mail_module.so" in r.stdout, r.stdout
        assert _helo(port).startswith("501 "), "the patched module refuses it"
        livesplice("undo", "ngxmail1", *(a for p in pids for a in ("--pid", p)))
        assert _helo(port).startswith("250 ")
    finally:
        _stop(master)


def _stop(master: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the master stops its workers first (SIGKILL would orphan them)."""
    try:
        workers = [
            int(p)
            for p in Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        ]
    except OSError:
        workers = []
    master.terminate()
    try:
        master.wait(timeout=10)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait()
    for pid in workers:  # gone already, unless the master could not stop them
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == master.args[0]:  # not a recycled pid
                os.kill(pid, signal.SIGKILL)
