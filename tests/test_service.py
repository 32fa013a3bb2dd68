"""The service (issue 10): a signed repository, upgrade/show/remove/uname, and the agent that
keeps processes started later patched -- with real updates, real processes, a real HTTP
server and the kernel's proc connector.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from livetest import Running, build, create, livesplice, make_patch, write_tree
from test_apply import BASIC, MAKEFILE


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state directory, trust directory and /etc for this test."""
    for name, sub in (
        ("LIVESPLICE_STATE_DIR", "state"),
        ("LIVESPLICE_TRUST_DIR", "trust"),
        ("LIVESPLICE_ETC", "etc"),
    ):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    (tmp_path / "state").chmod(0o700)
    monkeypatch.setenv("LIVESPLICE_CMDLINE", str(tmp_path / "cmdline"))
    (tmp_path / "cmdline").write_text("root=/dev/vda quiet\n")
    return tmp_path


@pytest.fixture
def published(machine: Path) -> tuple[Path, Path]:
    """A repository with two stacked process updates for the running build of BASIC
    (value 1 -> 2 -> 3); returns (repository, running build)."""
    tmp = machine
    livesplice("keygen", "-o", str(tmp / "vendor.key"))
    tree = write_tree(tmp / "src", {"prog.c": BASIC, "Makefile": MAKEFILE})
    p1 = make_patch(
        tree, {"prog.c": [("return x + base;", "return x + base + 1;")]}, tmp / "one.patch"
    )
    u1 = create(tree, p1, "svc-one", tmp, "--sign", str(tmp / "vendor.key"))
    tree2 = write_tree(
        tmp / "src2",
        {"prog.c": BASIC.replace("return x + base;", "return x + base + 1;"), "Makefile": MAKEFILE},
    )
    p2 = make_patch(
        tree2, {"prog.c": [("return x + base + 1;", "return x + base + 2;")]}, tmp / "two.patch"
    )
    u2 = create(tree2, p2, "svc-two", tmp, "--sign", str(tmp / "vendor.key"))
    running = write_tree(tmp / "run", {"prog.c": BASIC, "Makefile": MAKEFILE})
    build(running)
    repo = tmp / "repo"
    livesplice("repo", "init", str(repo), "--key", str(tmp / "vendor.key"))
    livesplice(
        "repo",
        "add",
        str(repo),
        str(u1),
        "--key",
        str(tmp / "vendor.key"),
        "--cve",
        "CVE-2026-1001",
        "--binary",
        str(running / "prog"),
    )
    # the second is stacked on the first; the running binary is the same file
    livesplice(
        "repo",
        "add",
        str(repo),
        str(u2),
        "--key",
        str(tmp / "vendor.key"),
        "--cve",
        "CVE-2026-1002",
        "--requires",
        "svc-one",
        "--binary",
        str(running / "prog"),
    )
    for pub in (repo / "keys").glob("*.pub"):
        shutil.copy(pub, machine / "trust")
    return repo, running


def value(prog: Running, want: int, timeout: float = 10.0) -> None:
    prog.drain()
    prog.wait_for(f"value {want}", timeout=timeout)


