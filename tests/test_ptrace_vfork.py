"""A thread waiting in vfork() never holds the stop window open (tests/progs/ptrace_vfork.c).

The vforking thread cannot be stopped until its child execs or exits, and the child runs the
program's code in its memory: a stop of every thread that waited for it held the other
threads stopped for the child's whole life (about 2 s per stop here) and would wait forever
for a child that never exits.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.errors import CodeBusy
from livesplice.process.ptrace import VFORK_HOST_WAIT, Tracee, task_state
from livesplice.process.remote import remote_syscall
from livesplice.process.stopwindow import StopWindow

SYS_GETPID = 39
CHILD_MS = 2000  # each vfork child lives this long (detach waits up to that: see below)


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    exe = build("ptrace_vfork", tmp_path_factory.mktemp("vfork_progs"))
    tg = Target(exe, str(CHILD_MS))
    time.sleep(0.2)  # the vforker is inside vfork() from now on, nearly all the time
    yield tg
    tg.proc.kill()  # it does not end on EOF
    tg.stop()


def _held(pid: int, tids: list[int]) -> list[int]:
    return [t for t in tids if task_state(pid, t) == "t"]


def test_stop_refuses_a_thread_in_vfork_and_lets_the_program_run(target: Target) -> None:
    with Tracee(target.pid) as t:
        began = time.monotonic()
        with pytest.raises(CodeBusy) as info:  # ptrace.ThreadInVfork
            t.stop()
        took = time.monotonic() - began
        # seize_all waits VFORK_HOST_WAIT for a vfork to end (the program runs meanwhile),
        # not for the child's whole life
        assert took < VFORK_HOST_WAIT + 0.3, f"stop() waited {took:.2f} s for a vfork child"
        vforker: int = getattr(info.value, "tid", 0)
        assert vforker in t.threads() and vforker != target.pid
        assert not t.is_stopped()
        time.sleep(0.05)
        t.service()  # the interrupts still pending stopped some threads: passed on
        others = [x for x in t.threads() if x != vforker]
        assert not _held(target.pid, others)


def test_stop_window_retries_then_reports_the_vfork(target: Target) -> None:
    with Tracee(target.pid) as t:
        began = time.monotonic()
        with pytest.raises(CodeBusy) as info:
            StopWindow(t, [], retries=2, interval=0.05).run([])
        took = time.monotonic() - began
        # two attempts of VFORK_HOST_WAIT each, well short of the child's life
        assert took < 2 * VFORK_HOST_WAIT + 0.5 < CHILD_MS / 1000, f"the window waited {took:.2f} s"
        assert "vfork" in "\n".join([info.value.reason, *info.value.details])


def test_remote_call_host_is_never_a_thread_in_vfork(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A remote call prefers a sleeping thread to host it; the vforking thread sleeps (state
    D) but cannot be stopped: with the others spinning it was chosen, and the call waited for
    the child."""
    exe = build("ptrace_vfork", tmp_path_factory.mktemp("vfork_progs"))
    tg = Target(exe, str(CHILD_MS), "busy")
    try:
        time.sleep(0.2)
        with Tracee(tg.pid) as t:
            for _ in range(3):
                began = time.monotonic()
                assert remote_syscall(t, SYS_GETPID) == tg.pid
                took = time.monotonic() - began
                assert took < 0.3, f"the remote call waited {took:.2f} s for a vfork child"
    finally:
        tg.proc.kill()
        tg.stop()


def _tracer(pid: int, tid: int) -> int:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("TracerPid:")).split()[1])


def _vforker(target: Target) -> int:
    return next(t for t in target.threads() if t != target.pid and task_state(target.pid, t) == "D")


def test_detach_does_not_wait_for_a_vfork_child(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """stop() finds the thread in vfork() before tracing anything, so detach() has nothing
    to wait for. (Before, the refused stop left the vforking thread traced with an
    interrupt pending, and detach() waited for the rest of its child's life: here up to
    5 s.)"""
    exe = build("ptrace_vfork", tmp_path_factory.mktemp("vfork_progs"))
    target = Target(exe, "5000")
    time.sleep(0.2)
    try:
        _detach_after_refused_stop(target)
    finally:
        target.proc.kill()
        target.stop()


def _detach_after_refused_stop(target: Target) -> None:
    t = Tracee(target.pid)
    with pytest.raises(CodeBusy):
        t.stop()
    began = time.monotonic()
    t.detach()
    took = time.monotonic() - began
    assert took < 0.3, f"detach() waited {took:.2f} s for a vfork child"
    assert all(_tracer(target.pid, tid) == 0 for tid in target.threads())


def test_a_vforking_thread_left_traced_is_let_go_later(target: Target) -> None:
    """The race seize_all() cannot rule out: the thread enters vfork() after the check and
    before our interrupt. detach() then waits a bounded time (not the child's life) and
    leaves the thread to release_orphans(), which detaches it once it stopped."""
    from livesplice.process.ptrace import OPTS_WINDOW, release_orphans

    vforker = _vforker(target)
    t = Tracee(target.pid)
    assert t._seize(vforker, OPTS_WINDOW)  # what stop() would have done in the race
    t.interrupt_thread(vforker)
    began = time.monotonic()
    t.detach()
    took = time.monotonic() - began
    assert took < 0.5, f"detach() waited {took:.2f} s for a vfork child"
    assert _tracer(target.pid, vforker) == os.getpid()  # left traced: still in vfork()
    deadline = time.monotonic() + CHILD_MS / 1000 * 3
    while _tracer(target.pid, vforker):
        assert time.monotonic() < deadline, "the vforking thread stayed traced"
        time.sleep(0.05)
        release_orphans()  # what the agent's loop and every new Tracee call
    time.sleep(CHILD_MS / 1000 + 0.2)
    assert target.alive()
    assert task_state(target.pid, vforker) != "t"
