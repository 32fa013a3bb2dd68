"""A thread waiting in vfork() never holds the stop window open (tests/progs/ptrace_vfork.c).

The vforking thread cannot be stopped until its child execs or exits, and the child runs the
program's code in its memory: a stop of every thread that waited for it held the other
threads stopped for the child's whole life (about 2 s per stop here) and would wait forever
for a child that never exits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.errors import CodeBusy
from livesplice.process.ptrace import Tracee, task_state
from livesplice.process.remote import remote_syscall
from livesplice.process.stopwindow import StopWindow

SYS_GETPID = 39
CHILD_MS = 1000  # each vfork child lives this long (detach waits up to that: see below)


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
        assert took < 0.3, f"stop() waited {took:.2f} s for a vfork child"
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
        assert took < 0.6, f"the window waited {took:.2f} s for a vfork child"
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
