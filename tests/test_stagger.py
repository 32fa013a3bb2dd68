"""A thread the scheduler keeps off the CPU does not hold the others stopped (staggered stop).

A thread stops only once it runs. tests/progs/laggard.c has a thread pinned to CPU 1 idle on
a condition variable; a separate process takes CPU 1 with SCHED_FIFO for 150 ms (above
livesplice's own priority), so the interrupted idle thread cannot reach its stop before
then -- a normal-priority pool thread on a busy machine, deterministic. Its "loop" thread
(CPU 0) records from inside the longest gap between its 100 us naps. Without staggering
the loop thread waits stopped for the laggard (the control below); with it, it runs on
until the laggard has stopped and is then stopped for the window alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.errors import CodeBusy
from livesplice.process.ptrace import ThreadWontStop, Tracee
from livesplice.process.stopwindow import StopWindow

HOG_MS = 150  # within STAGGER_WAIT

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or os.geteuid() != 0,
    reason="needs 2 CPUs and root (SCHED_FIFO, affinity)",
)


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # livesplice on CPU 0, away from the hog
    tg = Target(build("laggard", tmp_path_factory.mktemp("laggard_progs")))
    yield tg
    tg.stop()
    os.sched_setaffinity(0, old)


def hog(tg: Target, ms: int = HOG_MS) -> subprocess.Popen[str]:
    """Start the CPU 1 hog; returns once it spins."""
    p = subprocess.Popen([str(tg.exe), "hog", str(ms)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "spinning":
        p.wait()
        pytest.skip(f"the hog could not run SCHED_FIFO: {line!r}")
    time.sleep(0.01)  # on CPU 1 for good
    return p


def stop_with_hog(tg: Target, t: Tracee, ms: int = HOG_MS) -> tuple[float, int]:
    """Stop the target while the hog keeps its idle thread off CPU 1, resume it; the time
    stop() took and the loop thread's longest gap (us)."""
    assert tg.cmd("reset") == "ok"
    h = hog(tg, ms)
    began = time.monotonic()
    t.seize_all()
    t.stop()
    took = time.monotonic() - began
    assert t.is_stopped()
    assert set(t.threads()) == set(tg.threads())  # every thread held, the laggard too
    t.resume()
    h.wait(10)
    return took, int(tg.cmd("stats"))


def test_quick_threads_run_on_while_a_laggard_gets_a_cpu(target: Target) -> None:
    with Tracee(target.pid) as t:
        took, gap_us = stop_with_hog(target, t)
        assert t.staggered >= 1
        # the window proper began after the laggard stopped: with the hog gone
        assert (t.window_began - time.perf_counter()) < 0
        staggered_gap = gap_us
        print(f"staggered: stop {took * 1e3:.1f} ms, loop gap {gap_us} us")
    assert took > HOG_MS / 2000, "the idle thread was no laggard: the test proves nothing"
    assert staggered_gap < 50_000, f"loop thread held {staggered_gap} us for the laggard"
    # control: without staggering, the loop thread waits for the laggard
    with Tracee(target.pid) as t:
        t.stagger_budget = 0
        took, gap_us = stop_with_hog(target, t)
        assert t.staggered == 0
        print(f"control: stop {took * 1e3:.1f} ms, loop gap {gap_us} us")
    assert took > HOG_MS / 2000, "the idle thread was no laggard: the control proves nothing"
    assert gap_us > HOG_MS * 1000 / 2 > staggered_gap


def test_the_window_reports_the_laggards_hold_apart_from_the_pause(target: Target) -> None:
    """pause_us is the window proper; the laggard's hold shows in the others' stopped
    figure, never hidden."""
    fn = target.symbol("hog")  # never runs in the target: no thread busy
    assert target.cmd("reset") == "ok"
    with Tracee(target.pid) as t:
        h = hog(target)
        stats = StopWindow(t, [(fn[0], fn[0] + fn[1], "hog")], retries=1).run([])
        h.wait(10)
    gap_us = int(target.cmd("stats"))
    assert stats.staggered >= 1
    assert stats.pause_us < 50_000
    assert gap_us < 50_000
    # the laggard is counted from when it can have stopped, not from the interrupt: it
    # waited ~150 ms for a CPU, stopped by nobody
    assert stats.pause_us < t.others_stopped_max_us < 50_000


def test_a_laggard_slower_than_the_wait_gets_everything_stopped(target: Target) -> None:
    """The quick threads may be what keeps a laggard from a CPU (a spinning SCHED_FIFO
    thread): after ``stagger_wait`` everything is stopped and waited for, so the stop ends."""
    with Tracee(target.pid) as t:
        t.stagger_wait = 0.05
        took, gap_us = stop_with_hog(target, t, ms=300)
        assert t.staggered == 1
    assert took > 0.15
    # let run for the budget and the 50 ms wait, then held until the laggard stopped
    assert 100_000 < gap_us < took * 1e6


def test_a_thread_that_does_not_stop_in_time_is_given_up_and_named(target: Target) -> None:
    """Every wait has a way out: a thread that does not reach its stop within
    ``stop_timeout`` (here the laggard, stagger off; in life a wait in state D that may never
    end) makes the stop give up, resume the program unchanged and name the thread; it is
    let go once it stops."""
    _, idle_tid = map(int, target.cmd("tids").split())
    fn = target.symbol("hog")
    assert target.cmd("reset") == "ok"
    with Tracee(target.pid) as t:
        t.stagger_budget = 0
        t.stop_timeout = 0.03
        h = hog(target, ms=300)
        t.seize_all()
        with pytest.raises(ThreadWontStop) as info:
            t.stop()
        assert info.value.tid == idle_tid
        assert not t.is_stopped()
        gap_us = int(target.cmd("stats"))  # answered while the hog still spins
        assert gap_us < 100_000  # the loop thread was let go at the give-up, not at the end
        with pytest.raises(CodeBusy) as busy:
            StopWindow(t, [(fn[0], fn[0] + fn[1], "hog")], retries=1).run([])
        assert f"thread {idle_tid} (idle)" in "\n".join(busy.value.details)
        h.wait(10)
    # the idle thread stopped once the hog was gone and was let go: nothing traced
    deadline = time.monotonic() + 2
    while any(tracer(target.pid, tid) for tid in target.threads()):
        assert time.monotonic() < deadline, "a thread stayed traced"
        time.sleep(0.01)
    assert target.cmd("reset") == "ok"


def tracer(pid: int, tid: int) -> int:
    """TracerPid of one thread (0: not traced)."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("TracerPid:")).split()[1])
