"""The figures apply reports are what the target felt.

``pause_us`` is the final stop window only; ``stopped_us`` is the longest time the target's
threads were held stopped at once during the whole apply (remote mmap calls, hooks, the
window, detaching). A sampler watching the target's thread states from outside must never
see a longer stop than ``stopped_us`` says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from livetest import Running, create, livesplice
from test_apply import BASIC, BASIC_FIX, setup_prog


def longest_traced_stop(pid: int, done: threading.Event, out: list[float]) -> None:
    """Sample the leader's state; the longest run of 't' (ptrace-stopped) or 'T' (job
    control, used to show the sampler works), in µs."""
    path = f"/proc/{pid}/stat"
    began = 0.0
    longest = 0.0
    while not done.is_set():
        try:
            with open(path, "rb") as f:
                stat = f.read()
        except OSError:
            break
        now = time.perf_counter()
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        if state in (b"t", b"T"):
            began = began or now
        elif began:
            longest = max(longest, (now - began) * 1e6)
            began = 0.0
    out.append(longest)


def test_stopped_time_covers_every_stop_the_target_felt(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "truth001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        # the sampler sees a 30 ms job-control stop: it can see stops
        done, seen = threading.Event(), []
        sampler = threading.Thread(target=longest_traced_stop, args=(prog.pid, done, seen))
        sampler.start()
        time.sleep(0.05)
        os.kill(prog.pid, signal.SIGSTOP)
        time.sleep(0.03)
        os.kill(prog.pid, signal.SIGCONT)
        time.sleep(0.05)
        done.set()
        sampler.join()
        assert 20_000 < seen[0] < 500_000, seen
        for verb in ("apply", "undo"):
            done, seen = threading.Event(), []
            sampler = threading.Thread(target=longest_traced_stop, args=(prog.pid, done, seen))
            sampler.start()
            args = (
                ["apply", str(update), "--allow-unsigned"]
                if verb == "apply"
                else ["undo", "truth001"]
            )
            r = subprocess.run(
                [sys.executable, "-m", "livesplice", *args, "--pid", str(prog.pid), "--json"],
                capture_output=True,
                text=True,
            )
            done.set()
            sampler.join()
            assert r.returncode == 0, r.stderr
            [rep] = json.loads(r.stdout)["processes"]
            assert rep["stopped_us"] >= rep["pause_us"] * 0.99, rep
            assert rep["threads_stopped_max"] >= 1, rep
            # the sampler sees a stop a little late and a little long (its own scheduling)
            assert seen[0] <= rep["stopped_us"] * 1.2 + 20_000, (verb, seen, rep)
            print(verb, "sampled", round(seen[0]), "reported", rep)
        human = livesplice("apply", str(update), "--allow-unsigned", "--pid", str(prog.pid))
        assert "threads held stopped up to" in human.stdout
    finally:
        prog.stop()