def test_upgrade_show_remove_from_a_file_repository(published: tuple[Path, Path]) -> None:
    repo, running = published
    prog = Running([str(running / "prog")])
    try:
        value(prog, 1)
        dry = json.loads(livesplice("upgrade", "--repo", str(repo), "--dry-run", "--json").stdout)
        assert [(p["id"], p["action"], p["pids"]) for p in dry["planned"]] == [
            ("svc-one", "apply", [prog.pid]),
            ("svc-two", "apply", [prog.pid]),
        ]
        value(prog, 1)  # a dry run changes nothing
        # no terminal and no -y: refused, nothing changed
        r = livesplice("upgrade", "--repo", str(repo), check=False)
        assert r.returncode == 2 and "-y" in r.stderr, r.stderr
        rep = json.loads(livesplice("upgrade", "--repo", str(repo), "-y", "--json").stdout)
        assert [(x["id"], x["status"]) for x in rep["results"]] == [
            ("svc-one", "applied"),
            ("svc-two", "applied"),
        ]
        value(prog, 3)
        shown = json.loads(livesplice("show", "--json").stdout)
        assert [(a["id"], a["applied_to"]) for a in shown["accepted"]] == [
            ("svc-one", [prog.pid]),
            ("svc-two", [prog.pid]),
        ]
        text = livesplice("show").stdout
        assert "CVE-2026-1002" in text and str(prog.pid) in text
        again = livesplice("upgrade", "--repo", str(repo), "-y")
        assert "already applied" in again.stdout, again.stdout
        livesplice("remove", "--all")
        value(prog, 1)
        assert json.loads(livesplice("show", "--json").stdout)["accepted"] == []
        assert livesplice("uname", "-r").stdout.strip() == os.uname().release
    finally:
        prog.stop()


def test_a_tampered_or_untrusted_or_replayed_index_is_refused(
    published: tuple[Path, Path], machine: Path
) -> None:
    repo, _ = published
    index = (repo / "index.json").read_bytes()
    sig = (repo / "index.json.sig").read_bytes()
    # one byte changed
    bad = bytearray(index)
    bad[index.index(b'"serial"') + 10] ^= 1
    (repo / "index.json").write_bytes(bytes(bad))
    r = livesplice("upgrade", "--repo", str(repo), "-y", check=False)
    assert r.returncode == 2 and "BAD_SIGNATURE" in r.stderr, r.stderr
    # an update's signature is not an index signature, even by the trusted key
    (repo / "index.json").write_bytes(index)
    upd = (repo / "updates" / "svc-one.update").read_bytes()
    from livesplice.update.archive import open_envelope
    from livesplice.update.signing import sign

    env = open_envelope(upd)
    (repo / "index.json.sig").write_bytes(sign(index, machine / "vendor.key", kind="update"))
    r = livesplice("upgrade", "--repo", str(repo), "-y", check=False)
    assert r.returncode == 2 and "BAD_SIGNATURE" in r.stderr, r.stderr
    assert env.signature is not None
    # not trusted here
    (repo / "index.json.sig").write_bytes(sig)
    for pub in (machine / "trust").iterdir():
        pub.unlink()
    r = livesplice("upgrade", "--repo", str(repo), "-y", check=False)
    assert r.returncode == 2 and "not trusted" in r.stderr, r.stderr
    for pub in (repo / "keys").glob("*.pub"):
        shutil.copy(pub, machine / "trust")
    # replay: the machine saw serial N; an older (validly signed) index is refused
    livesplice("upgrade", "--repo", str(repo), "--dry-run")
    old_index, old_sig = index, sig
    livesplice(
        "repo",
        "add",
        str(repo),
        str(machine / "svc-one.update"),
        "--key",
        str(machine / "vendor.key"),
        "--binary",
        str(machine / "run" / "prog"),
    )
    livesplice("upgrade", "--repo", str(repo), "--dry-run")
    (repo / "index.json").write_bytes(old_index)
    (repo / "index.json.sig").write_bytes(old_sig)
    r = livesplice("upgrade", "--repo", str(repo), "-y", check=False)
    assert r.returncode == 2 and "older than one this machine already saw" in r.stderr, r.stderr
    # an update file that is not the one the index describes
    livesplice(
        "repo",
        "add",
        str(repo),
        str(machine / "svc-one.update"),
        "--key",
        str(machine / "vendor.key"),
        "--binary",
        str(machine / "run" / "prog"),
    )
    f = repo / "updates" / "svc-one.update"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    prog = Running([str(machine / "run" / "prog")])
    try:
        value(prog, 1)
        r = livesplice("upgrade", "--repo", str(repo), "-y", check=False)
        assert r.returncode == 2 and "not the file the signed index describes" in r.stderr
        value(prog, 1)
    finally:
        prog.stop()


