"""The livesplice demo: patch a memory-safety bug in a running server, without a restart.

Run ``./demo.sh`` (or ``python -m livesplice.demo``). The story, as in the Ksplice talk:

1. build and start the bundled multi-threaded server (examples/kvserver) on loopback;
2. open a client connection that stays open for the whole demo;
3. the exploit works: an overlong NAME overwrites the session's admin flag, SECRET leaks;
4. ``livesplice create`` turns fix.patch into a signed update; ``inspect`` shows it;
5. ``livesplice apply`` splices it into the running server: same PID, same connection;
6. the exploit fails; ``view`` shows the update;
7. ``livesplice undo`` removes it; the exploit works again.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvserver"


class Client:
    """A line-oriented client connection to kvserver."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = self.sock.makefile("rb")

    def cmd(self, line: bytes) -> str:
        """Send one command line and return the server's one-line answer."""
        self.sock.sendall(line + b"\n")
        return self.reader.readline().decode(errors="replace").strip()

    def close(self) -> None:
        """Close the connection (kvserver ends the thread that served it)."""
        self.reader.close()
        self.sock.close()


def exploit(port: int) -> str:
    """Overflow session->name into session->admin, then ask for the secret."""
    c = Client(port)
    try:
        c.cmd(b"NAME 20 " + b"A" * 16 + b"\x01\x00\x00\x00")
        return c.cmd(b"SECRET")
    finally:
        c.close()


def free_port() -> int:
    """A TCP port that is free right now, so the demo never collides with a running service."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def say(text: str) -> None:
    """A step heading (bold at a terminal), so the demo's output reads as a story."""
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command the way a person would, showing it and its output: the demo teaches the
    commands."""
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"$ {shown}", flush=True)
    r = subprocess.run(argv, text=True, capture_output=True)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return r


def livesplice(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``livesplice`` and stop the demo at the first failure (its exit code says why)."""
    r = run(["livesplice", *args])
    if r.returncode != 0:
        raise SystemExit(f"demo: livesplice {args[0]} failed with exit code {r.returncode}")
    return r


def main(argv: list[str] | None = None) -> int:
    """``python -m livesplice.demo``: build kvserver, run it, make the fix an update, apply it
    live, show the bug gone and the same process still serving; ``--service``: the repository
    lifecycle instead."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--service",
        action="store_true",
        help="the service lifecycle instead: publish, upgrade, restart, remove",
    )
    args = ap.parse_args(argv)
    if args.service:
        from livesplice.service.demo import main as service_demo

        return service_demo()

    # `livesplice` on PATH: the venv's own, next to this interpreter.
    import os

    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    work = Path(tempfile.mkdtemp(prefix="livesplice-demo-"))
    server: subprocess.Popen[str] | None = None
    t0 = time.monotonic()
    try:
        src = work / "kvserver"  # the source tree the update is made from
        deployed = work / "deployed"  # where the running server was built, as in production
        shutil.copytree(EXAMPLE, src)
        shutil.copytree(EXAMPLE, deployed)
        say("1. build and start the server (an ordinary build: make)")
        if run(["make", "-s", "-C", str(deployed)]).returncode != 0:
            raise SystemExit("demo: building the example failed")
        port = free_port()
        server = subprocess.Popen(
            [str(deployed / "kvserver"), str(port)], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        print(server.stdout.readline().strip())
        pid = server.pid

        say("2. a client connects and stays connected for the whole demo")
        client = Client(port)
        print(f"PING -> {client.cmd(b'PING')}   SET color blue -> {client.cmd(b'SET color blue')}")

        say("3. the exploit: an overlong NAME overwrites the admin flag")
        before = exploit(port)
        print(f"exploit -> {before}")

        say("4. create a signed update from the source patch")
        key = work / "vendor.key"
        livesplice("keygen", "-o", str(key))
        update = work / "kvserver-fix.update"
        livesplice(
            "create",
            "--patch",
            str(src / "fix.patch"),
            "--id",
            "kvfix001",
            "--sign",
            str(key),
            "-o",
            str(update),
            str(src),
        )
        livesplice("inspect", str(update))

        say(f"5. apply it to the running server (pid {pid}): no restart")
        livesplice("apply", str(update), "--pid", str(pid), "--trusted-key", f"{key}.pub")
        print(
            f"same pid still running: {server.poll() is None}, "
            f"open connection: GET color -> {client.cmd(b'GET color')}"
        )

        say("6. the exploit no longer works")
        after = exploit(port)
        print(f"exploit -> {after}")
        livesplice("view", "--pid", str(pid))
        print("the patched process is marked in /proc/PID/maps:")
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/memfd:livesplice" in line:
                    print("   ", line.rstrip())

        say("7. undo it: the original code is back")
        livesplice("undo", "kvfix001", "--pid", str(pid))
        again = exploit(port)
        print(f"exploit -> {again}")
        print(f"open connection still served: PING -> {client.cmd(b'PING')}")
        client.close()

        ok = (
            before.startswith("SECRET")
            and after == "DENIED"
            and again.startswith("SECRET")
            and server.poll() is None
        )
        say(
            f"{'demo OK' if ok else 'demo FAILED'} in {time.monotonic() - t0:.1f} s "
            f"(server pid {pid} never restarted)"
        )
        return 0 if ok else 1
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
