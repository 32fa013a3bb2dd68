"""The tool SIGKILLed in the middle of running code inside the target never harms it.

A separate tool process (tests/progs/ptrace_robust_tool.py) hijacks one thread of
tests/progs/ptrace_robust.c and is killed at each fault-injection checkpoint of remote.py
(LIVESPLICE_KILL_AT) or at a random time. The target must keep running exactly as before:
its blocked read() still returns the next line (no EINTR), its nanosleep loop and its
register-checking loop go on (a register restored wrong makes it print ERR and exit), and the
killed tool left no tracer attached.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.errors import ExitCode, RemoteCallFailed
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import PROT_READ, remote_mmap

TOOL = Path(__file__).resolve().parent / "progs" / "ptrace_robust_tool.py"
THREADS = ["ptrace_robust", "sleeper", "epoller", "regcheck"]  # main thread has the exe name


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("ptrace_robust", tmp_path_factory.mktemp("robust"))


@pytest.fixture
def target(exe: Path) -> Iterator[Target]:
    tg = Target(exe)
    tg.wait_threads(4)
    time.sleep(0.05)  # every thread in its loop or blocked
    yield tg
    tg.stop()


def reply(tg: Target, line: str, eintr_ok: bool = False) -> str:
    """Send a command, return its answer (skipping epoll_wait EINTR reports if allowed)."""
    tg.send(line)
    while True:
        got = tg.readline(10)
        if not (eintr_ok and got == "EINTR epoll_wait"):
            return got


def counts(tg: Target, eintr_ok: bool = False) -> tuple[int, int, int]:
    line = reply(tg, "count", eintr_ok)
    assert line.startswith("count "), line
    a, b, c = (int(x) for x in line.split()[1:])
    return a, b, c


def tool(
    tg: Target,
    thread: str,
    op: str,
    func: int = 0,
    kill_at: str | None = None,
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if kill_at:
        env["LIVESPLICE_KILL_AT"] = kill_at
    args = [sys.executable, str(TOOL), str(tg.pid), thread, op, hex(func)]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def tracer_of(pid: int) -> set[int]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                out.add(int(line.split()[1]))
    return out


def assert_unharmed(tg: Target, eintr_ok: bool = False) -> None:
    """Everything the program does still works, and goes on working.

    ``eintr_ok``: an ``EINTR`` of the epoll_wait thread is tolerated (and drained).
    """
    deadline = time.monotonic() + 5
    while tracer_of(tg.pid) != {0}:  # the kernel detaches a dead tracer's tracees at once
        assert time.monotonic() < deadline, tracer_of(tg.pid)
        time.sleep(0.01)
    first = counts(tg, eintr_ok)  # the blocked read() returned: no EINTR, nothing lost
    assert reply(tg, "17", eintr_ok) == "got 17"
    time.sleep(0.05)
    later = counts(tg, eintr_ok)
    assert later[0] > first[0], (first, later)  # regcheck loops with every register intact
    assert later[1] > first[1], (first, later)  # nanosleep restarted and keeps waking
    assert tg.alive()
    if not eintr_ok:
        assert tg.lines.empty()  # no ERR or EINTR line


SYSCALL_POINTS = ["remote:regs-set", "remote:after-syscall", "remote:before-restore"]
CALL_POINTS = ["remote:regs-set:call", "remote:after-call", "remote:before-restore:call"]


@pytest.mark.parametrize("thread", THREADS)
@pytest.mark.parametrize("point", SYSCALL_POINTS)
def test_killed_during_a_remote_syscall(target: Target, thread: str, point: str) -> None:
    p = tool(target, thread, "syscall", kill_at=point)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -9, (p.returncode, out, err)
    assert_unharmed(target)


@pytest.mark.parametrize("thread", ["ptrace_robust", "sleeper", "regcheck"])
@pytest.mark.parametrize("point", CALL_POINTS)
def test_killed_during_a_remote_call(target: Target, thread: str, point: str) -> None:
    p = tool(target, thread, "call", target.symbol("answer")[0], kill_at=point)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -9, (p.returncode, out, err)
    assert_unharmed(target)


def test_killed_while_the_callee_runs(target: Target) -> None:
    """The callee (300 ms) finishes on its own and returns through the stub to the loop."""
    p = tool(target, "regcheck", "call", target.symbol("slow")[0], kill_at="remote:regs-set:call")
    out, err = p.communicate(timeout=30)
    assert p.returncode == -9, (p.returncode, out, err)
    p = tool(target, "regcheck", "call", target.symbol("slow")[0])
    assert p.stdout is not None
    while counts(target)[2] < 1:  # the first slow() is done: the second one runs now
        time.sleep(0.02)
    time.sleep(0.15)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while counts(target)[2] < 2:
        assert time.monotonic() < deadline, "slow() never completed"
        time.sleep(0.05)
    assert_unharmed(target)


def test_killed_at_random_times(target: Target) -> None:
    """Kills anywhere, also inside Tracee.stop() and detach().

    One window cannot be closed from user space: PTRACE_INTERRUPT makes epoll_wait (and
    sigtimedwait, semop, recv with SO_RCVTIMEO) return -EINTR at once, and Tracee.stop()
    rewinds the call only after the stop is reported; a tool killed in between leaves the
    EINTR to the program. So that thread's EINTR is tolerated here (the checkpoint tests
    above allow none); restartable calls (read, nanosleep) and registers must stay exact.
    """
    rnd = random.Random(4321)
    answer = target.symbol("answer")[0]
    for i in range(12):
        p = tool(target, THREADS[i % len(THREADS)], "loop", answer)
        assert p.stdout is not None
        assert p.stdout.readline().startswith("result 42")  # it is really looping
        time.sleep(rnd.uniform(0.0, 0.05))
        p.kill()
        p.wait()
        assert_unharmed(target, eintr_ok=True)


def test_the_tool_not_killed_leaves_no_trace(target: Target) -> None:
    """Control: the same operations completed: results right, registers exact."""
    for thread in THREADS:
        p = tool(target, thread, "call", target.symbol("answer")[0])
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and out.split() == ["result", "42", "done"], (out, err)
    p = tool(target, "sleeper", "mmap")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "robust-test" not in Path(f"/proc/{target.pid}/maps").read_text()
    assert_unharmed(target)


def test_a_failed_system_call_is_remote_call_failed(target: Target) -> None:
    with Tracee(target.pid) as t, pytest.raises(RemoteCallFailed) as info:
        remote_mmap(t, 1 << 50, PROT_READ)  # more than the address space: ENOMEM
    assert info.value.code == ExitCode.REMOTE_FAILED == 11
    assert "Cannot allocate memory" in info.value.reason
    assert_unharmed(target)
