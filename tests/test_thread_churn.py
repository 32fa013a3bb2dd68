"""Threads created and exiting all through apply/undo: kvserver (a thread per connection)
under clients that connect, PING and close in a loop. Every request must succeed, the server
must survive, the tool must never hang.

``LIVESPLICE_CHURN_CYCLES=N`` runs N apply/undo cycles (default 10; the issue's soak is 200,
see benchmarks/).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from livetest import create

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvserver"
CYCLES = int(os.environ.get("LIVESPLICE_CHURN_CYCLES", "10"))


class Clients:
    """N threads, each: connect, PING, expect PONG, close -- as fast as they can."""

    def __init__(self, port: int, n: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.worst = 0.0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"PING\n")
                    got = s.recv(64)
                if got != b"PONG\n":
                    self.failed.append(repr(got))
                else:
                    self.ok += 1
            except OSError as e:
                self.failed.append(str(e))
            self.worst = max(self.worst, time.perf_counter() - t0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


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
    clients = Clients(port)
    try:
        time.sleep(0.3)
        for _ in range(CYCLES):
            for args in (["apply", str(update), "--allow-unsigned"], ["undo", "churn001"]):
                r = subprocess.run([sys.executable, "-m", "livesplice", *args, "--pid",
                                    str(server.pid)], capture_output=True, text=True,
                                   timeout=60)
                assert r.returncode == 0, (args, r.stdout, r.stderr)
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
