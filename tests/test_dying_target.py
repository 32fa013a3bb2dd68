"""A target killed while livesplice works on it: the tool returns promptly with TARGET_GONE
(or success, when it finished first), and the dead process is reaped by its own parent --
a supervisor always sees the exit; a job-stopped target is refused and left stopped.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from livetest import Running, create, livesplice
from test_apply import BASIC, BASIC_FIX, setup_prog

ROUNDS = int(os.environ.get("LIVESPLICE_DYING_ROUNDS", "8"))


def tool(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "livesplice", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_during(tmp_path: Path, update: Path, verb: str, rng: random.Random) -> None:
    prog = subprocess.Popen([str(tmp_path / "run" / "prog")], stdout=subprocess.PIPE, text=True)
    assert prog.stdout is not None
    prog.stdout.readline()
    if verb == "undo":
        livesplice("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
        args = ("undo", "dying001", "--pid", str(prog.pid))
    else:
        args = ("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
    t = tool(*args)
    # Python start-up takes ~0.25 s here: spread the kill over start-up and the work
    time.sleep(rng.uniform(0.15, 0.45))
    prog.kill()
    killed = time.monotonic()
    out, err = t.communicate(timeout=30)
    took = time.monotonic() - killed
    assert "Traceback" not in err, err
    assert t.returncode in (0, 7), (verb, t.returncode, out, err)
    # within 1 s of the kill -- unless the tool only reached its first look at the target
    # after it (the zombie found before anything was traced): on a loaded machine Python's
    # start-up alone took 1.1 s (CI), which no target holds
    assert took < 1.0 or t.returncode == 0 or "has exited (a zombie" in err, (verb, took, err)
    # the parent (this test) reaps it: nothing keeps the threads in a ptrace-stop
    assert prog.wait(timeout=2) == -signal.SIGKILL


def test_target_killed_at_random_points_of_apply_and_undo(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "dying001", tmp_path)
    rng = random.Random(8)
    for _ in range(ROUNDS):
        kill_during(tmp_path, update, "apply", rng)
        kill_during(tmp_path, update, "undo", rng)


def test_job_stopped_target_is_refused_and_left_stopped(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "stopd001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        os.kill(prog.pid, signal.SIGSTOP)
        time.sleep(0.1)
        r = livesplice(
            "apply", str(update), "--pid", str(prog.pid), "--allow-unsigned", check=False
        )
        assert r.returncode == 2 and "TARGET_STOPPED" in r.stderr, r.stderr
        assert "kill -CONT" in r.stderr
        state = Path(f"/proc/{prog.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "T", state  # still stopped, as it was
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
        os.kill(prog.pid, signal.SIGCONT)
        prog.drain()
        prog.wait_for("value 1")
        livesplice("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
        prog.drain()
        prog.wait_for("value 2")
    finally:
        prog.stop()
