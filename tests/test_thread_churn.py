"""Threads created and exiting all through apply/undo: kvserver (a thread per connection)
under clients that connect, PING and close in a loop. Every request must succeed, the server
must survive, the tool must never hang.

``LIVESPLICE_CHURN_CYCLES=N`` runs N apply/undo cycles (default 10; the issue's soak is 200,
see benchmarks/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from livesplice.eval.workloads import PingClients
from livetest import create

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvserver"
CYCLES = int(os.environ.get("LIVESPLICE_CHURN_CYCLES", "10"))


def test_apply_undo_cycles_under_connection_churn(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    run = tmp_path / "run"
    shutil.copytree(EXAMPLE, run)
    subprocess.run(["make", "-s", "-C", str(run)], check=True)
    update = create(src, EXAMPLE / "fix.patch", "churn001", tmp_path)
    port = 17900 + os.getpid() % 97
    server = subprocess.Popen([str(run / "kvserver"), str(port)], stdout=subprocess.PIPE)
    assert server.stdout is not None
    server.stdout.readline()
    clients = PingClients(port)
    try:
        time.sleep(0.3)
        for _ in range(CYCLES):
            for args in (["apply", str(update), "--allow-unsigned"], ["undo", "churn001"]):
                r = subprocess.run(
                    [sys.executable, "-m", "livesplice", *args, "--pid", str(server.pid)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert r.returncode == 0, (args, r.stdout, r.stderr)
                # nothing leaks onto the user's terminal: no traceback, no CPython
                # "Signal 17 ignored due to race condition" from a SIGCHLD handler swap
                assert "Traceback" not in r.stderr and "OSError" not in r.stderr, r.stderr
                assert server.poll() is None, "the server died"
        time.sleep(0.2)
    finally:
        clients.close()
        alive = server.poll() is None
        server.kill()
        server.wait()
    assert alive
    assert clients.ok > 100, clients.ok
    assert not clients.failed, clients.failed[:5]
    print(f"{CYCLES} cycles, {clients.ok} requests, worst {clients.worst * 1e3:.1f} ms")
