"""The end marker of a remote batch (a signal the stub sends its own thread) against a
program that fights it: a seccomp filter on ``tgkill``, and a handler for the marker signal
installed by another thread after livesplice first looked.

Target: tests/progs/mark_target.c (a "host" thread asleep in read(); the main thread
installs handlers on command). Each test fails on the code before its fix (commit message).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build

from livesplice.errors import CodeBusy, ExitCode
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import PROT_READ, read_maps, remote_mmap, remote_munmap


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("mark_target", tmp_path_factory.mktemp("mark"))


@pytest.fixture
def spawn(exe: Path) -> Iterator[object]:
    started: list[Target] = []

    def start(*args: str) -> Target:
        tg = Target(exe, *args)
        tg.wait_threads(2)
        started.append(tg)
        return tg

    yield start
    for tg in started:
        tg.stop()


def host_of(tg: Target) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the thread names itself once it runs
        for tid in tg.threads():
            if Path(f"/proc/{tg.pid}/task/{tid}/comm").read_text().strip() == "host":
                return tid
        time.sleep(0.01)
    raise LookupError("host")


def sig_caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise LookupError("SigCgt")


def untraced(pid: int, timeout: float = 5.0) -> None:
    """Wait until no thread of ``pid`` has a tracer (the kernel lets a dead tool's go)."""
    deadline = time.monotonic() + timeout
    while True:
        tracers = {
            line.split()[1]
            for tid in os.listdir(f"/proc/{pid}/task")
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
            if line.startswith("TracerPid:")
        }
        if tracers == {"0"}:
            return
        assert time.monotonic() < deadline, tracers
        time.sleep(0.01)


def start_tool(script: str, *args: object) -> subprocess.Popen[str]:
    """A livesplice "tool" script in its own process, so that it can be killed -- or hang --
    without taking the test run along; no fault injection armed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("LIVESPLICE_KILL_AT", None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *(str(a) for a in args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(tool: subprocess.Popen[str], hang: str) -> list[str]:
    """The output lines of a tool that ended well; a failure saying ``hang`` (and the tool
    killed) if it did not end within 20 s."""
    try:
        out, err = tool.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        tool.kill()
        tool.communicate()
        pytest.fail(hang)
    assert tool.returncode == 0, err
    return out.splitlines()


@pytest.mark.parametrize("action", ["kill", "errno"])
def test_a_seccomp_filter_on_tgkill_neither_kills_nor_stalls(spawn, action: str) -> None:  # type: ignore[no-untyped-def]
    """A program whose seccomp filter forbids ``tgkill`` (killing the process, or failing the
    call): the marker would kill it, or never come (each mapping waited 5 s, then failed
    with its mapping left behind). Under a seccomp filter the batch ends with ``getpid``
    instead, stepped to as before the signal marker."""
    tg = spawn(f"seccomp={action}")
    host = host_of(tg)
    with Tracee(tg.pid) as t:
        began = time.monotonic()
        addr = remote_mmap(t, 4096, PROT_READ, name="livesplice:test:seccomp", thread=host)
        took = time.monotonic() - began
        maps = {m[0]: m for m in read_maps(tg.pid)}
        assert maps[addr][3] == "/memfd:livesplice:test:seccomp (deleted)"
        remote_munmap(t, addr, 4096)
    assert took < 2.0, took
    assert tg.cmd("alive") == "yes" and tg.alive()
    assert "livesplice:test:seccomp" not in Path(f"/proc/{tg.pid}/maps").read_text()


TOOL = """
import os, sys
from livesplice.errors import CodeBusy, ExitCode
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import remote_mmap, remote_munmap
pid, host = int(sys.argv[1]), int(sys.argv[2])
with Tracee(pid) as t:
    remote_munmap(t, remote_mmap(t, 4096, 1, name="livesplice:test:first", thread=host), 4096)
    print("first", flush=True)
    sys.stdin.readline()  # the program installs a handler for the marker signal meanwhile
    os.environ["LIVESPLICE_KILL_AT"] = "remote:regs-set:mmap"
    remote_mmap(t, 4096, 1, name="livesplice:test:second", thread=host)
"""


def test_a_handler_installed_since_the_last_batch_never_runs(spawn) -> None:  # type: ignore[no-untyped-def]
    """The marker signal is chosen from the handlers the program has NOW: another thread may
    install one for SIGURG between two batches of one Tracee (a lazily installed handler, a
    runtime starting up). The tool killed while the host sits in the marker's
    signal-delivery-stop: the kernel delivers the marker -- it must reach no handler."""
    tg = spawn()
    tool = start_tool(TOOL, tg.pid, host_of(tg))
    try:
        assert tool.stdout is not None and tool.stdin is not None
        assert tool.stdout.readline() == "first\n", tool.stderr
        for sig in (signal.SIGURG, signal.SIGWINCH):
            assert tg.cmd(f"catch {int(sig)}") == "ok"
            assert sig_caught(tg.pid) >> (sig - 1) & 1
        tool.stdin.write("go\n")
        tool.stdin.flush()
        _out, err = tool.communicate(timeout=30)
        assert tool.returncode == -9, (tool.returncode, err)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    untraced(tg.pid)
    assert tg.cmd("caught") == "0"  # no handler of the program ran
    assert tg.cmd("alive") == "yes"


def test_a_program_whose_only_thread_waits_in_vfork_is_busy_not_a_hang(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its one thread stops only when its vfork child execs or exits -- never, for a child
    that sleeps: any local user can run such a copy of a program root patches with
    ``apply --all`` or the agent. The remote call waited for the child's whole life (here
    20 s); now it is CODE_BUSY within a second, and the program runs on untraced."""
    exe = build("vfork_only", tmp_path_factory.mktemp("vfork_only"))
    tg = Target(exe, "20000")
    try:
        time.sleep(0.2)  # inside vfork() from now on
        began = time.monotonic()
        with Tracee(tg.pid) as t, pytest.raises(CodeBusy) as info:
            remote_mmap(t, 4096, PROT_READ, name="livesplice:test:vfork")
        took = time.monotonic() - began
        assert took < 2.0, f"the remote call waited {took:.2f} s for a vfork child"
        assert info.value.code == ExitCode.CODE_BUSY
        assert "vfork" in info.value.reason
        untraced(tg.pid)
        assert tg.alive()
    finally:
        tg.proc.kill()
        tg.stop()


def test_a_host_that_enters_vfork_after_the_listing_is_not_waited_for(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The race the listing cannot rule out: the thread enters vfork() after hold_one looked
    at it and before our interrupt. Its stop is waited for 2 ms, then it is looked at: in
    vfork(), it is given up (left traced, let go by detach() or a later Tracee) instead of
    waited for until its child ends."""
    from livesplice.process.ptrace import OPTS_HOST

    exe = build("vfork_only", tmp_path_factory.mktemp("vfork_only"))
    tg = Target(exe, "20000")
    try:
        time.sleep(0.2)
        t = Tracee(tg.pid)
        try:
            assert t._seize(tg.pid, OPTS_HOST)  # what hold_one does once it chose the thread
            began = time.monotonic()
            assert not t._stop_thread(tg.pid)
            assert time.monotonic() - began < 1.0
        finally:
            t.detach()
        assert tg.alive()
    finally:
        tg.proc.kill()
        tg.stop()


NOTIF_TOOL = """
import sys
from livesplice.errors import RemoteCallFailed
from livesplice.process import remote
from livesplice.process.ptrace import Tracee
remote.STUB_TIMEOUT = 1.0  # the test's own bound (5 s in livesplice)
pid, host = int(sys.argv[1]), int(sys.argv[2])
with Tracee(pid) as t:
    try:
        remote.remote_mmap(t, 4096, 1, name="livesplice:test:notif", thread=host)
    except RemoteCallFailed as e:
        print("failed:", e.reason, flush=True)
    addr = remote.remote_mmap(t, 4096, 1, thread=host)  # no memfd: the thread still works
    remote.remote_munmap(t, addr, 4096)
print("done", flush=True)
"""


def test_a_stub_call_that_never_returns_is_given_up(spawn) -> None:  # type: ignore[no-untyped-def]
    """Under a seccomp filter the batch is stepped from syscall-stop to syscall-stop; a call
    that never returns -- memfd_create waiting for a SECCOMP_RET_USER_NOTIF supervisor that
    never answers, which the program's owner can set up -- held root's tool in waitpid
    forever. Now the stub run is given up after STUB_TIMEOUT like a signal-marked one: the
    thread interrupted, its registers restored, REMOTE_FAILED, and the thread still hosts
    the next call."""
    tg = spawn("seccomp=notif")
    tool = start_tool(NOTIF_TOOL, tg.pid, host_of(tg))
    lines = finish(tool, "the tool hung in a stub run that never ended")
    assert lines[0].startswith("failed: the stub run in thread"), lines
    assert lines[-1] == "done", lines
    untraced(tg.pid)
    assert tg.cmd("alive") == "yes" and tg.alive()
    assert "livesplice:test" not in Path(f"/proc/{tg.pid}/maps").read_text()


CALL_TOOL = """
import sys
from livesplice.errors import HookFailed
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import remote_call, remote_syscall
pid, host, func = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 0)
with Tracee(pid) as t:
    try:
        remote_call(t, func, timeout=1.0, thread=host)
    except HookFailed as e:
        print("failed:", e.reason, flush=True)
    print("pid", remote_syscall(t, 39, thread=host), flush=True)  # the thread still hosts
print("done", flush=True)
"""


def test_a_call_blocked_in_a_system_call_times_out(spawn) -> None:  # type: ignore[no-untyped-def]
    """A hook that blocks in read(): at its timeout the thread is interrupted, reports the
    syscall-exit-stop of the read first (the call is traced with PTRACE_SYSCALL), and that
    stop cleared the interrupt -- continued, the read restarted and blocked again while
    livesplice waited for a trap that never came (forever). HookFailed now, registers
    restored."""
    tg = spawn()
    tool = start_tool(CALL_TOOL, tg.pid, host_of(tg), hex(tg.symbol("block_in_read")[0]))
    lines = finish(tool, "the tool hung in a call that blocked")
    assert lines[0].startswith("failed: the function at") and "did not return" in lines[0]
    assert lines[1:] == [f"pid {tg.pid}", "done"], lines
    untraced(tg.pid)
    assert tg.cmd("alive") == "yes" and tg.alive()
