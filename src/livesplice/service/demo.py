"""The service demo: publish a fix, upgrade, restart the service -- still patched.

Run ``./demo.sh --service`` (or ``python -m livesplice.service.demo``), as root. Everything
lives in a temporary directory (its own store, trust directory and configuration); nothing is
installed:

1. a vendor key and a repository; the kvserver fix is created, signed and published with the
   build-id of the server binary that runs;
2. the server runs and the exploit works; ``livesplice upgrade -y`` patches it (same pid);
3. ``livesplice agent`` starts; the server is restarted -- the agent patches the new process
   before a client reaches it (the exec-to-patched window is printed); the exploit fails;
4. ``livesplice show``; ``livesplice remove --all``: the exploit works again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livesplice.demo import EXAMPLE, exploit, free_port


def main() -> int:
    """``python -m livesplice.service.demo``: the service lifecycle in a throwaway state
    directory (publish a fix, upgrade, restart the service and find it patched, remove)."""
    tmp = Path(tempfile.mkdtemp(prefix="livesplice-service-demo-"))
    env = {
        **os.environ,
        "LIVESPLICE_STATE_DIR": str(tmp / "state"),
        "LIVESPLICE_TRUST_DIR": str(tmp / "trust"),
        "LIVESPLICE_ETC": str(tmp / "etc"),
    }
    procs: list[subprocess.Popen[str]] = []

    def ls(*args: str, show: bool = True) -> str:
        if show:
            print(f"$ livesplice {' '.join(args)}", flush=True)
        r = subprocess.run(
            [sys.executable, "-m", "livesplice", *args], capture_output=True, text=True, env=env
        )
        out = (r.stderr + r.stdout).strip()
        if show and out:
            print("  " + out.replace("\n", "\n  "), flush=True)
        if r.returncode != 0:
            raise SystemExit(f"livesplice {args[0]} failed ({r.returncode})")
        return r.stdout

    def start_server(port: int) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [str(tmp / "run" / "kvserver"), str(port)], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None
        p.stdout.readline()
        procs.append(p)
        return p

    try:
        print("== 1. a vendor publishes the fix in a signed repository")
        shutil.copytree(EXAMPLE, tmp / "src")
        shutil.copytree(EXAMPLE, tmp / "run")
        subprocess.run(["make", "-s", "-C", str(tmp / "run")], check=True)
        ls("keygen", "-o", str(tmp / "vendor.key"))
        ls(
            "create",
            "--patch",
            str(EXAMPLE / "fix.patch"),
            "--id",
            "kvfix",
            "-o",
            str(tmp / "kvfix.update"),
            "--sign",
            str(tmp / "vendor.key"),
            str(tmp / "src"),
        )
        ls("repo", "init", str(tmp / "repo"), "--key", str(tmp / "vendor.key"))
        ls(
            "repo",
            "add",
            str(tmp / "repo"),
            str(tmp / "kvfix.update"),
            "--key",
            str(tmp / "vendor.key"),
            "--cve",
            "CVE-2026-0001",
            "--binary",
            str(tmp / "run" / "kvserver"),
        )
        (tmp / "trust").mkdir()
        for pub in (tmp / "repo" / "keys").glob("*.pub"):
            shutil.copy(pub, tmp / "trust")
        (tmp / "etc").mkdir()
        (tmp / "etc" / "livesplice.conf").write_text(f"[livesplice]\nrepo = {tmp / 'repo'}\n")

        print("\n== 2. the machine runs the server; upgrade patches it in place")
        port = free_port()
        server = start_server(port)
        print(f"server pid {server.pid}; exploit: {exploit(port)}")
        ls("upgrade", "-y")
        print(f"server pid {server.pid}; exploit: {exploit(port)}")

        print("\n== 3. the service restarts; the agent patches the new process")
        agent = subprocess.Popen(
            [sys.executable, "-m", "livesplice", "agent", "--json"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(agent)
        assert agent.stdout is not None
        while json.loads(agent.stdout.readline()).get("event") != "ready":
            pass
        server.send_signal(signal.SIGTERM)
        server.wait()
        server = start_server(port)
        while True:
            ev = json.loads(agent.stdout.readline())
            if ev.get("event") == "exec" and ev.get("pid") == server.pid:
                break
        print(
            f"restarted server pid {server.pid}: agent says {ev['status']} {ev['id']}, "
            f"{ev.get('exec_to_patched_ms')} ms after exec"
        )
        time.sleep(0.05)
        print(f"server pid {server.pid}; exploit: {exploit(port)}")
        ls("show")

        print("\n== 4. remove: the old code runs again")
        ls("remove", "--all")
        print(f"server pid {server.pid}; exploit: {exploit(port)}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