def test_upgrade_over_http(published: tuple[Path, Path]) -> None:
    repo, running = published
    port = 18600 + os.getpid() % 300
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(repo),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prog = Running([str(running / "prog")])
    try:
        value(prog, 1)
        url = f"http://127.0.0.1:{port}"
        for _ in range(50):
            r = livesplice("upgrade", "--repo", url, "--dry-run", check=False)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        livesplice("upgrade", "--repo", url, "-y")
        value(prog, 3)
        livesplice("remove", "svc-two")
        value(prog, 2)
        livesplice("remove", "svc-one")
        value(prog, 1)
    finally:
        prog.stop()
        server.kill()
        server.wait()


class Agent:
    """``livesplice agent --json`` running, its events collected by a reader thread."""

    def __init__(self, *extra: str) -> None:
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livesplice", "agent", "--json", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        # until the initial sweep is done (or the agent says it is switched off)
        self.wait(lambda seen: any(e.get("event") in ("ready", "disabled") for e in seen))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))

    def wait(self, done: Any, timeout: float = 30) -> None:
        """Until ``done(events so far)`` (the agent may report an apply a little after the
        program shows the new code: the state record is written after the jumps)."""
        deadline = time.monotonic() + timeout
        while not done(list(self.events)):
            assert time.monotonic() < deadline, self.events
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            time.sleep(0.02)

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.reader.join(10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return list(self.events)


@pytest.mark.parametrize("watcher", ["proc connector", "/proc poller"])
def test_the_agent_patches_restarted_and_new_processes(
    published: tuple[Path, Path], watcher: str
) -> None:
    repo, running = published
    first = Running([str(running / "prog")])
    try:
        value(first, 1)
        livesplice("upgrade", "--repo", str(repo), "-y")
        value(first, 3)
    finally:
        first.stop()  # the service restarts: the new process runs the old code...
    agent = Agent(*(["--poll"] if watcher == "/proc poller" else []))
    assert agent.events[0]["watcher"] == watcher
    progs = []
    try:
        for _ in range(3):  # ... until the agent patches it; also instances started later
            progs.append(Running([str(running / "prog")]))
        for p in progs:
            try:
                value(p, 3)
            except AssertionError as e:
                raise AssertionError(f"pid {p.pid} not patched: {e}; agent: {agent.events}") from e
        want = {(p.pid, uid) for p in progs for uid in ("svc-one", "svc-two")}
        agent.wait(
            lambda seen: (
                want <= {(e.get("pid"), e.get("id")) for e in seen if e.get("status") == "applied"}
            )
        )
    finally:
        for p in progs:
            p.stop()
        events = agent.stop()
    applied = [e for e in events if e.get("event") == "exec" and e.get("status") == "applied"]
    assert sorted((e["pid"], e["id"]) for e in applied) == sorted(
        (p.pid, uid) for p in progs for uid in ("svc-one", "svc-two")
    ), events
    windows = [float(str(e["exec_to_patched_ms"])) for e in applied]
    assert all(0 < w < 5000 for w in windows), windows
    print("exec-to-patched ms:", windows)


def test_kill_switch_and_crash_guard(published: tuple[Path, Path], machine: Path) -> None:
    repo, running = published
    out = livesplice("upgrade", "--repo", str(repo), "-y").stdout  # nothing runs them yet
    assert "no process runs its target now" in out, out
    (machine / "cmdline").write_text("root=/dev/vda livesplice=off\n")
    agent = Agent()
    prog = Running([str(running / "prog")])
    try:
        value(prog, 1)
        time.sleep(0.3)
        value(prog, 1)  # not patched: switched off
    finally:
        prog.stop()
        events = agent.stop()
    assert events[0]["event"] == "disabled" and "livesplice=off" in str(events[0]["why"])
    (machine / "cmdline").write_text("root=/dev/vda\n")
    # an apply of svc-two that never ended (the process crashed during it): held back
    from livesplice.service.store import Store

    Store().begin("svc-two", "4242:99")
    agent = Agent()
    prog = Running([str(running / "prog")])
    try:
        value(prog, 2)  # svc-one applied; svc-two held
        time.sleep(0.3)
        value(prog, 2)
        shown = json.loads(livesplice("show", "--json").stdout)
        assert [bool(a["held"]) for a in shown["accepted"]] == [False, True]
        assert "crashed" in livesplice("show").stdout
    finally:
        prog.stop()
        events = agent.stop()
    assert any(e["event"] == "held" and e["id"] == "svc-two" for e in events), events
    # the operator releases it: applied again
    livesplice("upgrade", "--repo", str(repo), "-y", "--release", "svc-two")
    agent = Agent()
    prog = Running([str(running / "prog")])
    try:
        value(prog, 3)
    finally:
        prog.stop()
        agent.stop()


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = Path(__file__).resolve().parents[1] / "packaging" / "systemd"
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    assert sorted(p.name for p in units.iterdir()) == [
        "livesplice-agent.service",
        "livesplice-boot.service",
        "livesplice-upgrade.service",
        "livesplice-upgrade.timer",
    ]
    for unit in units.iterdir():
        # the units name the installed command; verify them against one that exists here
        (tmp_path / unit.name).write_text(
            unit.read_text().replace("/usr/bin/livesplice", shutil.which("true") or "/bin/true")
        )
    r = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_config_is_strict_and_autoinstall_is_off_by_default(machine: Path) -> None:
    r = livesplice("upgrade", "--auto", "-y", "--repo", "/nonexistent")
    assert "autoinstall is off" in r.stdout
    (machine / "etc" / "livesplice.conf").write_text("[livesplice]\nautoinstal = yes\n")
    r = livesplice("upgrade", "--auto", "-y", check=False)
    assert r.returncode == 2 and "unknown setting 'autoinstal'" in r.stderr, r.stderr
    (machine / "etc" / "livesplice.conf").write_text("[livesplice]\nautoinstall = maybe\n")
    r = livesplice("upgrade", "--auto", "-y", check=False)
    assert r.returncode == 2 and "is not yes/no" in r.stderr, r.stderr


def test_manager_page_in_a_real_browser(published: tuple[Path, Path], machine: Path) -> None:
    """The manager page end to end in headless Chromium: it lists what the repository has,
    "Install all" patches the running program, "Remove" undoes one update; changes need the
    token, the right Host and a JSON body."""
    import urllib.error
    import urllib.request

    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed (scripts/bootstrap.sh does)")
    repo, running = published
    (machine / "etc" / "livesplice.conf").write_text(f"[livesplice]\nrepo = {repo}\n")
    agent = subprocess.Popen(
        [sys.executable, "-m", "livesplice", "agent", "--json", "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert agent.stdout is not None
    event = json.loads(agent.stdout.readline())
    assert event["event"] == "manager", event
    url = event["url"]
    assert json.loads(agent.stdout.readline())["event"] == "started"
    assert json.loads(agent.stdout.readline())["event"] == "ready"
    token = (machine / "state" / "manager-token").read_text().strip()
    prog = Running([str(running / "prog")])

    def post(path: str, body: bytes, headers: dict[str, str]) -> int:
        req = urllib.request.Request(url.rstrip("/") + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    try:
        value(prog, 1)
        js = {"Content-Type": "application/json"}
        assert post("/api/upgrade", b"{}", js) == 403  # no token
        assert post("/api/upgrade", b"{}", {**js, "X-Livesplice-Token": "x" * 43}) == 403
        assert (
            post(
                "/api/upgrade",
                b"id=1",
                {"Content-Type": "application/x-www-form-urlencoded", "X-Livesplice-Token": token},
            )
            == 415
        )
        assert (
            post(
                "/api/upgrade",
                b"{}",
                {**js, "X-Livesplice-Token": token, "Host": "evil.example:80"},
            )
            == 403
        )
        value(prog, 1)  # none of those changed anything
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--no-first-run",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 560})
            page.goto(f"{url}#token={token}")
            page.wait_for_selector("body[data-ready='1']")
            assert "svc-one" in page.inner_text("#available")
            page.click("#upgrade")
            page.wait_for_selector("#message.ok", timeout=60000)
            value(prog, 3)
            page.wait_for_selector("#installed tr[data-id='svc-two']")
            assert f"pid {prog.pid}" in page.inner_text("#installed")
            docs = Path(__file__).resolve().parents[1] / "docs"
            if os.environ.get("LIVESPLICE_SCREENSHOT"):
                page.screenshot(path=str(docs / "manager.png"))
            page.click("#installed tr[data-id='svc-two'] button.remove")
            page.wait_for_selector(
                "#installed tr[data-id='svc-two']", state="detached", timeout=60000
            )
            value(prog, 2)
            browser.close()
    finally:
        prog.stop()
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=10)


def test_service_demo_runs() -> None:
    """./demo.sh --service: the lifecycle end to end (the exploit works, is denied after
    upgrade, still denied after a restart under the agent, works again after remove)."""
    r = subprocess.run(
        [sys.executable, "-m", "livesplice.demo", "--service"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if "exploit:" in line]
    assert [line.split("exploit: ")[1].split()[0] for line in lines] == [
        "SECRET",
        "DENIED",
        "DENIED",
        "SECRET",
    ], r.stdout
    assert "agent says applied kvfix" in r.stdout, r.stdout


def test_channels_and_a_cumulative_update(published: tuple[Path, Path], machine: Path) -> None:
    """svc-two moves to the testing channel: a stable machine gets svc-one only, a testing
    one both; then a cumulative update (built from the original source) supersedes both:
    upgrade takes them out, latest first, and applies it; show lists all three accepted."""
    repo, running = published
    key = str(machine / "vendor.key")
    livesplice(
        "repo",
        "add",
        str(repo),
        str(machine / "svc-two.update"),
        "--key",
        key,
        "--channel",
        "testing",
        "--requires",
        "svc-one",
        "--binary",
        str(running / "prog"),
    )
    tree = machine / "src"
    p3 = make_patch(
        tree, {"prog.c": [("return x + base;", "return x + base + 5;")]}, machine / "three.patch"
    )
    u3 = create(tree, p3, "svc-three", machine, "--sign", key)
    prog = Running([str(running / "prog")])
    try:
        value(prog, 1)
        livesplice("upgrade", "--repo", str(repo), "-y")
        value(prog, 2)  # stable: svc-one only
        livesplice("upgrade", "--repo", str(repo), "-y", "--channel", "testing")
        value(prog, 3)
        livesplice(
            "repo",
            "add",
            str(repo),
            str(u3),
            "--key",
            key,
            "--supersedes",
            "svc-one",
            "--supersedes",
            "svc-two",
            "--binary",
            str(running / "prog"),
        )
        rep = json.loads(
            livesplice(
                "upgrade", "--repo", str(repo), "-y", "--channel", "testing", "--json"
            ).stdout
        )
        assert [(r["id"], r["status"]) for r in rep["results"]] == [
            ("svc-two", "undone"),
            ("svc-one", "undone"),
            ("svc-three", "applied"),
        ], rep
        value(prog, 6)
        shown = json.loads(livesplice("show", "--json").stdout)
        assert {a["id"]: a["applied_to"] for a in shown["accepted"]} == {
            "svc-one": [],
            "svc-two": [],
            "svc-three": [prog.pid],
        }
        livesplice("remove", "--all")
        value(prog, 1)
    finally:
        prog.stop()
