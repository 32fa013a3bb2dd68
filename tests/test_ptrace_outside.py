"""Outside a stop window no thread waits for livesplice but the host of a remote call.

A traced thread stops, without anyone asking, at every signal sent to it (a
signal-delivery-stop) and, with PTRACE_O_TRACEEXIT, at its exit; it waits there until its
tracer collects the stop, which is late whenever livesplice's thread is busy in C code, in
Python work or descheduled. So livesplice traces a thread only while it needs it stopped
(process/ptrace.py's module docstring). Target: tests/progs/ptrace_outside.c, which measures
from inside how late a signal handler runs and how late a join returns.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.process.ptrace import Tracee, libc
from livesplice.process.remote import PROT_READ, remote_mmap, remote_munmap, stopped


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tg = Target(build("ptrace_outside", tmp_path_factory.mktemp("outside_progs")))
    yield tg
    tg.stop()


def tracers(tg: Target) -> dict[int, int]:
    """TracerPid of each thread of the target (0: not traced)."""
    out = {}
    for tid in tg.threads():
        try:
            status = Path(f"/proc/{tg.pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        out[tid] = int(
            next(ln for ln in status.splitlines() if ln.startswith("TracerPid:")).split()[1]
        )
    return out


def test_threads_livesplice_does_not_hold_never_wait_for_it(target: Target) -> None:
    """While livesplice works the way apply does -- a named mapping on the host thread, a
    stop window, then C work on its own thread (0.15-0.5 s of sha256, during which Python
    runs no signal handler: like a long run-pre match, or the tool descheduled) -- a
    signalled thread and a joined thread of the program are not held.

    Before: the receiver sat in a signal-delivery-stop and each short thread the window had
    seized sat in its exit stop until the C work ended (both latencies = the C work)."""
    blob = bytes(256 << 20)
    works: list[float] = []
    assert target.cmd("reset") == "ok"
    with Tracee(target.pid) as t:
        for _ in range(4):
            addr = remote_mmap(t, 4096, PROT_READ, name="livesplice-test")
            remote_munmap(t, addr, 4096)
            t.stop()
            t.resume()
            began = time.perf_counter()
            hashlib.sha256(blob).digest()
            works.append(time.perf_counter() - began)
    sig_us, sigs, join_us, joins = (int(x) for x in target.cmd("stats").split())
    work = min(works)
    assert sigs > 0 and joins > 0
    # both wait at most scheduling noise (a few ms on a loaded machine), never the C work
    assert sig_us / 1e6 < work / 3, (sig_us, work)
    assert join_us / 1e6 < work / 3, (join_us, work)


def test_outside_a_window_no_thread_is_traced_but_the_host(target: Target) -> None:
    """What the kernel says (TracerPid): nothing traced after attaching, the host alone
    during a remote call, every thread inside a window, nothing after it. A thread detached
    also has no interrupt of ours left pending (PTRACE_DETACH clears the trap): no stale
    interrupt trap after a window."""
    me = libc().getpid()
    with Tracee(target.pid) as t:
        assert set(tracers(target).values()) == {0}
        with stopped(t) as host:
            traced = {tid for tid, tracer in tracers(target).items() if tracer}
            assert traced == {host} and tracers(target)[host] == me
        assert set(tracers(target).values()) == {0}
        for _ in range(20):
            t.stop()
            held = tracers(target)
            assert all(tracer == me for tid, tracer in held.items() if tid in t.threads())
            t.resume()
            # but for threads past their exit stop, which run no user code any more and
            # stay traced only until their end is reaped (how a dying process ended)
            exiting = set(t.exiting_threads())
            left = {tid for tid, tracer in tracers(target).items() if tracer}
            exiting |= set(t.exiting_threads())
            assert left <= exiting, (left, exiting)
    assert target.alive()


@pytest.mark.parametrize("reaped", [False, True])
def test_a_crash_between_windows_is_still_known(target: Target, reaped: bool) -> None:
    """The crash guard needs how a process that died during apply ended (TargetGone's
    crash_signal). With nothing traced between windows its end is not reported to us: it
    is read from the zombie's /proc/PID/stat, or once its parent reaped it from the pidfd
    opened at attach (PIDFD_INFO_EXIT)."""
    import os
    import signal

    t = Tracee(target.pid)
    t.stop()
    t.resume()
    os.kill(target.pid, signal.SIGSEGV)
    if reaped:
        target.proc.wait(timeout=5)
    else:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{target.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    t.detach()
    assert t.killed_by == signal.SIGSEGV
