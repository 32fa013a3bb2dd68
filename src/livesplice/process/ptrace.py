"""ctypes ptrace for x86-64: seize threads of a process, stop, resume, registers, memory.

A :class:`Tracee` stands for one process, but traces its threads only while it needs them
stopped: **outside a stop window no thread is traced but the one hosting a remote call.**
Why: a traced thread waits for its tracer at stops nobody asked for -- every signal sent to
it (SIGCHLD, a timer's SIGALRM, SIGPIPE...) stops it in a signal-delivery-stop, and with
``PTRACE_O_TRACEEXIT`` every exiting thread stops at its exit (a ``pthread_join`` waits for
that) -- until the tracer collects the stop, which is late whenever livesplice's thread is
busy elsewhere (C work such as a run-pre match or an fsync, Python work, descheduled).
Measured before (``benchmarks/bench_outside_stops.py --rt-load 5``, 2 CPUs, load 4-13):
while livesplice was attached and working, a thread signalled every ms waited up to 37-67
ms for its handler (it handled a third as many signals) and a join up to 19-31 ms for a
thread's exit, while the Tracee counted 2-5 ms; in 2 s, 535-674 signal-delivery-stops, 31-35
exit stops and 0-2 stale interrupt traps outside any window waited for livesplice. Now none:
1.1-3.8 ms and 1.0-4.0 ms, the windows' own length (0.1-2.0 / 0.1-1.6 ms with no tracer).
ptrace(2) has no option that spares a traced thread these stops
(the kernel's ``get_signal`` reports every signal but SIGKILL to the tracer, even ignored
ones), so the only way is not to trace the thread:

* :meth:`Tracee.hold_one` seizes one thread (the host of a remote call), stops it, and
  :meth:`Tracee.release_one` detaches it (``PTRACE_DETACH``).
* :meth:`Tracee.stop` seizes every thread listed in ``/proc/PID/task`` (each with
  ``PTRACE_O_TRACECLONE``, so threads created meanwhile are seized by the kernel),
  interrupts them, and lists again until no thread is new: a thread can only be created by
  a running thread, and every running one is being seized. :meth:`Tracee.resume`
  detaches them again, re-injecting recorded signals; ``PTRACE_DETACH`` also drops an
  interrupt still pending on a thread (``__ptrace_unlink`` clears the trap bits): no stale
  interrupt trap can outlive the window. A thread that does not stop at once because it
  gets no CPU (a laggard) does not hold the others: they run on until it stopped, then are
  stopped again (:meth:`Tracee._stagger`).
* ``PTRACE_O_TRACEEXIT`` while traced: a thread that exits reports an exit stop instead of
  vanishing under us (the thread-group leader calling ``pthread_exit`` would otherwise never
  report anything until the whole process ends, and a dying leader's end is only reported
  once its other threads are reaped: a wait on it would never return). A thread found
  exiting is let go with ``PTRACE_CONT`` and reaped by us, which tells how a dying process
  ended (:attr:`Tracee.killed_by`, the crash guard).
* Attaching (the constructor) traces nothing: it checks that the process exists, that its
  memory opens for writing (the same ``PTRACE_MODE_ATTACH`` check as ``PTRACE_SEIZE``) and
  that no other tracer holds a thread.

Speed (measured with benchmarks/): every step is batched across threads (interrupt
all, then wait all, then read all registers); ``ptrace`` is called through ctypes *without*
``argtypes`` (about 0.5 µs less per call), so every argument wider than an int is passed as a
prebuilt ``c_void_p``; registers of all threads land in one preallocated numpy array that the
stop window scans without a Python loop.

Stops and signals (ptrace(2), "Signal-delivery-stop", "PTRACE_INTERRUPT", "Group-stop"):

* A thread found in a signal-delivery-stop keeps the signal *recorded* and stays stopped;
  :meth:`Tracee.resume` re-injects it with ``PTRACE_DETACH`` (only a signal-delivery-stop
  can inject). Signals that arrive during a stop window are therefore delivered right after it.
* A thread that stays traced outside a window -- the held host, or one that could not be
  stopped in time to be detached (it waits in ``vfork()``) -- stops at each signal until
  :meth:`Tracee.service` passes it on (it detaches such a thread once it stopped).
* ``EINTR`` leaks: the interrupt makes ``epoll_wait``, ``sigtimedwait``, ``sigwaitinfo``,
  ``semop`` and ``recv`` with ``SO_RCVTIMEO`` return ``-EINTR`` (they do not use the kernel's
  ``-ERESTARTSYS`` protocol). :meth:`stop` rewinds such a thread so the system call runs
  again (``rax = orig_rax``, ``rip -= 2`` after checking the two bytes before ``rip`` are
  ``syscall`` = ``0f 05``), unless a real signal is pending for it (then the program must see
  the ``EINTR``). A restarted call starts its timeout afresh.

All calls must come from the thread that created the Tracee (ptrace is per tracer thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from livesplice.errors import CodeBusy, LivespliceError, NoPermission, TargetGone, TargetStopped
from livesplice.process.procstat import pid_stat, stat_fields

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# <sys/ptrace.h>, <linux/ptrace.h>
PTRACE_CONT: Final = 7
PTRACE_SINGLESTEP: Final = 9
PTRACE_GETREGS: Final = 12
PTRACE_SETREGS: Final = 13
PTRACE_GETFPREGS: Final = 14
PTRACE_SETFPREGS: Final = 15
PTRACE_DETACH: Final = 17
PTRACE_SYSCALL: Final = 24
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETSIGMASK: Final = 0x420A
PTRACE_PEEKSIGINFO: Final = 0x4209
PTRACE_PEEKSIGINFO_SHARED: Final = 1
SIGINFO_SIZE: Final = 128  # sizeof(siginfo_t)
PTRACE_SECCOMP_GET_FILTER: Final = 0x420C
PTRACE_GETREGSET: Final = 0x4204
PTRACE_SETREGSET: Final = 0x4205
NT_X86_XSTATE: Final = 0x202  # <elf.h>: the XSAVE image (x87, SSE, AVX, AVX-512, PKRU...)
XSTATE_MAX: Final = 1 << 16  # the image is 2,696 bytes with AVX-512, 11,008 with AMX
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208
PTRACE_O_TRACESYSGOOD: Final = 0x01
PTRACE_O_TRACECLONE: Final = 0x08
PTRACE_O_TRACEEXIT: Final = 0x40
PTRACE_SETOPTIONS: Final = 0x4200
OPTS_HOST: Final = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEEXIT  # the host of a remote call
OPTS_WINDOW: Final = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXIT
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXIT: Final = 6
PTRACE_EVENT_STOP: Final = 128
WALL: Final = 0x40000000  # __WALL: wait for threads (clone children) too
# WSTOPSIG of a syscall-stop with PTRACE_O_TRACESYSGOOD. Not a valid signal number: if the
# tracer dies while a thread sits in a syscall-stop, the kernel's attempt to deliver the stop's
# code as a signal fails (ptrace_report_syscall -> send_sig of an invalid signal), so the
# thread simply goes on. Without TRACESYSGOOD it would get a real SIGTRAP and die.
SYSCALL_STOP_SIG: Final = signal.SIGTRAP | 0x80

EINTR_RAX: Final = (1 << 64) - 4  # -EINTR as the unsigned 64-bit value in rax
SYSCALL_INSN: Final = b"\x0f\x05"
SYS_TGKILL: Final = 234
SYS_CLONE: Final = 56
SYS_VFORK: Final = 58
SYS_CLONE3: Final = 435
SYS_FUTEX: Final = 202
SYS_EXECVE: Final = 59
SYS_EXECVEAT: Final = 322
CLONE_VFORK: Final = 0x4000
# wait status of the stop PTRACE_INTERRUPT causes: WIFSTOPPED, SIGTRAP, PTRACE_EVENT_STOP
_INTERRUPT_STOP: Final = (PTRACE_EVENT_STOP << 16) | (signal.SIGTRAP << 8) | 0x7F

# the signals that mean a program crashed (a callee run inside it, or the program itself)
CRASH_SIGNALS: Final = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGTRAP,
        signal.SIGSYS,
    }
)
_STOP_SIGNALS: Final = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# how long hold_one waits for a thread to leave vfork() when every thread waits in one
VFORK_HOST_WAIT: Final = 0.5
# Staggered stop (Tracee.stop): a thread not stopped STAGGER_BUDGET s after the interrupt is
# a laggard (runnable, not given a CPU); the threads already stopped run on while laggards
# get there, for STAGGER_WAIT s at most, then are stopped again; STAGGER_ROUNDS times at most
STAGGER_BUDGET: Final = 0.0005
STAGGER_WAIT: Final = 0.25
STAGGER_ROUNDS: Final = 3
# how long Tracee.stop waits for one thread's stop before giving up (ThreadWontStop)
STOP_TIMEOUT: Final = 2.0


class ThreadNotStopping(CodeBusy):
    """A thread cannot be stopped now; :meth:`Tracee.stop` resumed the program unchanged.
    ``where`` says why, for the busy report of a stop window."""

    where = ""

    def __init__(self, reason: str, tid: int, advice: str) -> None:
        super().__init__(reason, advice=advice)
        self.tid = tid


class ThreadInVfork(ThreadNotStopping):
    """A thread waits in ``vfork()`` for its child, which runs in the program's memory: no
    stop of every thread is possible until the child execs or exits."""

    where = "vfork"

    def __init__(self, pid: int, tid: int) -> None:
        super().__init__(
            f"thread {tid} of process {pid} waits in vfork() for a child that runs in the "
            "program's memory; nothing was changed",
            tid,
            advice="retry when the child has exec'd or exited",
        )


class ThreadWontStop(ThreadNotStopping):
    """A thread did not reach its stop within :attr:`Tracee.stop_timeout` of the interrupt.

    Why give up: a thread in an uninterruptible wait (state D) stops only when the wait
    ends, and that may be never -- or only once another thread of the program, which we
    hold stopped, answers it (a FUSE file system served by the program itself). Waiting
    without a bound held every other thread stopped for as long, and the tool with them.
    """

    where = "did not stop"

    def __init__(self, pid: int, tid: int, seconds: float, state: str) -> None:
        super().__init__(
            f"thread {tid} of process {pid} did not stop within {seconds:g} s of livesplice's "
            f"interrupt (state {state or '?'}); nothing was changed",
            tid,
            advice="retry later; a thread stuck in an uninterruptible wait (state D: a hung "
            "NFS or FUSE file system, a device) cannot be stopped until the wait ends",
        )


class ProgramReplaced(TargetGone):
    """A thread of the process is replacing its program (execve) while a stop was under
    way: the program to update is going away. :meth:`Tracee.stop` let go what it held, so
    the exec completes."""

    def __init__(self, pid: int, tid: int) -> None:
        super().__init__(
            f"process {pid} is replacing its program (execve in thread {tid}); nothing was changed"
        )
        self.tid = tid


REG_NAMES: Final = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)


_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R")


def _op(method: _F) -> _F:
    """Mark a Tracee method that waits for or resumes threads: a SIGCHLD arriving while one
    runs must not service the threads under it (see :meth:`Tracee._on_sigchld`)."""

    @functools.wraps(method)
    def wrapper(self: Tracee, *args: Any, **kwargs: Any) -> Any:
        self._op_depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._op_depth -= 1
            if not self._op_depth and self._chld_pending:
                self._service_if_idle()

    return cast(_F, wrapper)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64 (<sys/user.h>), 27 unsigned 64-bit words."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in REG_NAMES]

    if TYPE_CHECKING:
        r15: int
        r14: int
        r13: int
        r12: int
        rbp: int
        rbx: int
        r11: int
        r10: int
        r9: int
        r8: int
        rax: int
        rcx: int
        rdx: int
        rsi: int
        rdi: int
        orig_rax: int
        rip: int
        cs: int
        eflags: int
        rsp: int
        ss: int
        fs_base: int
        gs_base: int
        ds: int
        es: int
        fs: int
        gs: int

    def copy(self) -> Regs:
        """A copy of the registers, to change without touching the saved original."""
        return Regs.from_buffer_copy(self)


REGS_WORDS: Final = 27
REGS_SIZE: Final = ctypes.sizeof(Regs)
# Column of each register in the per-thread registers array (= field order above).
REG_INDEX: Final = {name: i for i, name in enumerate(REG_NAMES)}

_libc: ctypes.CDLL | None = None


def libc() -> Any:
    """The C library, loaded on first use (no import-time side effects).

    ``Any``: ctypes resolves C functions as attributes at run time (``lib.ptrace``), which a
    type checker cannot follow on a ``CDLL``."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.ptrace.restype = ctypes.c_long
        lib.process_vm_readv.restype = ctypes.c_ssize_t
        _libc = lib
    return _libc


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (state Z) or dead (X)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def _tracer_of(pid: int, tid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def task_state(pid: int, tid: int) -> str:
    """The state letter of one thread (R, S, D, T, t, Z, ...); X when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "X"
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3].decode()


def _syscall_nr(pid: int, tid: int) -> int:
    """The system call a sleeping thread is in (/proc/PID/task/TID/syscall), else -1."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall", "rb") as f:
            first = f.read(24).split(b" ", 1)[0]
    except OSError:
        return -1
    return int(first) if first.isdigit() else -1


PF_EXITING: Final = 0x4  # <linux/sched.h>: the task is in do_exit()


def _past_exit_event(pid: int, tid: int) -> bool:
    """The thread is dying (PF_EXITING in the flags of /proc/PID/task/TID/stat, field 9), a
    zombie, or gone: it will never stop for an interrupt."""
    rest = stat_fields(f"/proc/{pid}/task/{tid}/stat")
    if len(rest) < 7 or rest[0] in (b"Z", b"X"):
        return True
    return bool(int(rest[6]) & PF_EXITING)


def process_dying(pid: int) -> bool:
    """The process is gone, a zombie, or being killed (its leader in do_exit, or SIGKILL
    pending: a fatal signal or exit_group queues it on every thread): a failed read, write
    or ptrace request on it means TARGET_GONE, not a fault of livesplice."""
    return not process_alive(pid) or _past_exit_event(pid, pid) or _sigkill_pending(pid, pid)


def _is_zombie(pid: int, tid: int) -> bool:
    return task_state(pid, tid) in ("Z", "X")


def _sigkill_pending(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                # own or process-wide (a group exit leaves it in the shared set)
                if line.startswith(("SigPnd:", "ShdPnd:")) and (
                    int(line.split()[1], 16) & (1 << (signal.SIGKILL - 1))
                ):
                    return True
    except OSError:
        return False
    return False


def signal_pending_unblocked(pid: int, tid: int) -> bool:
    """A signal is pending for ``tid`` (own or process-wide) and not blocked by it."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                key = line[:6]
                if key in ("SigPnd", "ShdPnd", "SigBlk"):
                    fields[key] = int(line.split()[1], 16)
    except OSError:
        return False
    pending = fields.get("SigPnd", 0) | fields.get("ShdPnd", 0)
    return bool(pending & ~fields.get("SigBlk", 0))


# PIDFD_GET_INFO (linux/pidfd.h, Linux 6.15): _IOWR(0xFF, 11, struct pidfd_info) with the
# structure's first 64 bytes (PIDFD_INFO_SIZE_VER0), which hold exit_code at offset 60.
_PIDFD_INFO_SIZE: Final = 64
PIDFD_GET_INFO: Final = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT: Final = 1 << 3
_PIDFD_EXIT_CODE_AT: Final = 60


def _ended_by_signal(pid: int, pidfd: int, wait: float = 0.3) -> int:
    """The signal that ended process ``pid`` (a wait status's WTERMSIG), 0 when it exited
    normally or nobody can tell -- learnt without tracing it, for the crash guard.

    Why: with no thread traced between stop windows and remote calls, a process that
    crashes then ends unseen by us. Its parent's wait status is still to be had: while it is
    a zombie in ``/proc/PID/stat`` (field 52, ``exit_code``, proc(5)), and once reaped from
    the pidfd opened at attach (``PIDFD_GET_INFO`` with ``PIDFD_INFO_EXIT``; older kernels
    answer ENOTTY/EINVAL). A process in the middle of dying is neither yet: wait up to
    ``wait`` s.
    """
    deadline = time.monotonic() + wait
    while True:
        status = None
        if pidfd >= 0:
            try:
                status = _pidfd_exit(pidfd)
            except OSError:
                pidfd = -1  # not this kernel (or not allowed): the zombie's stat only
        if status is None:
            zombie = _zombie_exit_code(pid)
            # still not reaped after the read: /proc/PID was that process, not a new one
            if zombie is not None and (pidfd < 0 or _pidfd_exit(pidfd) is None):
                status = zombie
        if status is not None:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.002)


def _pidfd_exit(pidfd: int) -> int | None:
    """The wait status of the pidfd's process once it is reaped; None before.

    :raises OSError: no PIDFD_GET_INFO on this kernel (ENOTTY, EINVAL).
    """
    buf = bytearray(_PIDFD_INFO_SIZE)
    buf[:8] = PIDFD_INFO_EXIT.to_bytes(8, "little")
    fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf, True)
    if not int.from_bytes(buf[:8], "little") & PIDFD_INFO_EXIT:
        return None
    return int.from_bytes(buf[_PIDFD_EXIT_CODE_AT : _PIDFD_EXIT_CODE_AT + 4], "little", signed=True)


def _zombie_exit_code(pid: int) -> int | None:
    """A zombie's wait status (/proc/PID/stat field 52, ``exit_code``); None if not a zombie."""
    rest = pid_stat(pid)
    if len(rest) < 50 or rest[0] != b"Z":
        return None
    return int(rest[49])


# Threads a closed Tracee could not let go: traced by this process's thread that made the
# Tracee, our interrupt pending, stuck in vfork() (tid -> pid). See Tracee._let_go_running.
_ORPHANS: dict[int, int] = {}


def release_orphans() -> None:
    """Detach the threads a closed Tracee left traced that stopped since (their vfork child
    exec'd or exited); drop the ones gone. A long-lived caller (the agent's loop) calls it
    now and then: until then such a thread sits in its interrupt stop (a command-line run
    ends soon, and its exit detaches them). Every Tracee calls it too. Cheap: one waitpid
    per such thread, nothing when there is none. Call it from the thread that made the
    Tracees (ptrace is per tracer thread)."""
    lib = libc()
    for tid, _pid in list(_ORPHANS.items()):
        try:
            got, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            del _ORPHANS[tid]
            continue
        if not got:
            continue  # still in vfork()
        del _ORPHANS[tid]
        if os.WIFSTOPPED(status):
            sig = os.WSTOPSIG(status)
            # a signal-delivery-stop (no event, not a syscall-stop) passes its signal on
            inject = sig if status >> 16 == 0 and sig != SYSCALL_STOP_SIG else 0
            lib.ptrace(PTRACE_DETACH, tid, 0, inject)


@contextlib.contextmanager
def realtime(enable: bool = True, priority: int = 1) -> Iterator[None]:
    """SCHED_FIFO (``priority``) for livesplice while it holds threads of the target
    stopped; the old policy restored after; nothing if not allowed (not root, a container).

    At normal priority, on a loaded machine, the tool is descheduled for whole time slices
    while the program waits for it (see StopWindow's ``fifo``). Only the stop window and the
    hold of a host thread run so: short, bounded stretches, mostly spent blocked in
    waitpid; the kernel's RT throttling still leaves other tasks 5% of each CPU.
    :meth:`Tracee.rt_priority` gives the priority to use for a target.
    """
    if not enable:
        yield
        return
    try:
        old_policy = os.sched_getscheduler(0)
        old_param = os.sched_getparam(0)
        if old_policy == os.SCHED_FIFO and old_param.sched_priority >= priority:
            yield  # already (a nested hold, or run under chrt): leave it as it is
            return
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, old_policy, old_param)


def _ignore_sigchld(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD's default disposition as a Python handler (see Tracee._restore_sigchld)."""


@contextlib.contextmanager
def _sigchld_blocked() -> Iterator[None]:
    """SIGCHLD blocked in this thread (for :func:`_waitpid_until`), as it was after."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        if signal.SIGCHLD not in mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# The first sleep of a wait for a stop's SIGCHLD; each next one twice as long, up to 1 ms.
# Why not 1 ms at once: the kernel may hand the SIGCHLD to another thread of the tool (a
# reader thread, a progress display) and then only the timeout wakes the wait -- with 1 ms
# slices the window with 8 spinning threads (a reader thread in the tool) had p50 0.54 /
# 0.45 ms, p95 0.91 / 0.87 ms; with these 0.39 / 0.42 ms, p95 0.60 / 0.65 ms.
_FIRST_NAP: Final = 2e-5


def _waitpid_until(tid: int, deadline: float) -> int | None:
    """The next wait status of ``tid`` if it comes before ``deadline`` (time.monotonic), else
    None; a thread gone reads as status 0. SIGCHLD must be blocked (:func:`_sigchld_blocked`):
    the wait sleeps in ``sigtimedwait`` for it, from 20 µs doubling to 1 ms at a time (a
    SIGCHLD the kernel hands to another thread of the tool), never spinning."""
    nap = _FIRST_NAP
    while True:
        try:
            got, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return 0
        if got:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        signal.sigtimedwait({signal.SIGCHLD}, min(left, nap))
        nap = min(nap * 2, 0.001)


class _PeekSiginfoArgs(ctypes.Structure):
    """struct ptrace_peeksiginfo_args (linux/ptrace.h)."""

    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class Tracee:
    """All threads of one process, ``PTRACE_SEIZE``\\d (no stop on attach).

    Use as a context manager, or call :meth:`detach`; the process keeps running afterwards.

    :raises TargetGone: the process does not exist (or is a zombie).
    :raises NoPermission: not allowed to trace it (another tracer, Yama, another user).
    """

    def __init__(self, pid: int, *, restart_eintr: bool = True) -> None:
        self.pid = pid
        self.restart_eintr = restart_eintr
        self._lib = libc()
        self._ptrace = self._lib.ptrace
        self._tids: list[int] = []  # live threads we trace now, in seize order
        self._stopped: set[int] = set()  # threads currently in a ptrace-stop
        self._signal_stop: set[int] = set()  # ... of which in a signal-delivery-stop
        self._group_stop: set[int] = set()  # ... of which in a group-stop (resume = LISTEN)
        # ... of which in a PTRACE_EVENT_CLONE stop: INSIDE clone()/clone3(), whose return
        # value is not stored yet (rax reads -ENOSYS). Never run code on such a thread nor
        # restore its registers: it would return -ENOSYS from clone3 and glibc would fall
        # back to clone(), making a second kernel thread for one pthread (same TLS).
        self._in_clone: set[int] = set()
        self._exiting: set[int] = set()  # threads seen in PTRACE_EVENT_EXIT, not yet reaped
        self._new: set[int] = set()  # auto-attached threads whose first stop is not reaped
        self._pending: dict[int, list[int]] = {}  # tid -> real signals to re-inject on resume
        self.cache: dict[str, int] = {}  # facts about the target found once (remote.py)
        self.rewound: list[int] = []  # tids whose -EINTR syscall the last stop() restarted
        self._regs_tids: list[int] = []  # row i of _regs belongs to _regs_tids[i]
        self._regs: npt.NDArray[np.uint64] | None = None
        self._regs_ptrs: list[ctypes.c_void_p] = []
        self._closed = False
        self.killed_by = 0  # the signal that ended the process, if we saw it die
        self._op_depth = 0  # inside a method that waits for/resumes threads (_op)
        self._chld_pending = False  # a SIGCHLD came while busy: service when idle
        # what signal.signal returned: a handler, SIG_DFL/SIG_IGN, or None (set outside Python)
        self._old_sigchld: Callable[[int, FrameType | None], Any] | int | signal.Handlers | None = (
            None
        )
        # numpy is imported lazily by the package, but never inside a stop: its first
        # import (~50-100 ms) used to hold every thread of the target stopped
        import numpy  # noqa: F401

        # What the target felt: every stop() .. resume() holds all its threads stopped;
        # hold_one() .. release_one() one thread (the host of a remote call); detach() each
        # thread for a moment. The longest time any thread was held, the same without the
        # host's holds, and the most threads held at once.
        self._stop_began = 0.0
        # when the last round of interrupts of the current window began: the window proper
        # (earlier rounds let the quick threads run on while laggards stopped, see stop())
        self.window_began = 0.0
        self.stagger_budget = STAGGER_BUDGET  # 0: never stagger
        self.stagger_wait = STAGGER_WAIT
        self.stop_timeout = STOP_TIMEOUT
        self._peek_args = _PeekSiginfoArgs(0, 0, 32)
        self._peek_buf = ctypes.create_string_buffer(32 * SIGINFO_SIZE)
        self.staggered = 0  # rounds the last stop() let quick threads run on
        self._host: tuple[int, float] | None = None  # (tid, since) of the held host thread
        self._host_rt: contextlib.AbstractContextManager[None] | None = None
        # the helper thread idle on a futex that hosted the last hold (a FIFO of one)
        self._idle_hosts: list[int] = []
        self.stopped_max_us = 0.0
        self.others_stopped_max_us = 0.0
        self.host_stopped_max_us = 0.0
        self.threads_stopped_max = 0
        if not process_alive(pid):
            raise TargetGone(f"process {pid} does not exist")
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):  # ESRCH: it died meanwhile
            raise TargetGone(f"process {pid} does not exist") from None
        except PermissionError as e:
            raise NoPermission(
                f"cannot open the memory of process {pid}: {e.strerror}",
                advice="run as root or as the owner of the process",
            ) from None
        # how the process ended, when it ends while none of its threads is traced
        self._pidfd = -1
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)
        try:
            release_orphans()
            self._check_traceable()
        except BaseException:
            self._abandon()
            raise
        self._service_on_sigchld()

    # ------------------------------------------------------------ prompt servicing

    def _service_on_sigchld(self) -> None:
        """Collect what traced threads report as it happens, also while livesplice does
        other work (matching, fsync, building code) between its remote calls.

        Outside a window few threads are traced: one let go past its exit stop, whose end
        we must reap before its real parent can (a dying target stays a zombie until then),
        or one we could not let go yet (waiting in vfork()), which stops at each signal and
        at our interrupt until it is detached. Each such event sends SIGCHLD to the tracer;
        Python runs the handler on the main thread between bytecodes (also during sleeps),
        where -- if no Tracee operation is under way -- it services the threads. ptrace
        requests must come from the tracing thread: only a Tracee made on the main thread
        does this.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        with contextlib.suppress(ValueError, OSError):
            self._old_sigchld = signal.signal(signal.SIGCHLD, self._on_sigchld)

    def _on_sigchld(self, signum: int, frame: FrameType | None) -> None:
        old = self._old_sigchld
        if callable(old):
            old(signum, frame)
        self._chld_pending = True
        self._service_if_idle()

    def _service_if_idle(self) -> None:
        """Service now unless a Tracee operation, a held host thread or a stop of every
        thread is under way (their own waits collect the stops)."""
        if self._closed or self._op_depth or self._host is not None or self._stop_began:
            return
        self._chld_pending = False
        with contextlib.suppress(LivespliceError):
            self.service()

    def serve_while(self, fn: Callable[[], _R]) -> _R:
        """Run ``fn`` -- blocking work that needs no ptrace request: an fsync of the
        journal, a scan of the program's memory -- on a worker thread, while this (the
        tracing) thread keeps collecting what traced threads report (see
        :meth:`_service_on_sigchld`: exits to reap, a thread left traced after vfork()).

        Why: Python runs the SIGCHLD handler only between bytecodes of the main thread, so
        blocking C work there left those threads waiting for its whole length (a journal
        fsync took tens of ms on a busy disk). The wait for the worker is interrupted by
        each SIGCHLD (blocked in the worker so that it reaches this thread) -- but the
        kernel may hand a SIGCHLD to any other thread of the tool (a progress display, the
        manager page's server), which does not wake this one, and with a host thread held
        the handler defers. So the loop also looks every 2 ms (one ``waitid(WNOWAIT)``, see
        :meth:`_events_waiting`). Inside a stop window nothing runs: ``fn`` runs here.
        """
        if (
            self._closed
            or self._stop_began
            or threading.current_thread() is not threading.main_thread()
        ):
            return fn()
        result: list[_R] = []
        error: list[BaseException] = []

        def work() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                result.append(fn())
            except BaseException as e:  # handed to the caller's thread
                error.append(e)

        worker = threading.Thread(target=work, name="livesplice-blocking", daemon=True)
        worker.start()
        while worker.is_alive():
            if not self._op_depth and self._events_waiting():
                self.service()  # a held host is skipped (it is in _stopped)
            worker.join(0.002)
        if error:
            raise error[0]
        return result[0]

    def _events_waiting(self) -> bool:
        """Whether any child or tracee has a stop or exit to collect: one ``waitid`` with
        WNOWAIT (nothing is consumed) instead of a ``waitpid`` per thread. The tool's own
        unreaped children also answer: then the threads are serviced for nothing."""
        try:
            flags = os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT | WALL
            return os.waitid(os.P_ALL, 0, flags) is not None
        except ChildProcessError:
            return False

    def _restore_sigchld(self) -> None:
        """Put the caller's SIGCHLD handler back with SIGCHLD blocked for the swap.

        A SIGCHLD caught by CPython's C-level handler just before the swap would otherwise be
        run after it, finding the default disposition: CPython then writes "OSError: Signal
        17 ignored due to race condition" to the user's terminal (seen once in 30 soak
        cycles under thread churn). Blocking runs handlers already caught (pthread_sigmask
        checks for them); one arriving during the swap stays pending in the kernel and is
        delivered to the restored disposition.

        The default disposition itself is not put back but :func:`_ignore_sigchld`, a
        Python handler that does nothing -- the same for SIGCHLD, whose default action is
        to ignore it: a SIGCHLD the kernel hands to another thread of the tool just before
        the swap is caught by CPython's C handler there and run later by the main thread,
        which no block in this thread prevents (CPython's bpo-43406); still seen under load
        with the swap blocked ("Exception ignored ... OSError: Signal 17 ignored due to race
        condition" on stderr of an apply).
        """
        if self._old_sigchld is None:
            return
        old = self._old_sigchld
        if old == signal.SIG_DFL:
            old = _ignore_sigchld
        with contextlib.suppress(ValueError, OSError):
            was = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                signal.signal(signal.SIGCHLD, old)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, was)
        self._old_sigchld = None

    # ------------------------------------------------------------ attach / detach

    def _check_traceable(self) -> None:
        """At attach, without tracing anything: a live thread exists and no other tracer
        holds one (PTRACE_SEIZE would fail with EPERM; say by whom now, not half-way)."""
        live = self._live_threads()
        if not live:
            raise TargetGone(f"process {self.pid} has no live thread")
        for tid in live:
            tracer = _tracer_of(self.pid, tid)
            if tracer and _ORPHANS.get(tid) != self.pid:
                raise NoPermission(
                    f"cannot trace thread {tid} of process {self.pid}: already traced by "
                    f"pid {tracer}",
                    advice="detach the other tracer (a debugger, strace) and run again",
                )

    def _live_threads(self) -> list[int]:
        """The process's threads (/proc/PID/task) but zombies: an exited leader is listed
        until the whole process ends."""
        return [t for t in self._listed() if not _is_zombie(self.pid, t)]

    def _listed(self) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError:
            raise TargetGone(f"process {self.pid} exited") from None

    @_op
    def seize_all(self) -> None:
        """Seize (not stop) every thread not traced yet, as the first step of :meth:`stop`;
        a stop window calls it just before its timed part.

        Reads each thread's state first (/proc, ~5 µs a thread, while the program runs):
        a thread waiting in ``vfork()`` is waited for here, before anything is traced, since
        once interrupted it could not be let go before its child execs or exits -- for
        VFORK_HOST_WAIT s at most (the child of a posix_spawn() execs within moments, but
        on a loaded machine a program spawning in a loop was found in vfork() at every
        attempt: CODE_BUSY).

        :raises ThreadInVfork: a thread stayed in vfork(); nothing was traced.
        """
        if self._closed:
            raise TargetGone(f"process {self.pid}: tracee already detached")
        until = time.monotonic() + VFORK_HOST_WAIT
        while True:
            fresh = [t for t in self._listed() if t not in self._tids]
            vforking = [t for t in fresh if self._in_vfork(t)]
            if not vforking:
                break
            if time.monotonic() > until:
                raise ThreadInVfork(self.pid, vforking[0])
            time.sleep(0.002)
        for tid in fresh:
            self._seize(tid, OPTS_WINDOW)

    def _seize_fresh(self) -> list[int]:
        """Seize the threads listed in /proc/PID/task and not traced yet (inside stop():
        no state read first, a zombie answers EPERM); the ones seized.

        :raises ProgramReplaced: a thread not traced is replacing the program (execve), see
            :meth:`_refuse_exec`.
        """
        fresh = [t for t in self._listed() if t not in self._tids]
        if fresh and (self.staggered or self._exiting or self._events_waiting()):
            self._refuse_exec(fresh)
        return [t for t in fresh if self._seize(t, OPTS_WINDOW)]

    def _refuse_exec(self, untraced: list[int]) -> None:
        """Raise TargetGone if one of ``untraced`` waits in execve() for the other threads
        to end.

        Why: such a thread holds the process's ``cred_guard_mutex``, which PTRACE_SEIZE
        takes too, while it waits (de_thread) for every other thread to exit -- and a thread
        we hold, killed by the exec, waits in its exit stop for us: PTRACE_SEIZE never
        returned, tool and target hung for good (seen when a quick thread let go by
        :meth:`_stagger` exec'd while the laggard was held). Looked at when the untraced
        threads ran while we held others (a stagger) or something is ending (an exit stop
        collected or waiting: an exec in de_thread() shows so); the look costs a /proc
        read per untraced thread. Left open: an exec'ing thread on a CPU at the look
        ("running", no system call shown) or entering execve just after it. The program to
        update is going away: the window is refused, and :meth:`stop` lets the threads it
        holds go at once (the exiting ones with them), so the exec completes.
        """
        for tid in untraced:
            if _syscall_nr(self.pid, tid) in (SYS_EXECVE, SYS_EXECVEAT):
                raise ProgramReplaced(self.pid, tid)

    def _seize(self, tid: int, opts: int) -> bool:
        """PTRACE_SEIZE one thread; False for a thread that is gone or a zombie.

        :raises NoPermission: another tracer, Yama, another user.
        """
        if self._ptrace(PTRACE_SEIZE, tid, 0, opts) == 0:
            self._tids.append(tid)
            return True
        err = ctypes.get_errno()
        if err == 3:  # ESRCH: the thread exited meanwhile
            return False
        if err == 1 and _is_zombie(self.pid, tid):
            return False  # an exited leader (pthread_exit): nothing to stop or scan
        tracer = _tracer_of(self.pid, tid)
        if err == 1 and tracer == os.getpid():
            if _ORPHANS.pop(tid, None) == self.pid:
                # left traced by an earlier Tracee (it was in vfork): its interrupt is
                # still pending, it stops once its child execs or exits
                self._tids.append(tid)
                return True
            if self._tids:
                # auto-attached child of a thread we seized: its first stop is pending
                self._tids.append(tid)
                self._new.add(tid)
                return True
        if not process_alive(self.pid):
            raise TargetGone(f"process {self.pid} exited while attaching")
        if err == 1 and (tid in self._exiting or _past_exit_event(self.pid, tid)):
            # ptrace_attach answers EPERM for a task that has exit_state set: the thread
            # exited between our zombie check and the seize -- or one still traced by us,
            # let go past its exit stop (a killed process: its end not reaped yet)
            return False
        who = f" (already traced by pid {tracer})" if tracer else ""
        raise NoPermission(
            f"cannot trace thread {tid} of process {self.pid}: {os.strerror(err)}{who}",
            advice="run as root, detach the other tracer, or allow ptrace "
            "(sysctl kernel.yama.ptrace_scope=0)",
        )

    def _reap_exiting(self, timeout: float = 2.0) -> None:
        """Collect the end of every thread let go past its exit stop.

        Until its tracer collects it, an exited tracee's end is not reported to its real
        parent: a dying target would stay a zombie its parent cannot reap -- for as long as
        livesplice runs, which for the agent is forever. A thread past its exit stop ends
        within moments; wait for that (bounded)."""
        deadline = time.monotonic() + timeout
        while self._exiting and time.monotonic() < deadline:
            for tid in list(self._exiting):
                self._reap_exit(tid)
            if self._exiting:
                time.sleep(0.001)

    def _abandon(self) -> None:
        """Closing without ptrace: the kernel detaches our tracees when we exit."""
        self._restore_sigchld()
        self._drop_realtime()
        self._reap_exiting()
        if not self._closed:
            self._closed = True
            if not self.killed_by and not process_alive(self.pid):
                self.killed_by = _ended_by_signal(self.pid, self._pidfd)
            os.close(self._mem)
            if self._pidfd >= 0:
                os.close(self._pidfd)

    @_op
    def detach(self) -> None:
        """Let go of every thread still traced, re-injecting recorded signals; the process
        runs on. Outside a window and a hold nothing is traced but a thread that could not
        be let go yet (see :meth:`_let_go_running`). Never raises for a process that went
        away.
        """
        if self._closed:
            return
        self._restore_sigchld()
        try:
            all_stopped = bool(self._stop_began)
            held = len(self._stopped)
            # SCHED_FIFO like every other hold: descheduled between a thread's stop and its
            # detach, the tool held it for whole time slices (2.9 ms seen at load 6)
            with realtime(priority=self.rt_priority()):
                for tid in list(self._tids):
                    if tid in self._stopped:
                        self._let_go(tid)
                    else:
                        self._let_go_running(tid)
            if all_stopped:
                self._account_stop(held)
            elif self._host is not None:
                self._note_hold(self._host[1], 1, hosted=True)
                self._host = None
            self._tids.clear()
            self._stopped.clear()
            release_orphans()
        finally:
            self._abandon()

    def _let_go(self, tid: int) -> None:
        """End our hold on one stopped thread: PTRACE_DETACH, or, for a thread past its
        exit stop, PTRACE_CONT (its end is reaped by us: how a dying process ended)."""
        if tid in self._exiting:
            self._cont(tid)
            return
        self._detach_stopped(tid)
        self._forget(tid)

    def _let_go_running(self, tid: int, wait: float = 0.2) -> None:
        """Let go of a thread traced but not stopped (PTRACE_DETACH needs a ptrace-stop).

        An auto-attached thread or one with our interrupt pending stops within moments;
        a thread waiting in ``vfork()`` only when its child execs or exits. Waiting for that
        without a bound made detach() last the child's whole life (forever for a child
        that never execs): after ``wait`` s the thread is left to :func:`release_orphans`
        (the agent's loop, the next Tracee, or this process's exit lets it go).
        """
        began = time.perf_counter()
        if tid not in self._new:
            self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)
        deadline = time.monotonic() + wait
        while tid in self._tids and tid not in self._stopped:
            try:
                got, status = os.waitpid(tid, WALL | os.WNOHANG)
            except ChildProcessError:
                self._forget(tid)
                return
            if got:
                self._on_status(tid, status)
                continue
            if time.monotonic() > deadline:
                _ORPHANS[tid] = self.pid
                self._forget(tid)
                return
            time.sleep(0.001)
        if tid in self._stopped:
            self._let_go(tid)
            self._note_hold(began, 1, hosted=False)

    def _detach_stopped(self, tid: int) -> None:
        sigs = self._pending.pop(tid, [])
        if sigs and tid not in self._signal_stop:
            for s in sigs:
                self._lib.syscall(SYS_TGKILL, self.pid, tid, s)
            sigs = []
        for s in sigs[1:]:
            self._lib.syscall(SYS_TGKILL, self.pid, tid, s)
        if self._ptrace(PTRACE_DETACH, tid, 0, sigs[0] if sigs else 0) != 0:
            self._after_failed_detach(tid)
        self._stopped.discard(tid)

    def _after_failed_detach(self, tid: int) -> None:
        """PTRACE_DETACH failed: the thread is in no ptrace stop any more -- a SIGKILL woke it
        (a traced thread wakes for SIGKILL only). It heads for its exit stop, where it would
        wait for us for ever, and the thread-group leader's end with it: the parent could
        never reap the killed program (seen: a zombie leader and a thread in its exit stop,
        traced by a livesplice that had let go of everything). Collect that stop, let the
        thread go and leave its end to be reaped (:meth:`_reap_exiting`)."""
        self._stopped.discard(tid)
        self._signal_stop.discard(tid)
        self._wait_until_in(tid, self._exiting)
        if tid in self._stopped:
            self._cont(tid)

    def _in_vfork(self, tid: int) -> bool:
        """Whether ``tid`` waits in ``vfork()`` (``clone``/``clone3`` with CLONE_VFORK) for
        its child to exec or exit.

        Why: that wait is killable only, so PTRACE_INTERRUPT stops the thread only when the
        child is done -- which can be never -- while the child runs the program's code in its
        memory. A stop of every thread that waited for it held all the other threads
        stopped for the child's whole life (2 s for a child sleeping 2 s before ``_exit``).
        Such a thread is in state D inside one of the three calls (/proc/PID/task/TID/syscall).
        """
        if task_state(self.pid, tid) != "D":
            return False
        try:
            with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            return False
        if len(fields) < 2 or not fields[0].isdigit():
            return False  # "running", or -1: not in a system call
        nr, arg0 = int(fields[0]), int(fields[1], 16)
        if nr == SYS_VFORK:
            return True
        if nr == SYS_CLONE:
            return bool(arg0 & CLONE_VFORK)
        if nr == SYS_CLONE3:  # arg0 points to struct clone_args, whose first field is flags
            try:
                flags = int.from_bytes(self.read(arg0, 8), "little")
            except LivespliceError:
                return True  # cannot tell: a clone3 blocked in D is as good as a vfork
            return bool(flags & CLONE_VFORK)
        return False

    def _stop_thread(self, tid: int) -> bool:
        """Interrupt one running thread and wait for its stop; False if it is gone, or waits
        in vfork() (see :meth:`_await_stop`).

        The stop may be another one that came first (a signal, a clone event, its exit):
        recorded like any. A system call the interrupt turned into -EINTR is rewound, as
        :meth:`stop` does for all threads.
        """
        if tid not in self._new:
            self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)
        if not self._await_stop(tid):
            return False
        if self.restart_eintr and tid not in self._exiting and tid not in self._in_clone:
            with contextlib.suppress(LivespliceError):
                self._rewind_eintr(tid, self.get_regs(tid))
        return True

    def _await_stop(self, tid: int) -> bool:
        """Wait for the stop of one thread we interrupted; False if it went away, waits in
        ``vfork()``, or did not stop within ``stop_timeout`` s.

        Why not a plain blocking waitpid: a thread that entered vfork() after the host
        candidates were listed stops only when its child execs or exits -- never, for a
        child that sleeps. A thread silent for 2 ms is looked at (/proc: only then, the
        common stop costs no read); one in vfork() stays traced with our interrupt
        pending, let go once it stops (:meth:`service`, :meth:`detach`, the next Tracee).
        """
        deadline = time.monotonic() + self.stop_timeout
        while tid in self._tids and tid not in self._stopped:
            status = self._waitpid_within(tid, 0.002)
            if status is not None:
                self._on_status(tid, status)
            elif self._in_vfork(tid) or time.monotonic() > deadline:
                return False  # or stuck in a wait: let go once it stops, like vfork
        return tid in self._tids and tid in self._stopped

    def _waitpid_within(self, tid: int, timeout: float) -> int | None:
        """The next wait status of ``tid`` if it comes within ``timeout`` s, else None; a
        thread gone reads as status 0 (exited). Never a busy loop: livesplice runs
        SCHED_FIFO while it holds a thread, and a spin would keep a CPU from the very thread
        it waits for (see :func:`_waitpid_until`)."""
        with _sigchld_blocked():
            return _waitpid_until(tid, time.monotonic() + timeout)

    # ------------------------------------------------------------ one host thread

    @_op
    def hold_one(self, thread: int | None = None) -> int:
        """Seize and stop ONE thread to run code on (a remote system call or call); the others
        run on, untraced.

        ``thread``: that one; otherwise a thread sleeping in a system call when there is one
        (one idle on a futex first, the leader last): holding a thread that was waiting
        anyway costs the program least.
        Undo with :meth:`release_one`.

        :raises TargetStopped: the process is job-stopped (SIGSTOP); it stays so.
        :raises TargetGone: no thread is left.
        """
        assert self._host is None, "one host thread at a time"
        self.service()
        # SCHED_FIFO from before the thread stops (not from after: the switch itself was
        # inside the hold), until release_one
        rt = realtime(priority=self.rt_priority())
        rt.__enter__()
        try:
            tid = self._hold_one(thread)
        except BaseException:
            rt.__exit__(None, None, None)
            raise
        self._host_rt = rt
        return tid

    def _hold_one(self, thread: int | None) -> int:
        vfork_until = time.monotonic() + VFORK_HOST_WAIT
        rounds = 0
        while rounds < 3:
            candidates, in_vfork = self._host_candidates(thread)
            if not candidates and in_vfork:
                # every thread waits in vfork(): the children of a posix_spawn() exec within
                # moments, a child that sleeps may never -- refuse instead of waiting for it
                if time.monotonic() > vfork_until:
                    raise ThreadInVfork(self.pid, in_vfork[0])
                time.sleep(0.005)
                continue
            rounds += 1
            for tid in candidates:
                began = time.perf_counter()
                if tid not in self._tids and not self._seize(tid, OPTS_HOST):
                    continue  # gone meanwhile
                stopped = self._stop_thread(tid)
                for _ in range(8):
                    if not stopped or tid not in self._in_clone:
                        break
                    # inside clone()/clone3() (its event trap cleared our interrupt): let it
                    # finish the call, then interrupt it again
                    self._cont(tid)
                    stopped = self._stop_thread(tid)
                if not stopped:
                    continue
                if tid in self._fit_threads():
                    self._host = (tid, began)
                    self._read_all_regs()  # the stop cache: this thread's registers only
                    return tid
                job_stopped = tid in self._group_stop
                # exiting, job-stopped (detached, it stays so), or forever in clone()
                self._let_go(tid)
                self._note_hold(began, 1, hosted=True)
                if job_stopped:
                    raise TargetStopped(
                        f"process {self.pid} is stopped (SIGSTOP/SIGTSTP); nothing was "
                        "changed and it stays stopped",
                        advice=f"continue it (kill -CONT {self.pid}) and run the command again",
                    )
            self.service()
        if not process_alive(self.pid) or not self._live_threads():
            raise TargetGone(f"process {self.pid} exited")
        vforking = in_vfork or [t for t in self._tids if t not in self._stopped]
        if vforking:  # left out, or entered vfork() while we stopped it
            raise ThreadInVfork(self.pid, vforking[0])
        raise TargetGone(f"process {self.pid} has no thread to run code on")

    def _host_candidates(self, thread: int | None) -> tuple[list[int], list[int]]:
        """The threads fit to host a call, best first, and the ones left out because they
        wait in vfork() (state D): such a thread stops only when its child execs or exits,
        which may be never."""
        listed = self._listed()
        if thread is not None:
            if thread not in listed or _is_zombie(self.pid, thread):
                return [], []
            return ([], [thread]) if self._in_vfork(thread) else ([thread], [])
        order = [*(t for t in listed if t != self.pid), *(t for t in listed if t == self.pid)]
        states = {t: task_state(self.pid, t) for t in order[:64]}
        order = [t for t in order if states.get(t) not in ("Z", "X")]
        vfork = [t for t, st in states.items() if st == "D" and self._in_vfork(t)]
        sleeping = [t for t, st in states.items() if st in ("S", "D") and t not in vfork]
        # Best: a helper thread idle on a futex (a pool or background thread waiting for
        # work: redis's bio threads) -- holding it delays nobody. Then any other sleeping
        # thread, the leader last: it is often the event loop or the accepting thread, where
        # every client waits for the hold (it hosted 14 of 15 holds in a redis soak).
        idle = [t for t in sleeping if t != self.pid and _syscall_nr(self.pid, t) == SYS_FUTEX]
        # the idle thread of the last hold first: just let go, it may not be back in its wait
        last = [t for t in self._idle_hosts[-1:] if t in states and t not in vfork]
        self._idle_hosts = [*last, *idle][:1]
        fit = dict.fromkeys([*last, *idle, *sleeping, *(t for t in order if t not in vfork)])
        return list(fit), vfork

    @_op
    def release_one(self, tid: int) -> None:
        """Detach the thread :meth:`hold_one` returned (re-injecting a signal it got while
        held); then collect what threads still traced reported meanwhile (exits)."""
        host, self._host = self._host, None
        try:
            if tid in self._stopped and tid in self._tids:
                self._let_go(tid)
        finally:
            if host is not None:
                self._note_hold(host[1], 1, hosted=True)
            self._drop_realtime()
        self.service()

    def rt_priority(self) -> int:
        """The SCHED_FIFO priority for livesplice while it holds threads of this program:
        one above its highest real-time thread (1 for a program with none; at most 99).

        Why (priority inheritance, as a kernel rt_mutex gives a lock holder the priority of
        its highest waiter): the program's threads wait for a hold to end like for a lock
        livesplice holds. At priority 1 the tool was preempted by the program's own
        real-time threads -- a SCHED_FIFO 5 server and its clients -- in the middle of a
        hold, which then lasted their whole bursts (kvserver soak under --rt-load 5: holds
        up to 3.6 ms, requests up to 2.6 ms). Read from the threads' scheduling parameters
        (two system calls a thread, before the hold); 1 when they cannot be read.
        """
        best = 0
        try:
            tids = self._listed()
        except TargetGone:
            return 1
        for tid in tids:
            try:
                if os.sched_getscheduler(tid) in (os.SCHED_FIFO, os.SCHED_RR):
                    best = max(best, os.sched_getparam(tid).sched_priority)
            except OSError:
                continue  # gone meanwhile
        return min(best + 1, 99)

    def _drop_realtime(self) -> None:
        """Back to the old scheduling policy once no host thread is held."""
        rt, self._host_rt = self._host_rt, None
        if rt is not None:
            rt.__exit__(None, None, None)

    def _note_hold(self, began: float, threads: int, *, hosted: bool) -> None:
        held = (time.perf_counter() - began) * 1e6
        self.stopped_max_us = max(self.stopped_max_us, held)
        if hosted:
            self.host_stopped_max_us = max(self.host_stopped_max_us, held)
        else:
            self.others_stopped_max_us = max(self.others_stopped_max_us, held)
        self.threads_stopped_max = max(self.threads_stopped_max, threads)

    def __enter__(self) -> Tracee:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    # ------------------------------------------------------------ threads

    def threads(self) -> list[int]:
        """The program's threads: inside a stop window the ones held (live, not exiting);
        outside, the live ones /proc/PID/task lists (none of them traced but a held host)."""
        if self._stop_began:
            return list(self._tids)
        return self._live_threads()

    def exiting_threads(self) -> list[int]:
        """Threads let go past their exit stop: they run no user code any more."""
        return sorted(self._exiting)

    def is_stopped(self) -> bool:
        """Inside a stop window, every thread in a ptrace stop (the window may write). A held
        host alone is not: the program's other threads run."""
        return bool(self._stop_began and self._tids) and len(self._stopped) == len(self._tids)

    def thread_name(self, tid: int) -> str:
        """The thread's name (/proc/PID/task/TID/comm; "?" once it is gone), for refusals that
        name the busy thread."""
        try:
            with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                return f.read().rstrip("\n")
        except OSError:
            return "?"

    def _forget(self, tid: int) -> None:
        if tid in self._tids:
            self._tids.remove(tid)
        self._stopped.discard(tid)
        self._signal_stop.discard(tid)
        self._group_stop.discard(tid)
        self._in_clone.discard(tid)
        self._new.discard(tid)
        self._pending.pop(tid, None)

    def _reap_exit(self, tid: int) -> None:
        try:
            pid, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            pid, status = tid, 0
        if pid:
            if os.WIFSIGNALED(status):
                self.killed_by = os.WTERMSIG(status)
            self._exiting.discard(tid)

    # ------------------------------------------------------------ wait-status handling

    def _on_status(self, tid: int, status: int) -> list[int]:
        """Record one wait status of ``tid``; the thread is left stopped (or gone).

        Returns the tids of threads this event created (their first stop comes separately).
        """
        if not os.WIFSTOPPED(status):  # exited or killed
            if os.WIFSIGNALED(status):
                self.killed_by = os.WTERMSIG(status)
            self._forget(tid)
            self._exiting.discard(tid)
            return []
        self._stopped.add(tid)
        self._new.discard(tid)
        event = status >> 16
        sig = os.WSTOPSIG(status)
        if sig == SYSCALL_STOP_SIG:
            self._signal_stop.discard(tid)  # a syscall-stop we asked for: no signal
            return []
        if event == 0:
            # signal-delivery-stop: keep the signal to re-inject at resume
            self._signal_stop.add(tid)
            self._pending.setdefault(tid, []).append(sig)
            return []
        self._signal_stop.discard(tid)
        if event == PTRACE_EVENT_STOP:
            if sig in _STOP_SIGNALS:
                self._group_stop.add(tid)  # job control stop (kill -STOP): keep it
            else:
                self._group_stop.discard(tid)
        elif event == PTRACE_EVENT_CLONE:
            self._in_clone.add(tid)
            msg = ctypes.c_ulong()
            if self._ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.byref(msg)) == 0:
                child = int(msg.value)
                if child not in self._tids:
                    self._tids.append(child)
                    self._new.add(child)  # a child inherits its creator's options
                    return [child]
        elif event == PTRACE_EVENT_EXIT:
            self._exiting.add(tid)
        return []

    def _cont(self, tid: int) -> None:
        """Let one stopped thread run (re-injecting its recorded signal when possible)."""
        sig = 0
        sigs = self._pending.pop(tid, [])
        if sigs and tid in self._signal_stop:
            sig = sigs.pop(0)  # injected by PTRACE_CONT: delivered right away
        for later in sigs:
            # only a signal-delivery-stop can inject; queue the others for that thread again
            # (they stop it once more; service()/stop()/detach() pass them on)
            self._lib.syscall(SYS_TGKILL, self.pid, tid, later)
        req = PTRACE_LISTEN if tid in self._group_stop else PTRACE_CONT
        self._ptrace(req, tid, 0, sig)  # ESRCH: killed meanwhile; its exit is reaped later
        self._in_clone.discard(tid)
        self._stopped.discard(tid)
        self._signal_stop.discard(tid)
        if tid in self._exiting and tid in self._tids:
            self._tids.remove(tid)  # it is leaving: never wait for it again

    @_op
    def service(self, skip: int = 0) -> None:
        """Without blocking, collect stops of running traced threads and let them go on.

        Passes signals through, starts threads created since, reaps exits. Outside a stop
        window a thread that stopped is let go for good (detached: it was traced only
        because it could not be let go before). ``skip``: a thread running our code, whose
        stops its runner collects.
        """
        if self._closed:
            return
        for tid in list(self._exiting):
            self._reap_exit(tid)
        # A clone event registers the child, whose first stop (PTRACE_EVENT_STOP) may
        # already be there: its SIGCHLD and the creator's can arrive as one, so the child
        # is looked at in this same pass. Measured before: new threads sat in that first
        # stop until some later event (40+ ms, stalling a thread-per-connection server).
        todo = list(self._tids)
        while todo:
            tid = todo.pop(0)
            if tid in self._stopped or tid == skip or tid not in self._tids:
                continue  # held stopped on purpose (inside stop() ... resume())
            while True:
                try:
                    pid, status = os.waitpid(tid, os.WNOHANG | WALL)
                except ChildProcessError:
                    self._forget(tid)
                    break
                if pid == 0:
                    break
                todo.extend(self._on_status(tid, status))
                if tid in self._stopped:
                    if self._stop_began:
                        self._cont(tid)
                    else:
                        self._let_go(tid)
                        break

    # ------------------------------------------------------------ stop / resume

    @_op
    def stop(self) -> None:
        """Stop every thread: seize the ones not traced, interrupt all, then wait for each.

        Threads created meanwhile are seized and waited for; exits are collected. Fills the
        registers cache (:meth:`stopped_regs`) and restarts system calls the interrupt
        turned into ``-EINTR`` (see the module docstring). Called again inside the window
        (after :meth:`let_run`), it stops the threads let run.

        :raises TargetGone: no thread is left (the process exited).
        :raises ThreadInVfork: a thread waits in vfork(); the program runs on unchanged.
        :raises ThreadWontStop: a thread did not stop in ``stop_timeout`` s; the same.
        :raises ProgramReplaced: a thread execs; what was held is let go.
        """
        if self._closed:
            raise TargetGone(f"process {self.pid}: tracee already detached")
        first = not self._stop_began
        if first:
            self.seize_all()  # a no-op when the window called it already
            self._stop_began = self.window_began = time.perf_counter()
            self.staggered = 0
        ptrace = self._ptrace
        # threads already in a stop we have not collected (a signal, a clone) stay stopped:
        # interrupting them now would leave a stale interrupt trap pending (resume's
        # PTRACE_DETACH drops it). Stops nobody collected yet are found by the waits below
        # like interrupt stops.
        running = [t for t in self._tids if t not in self._stopped]
        if not running:
            # already stopped: a SIGKILL since wakes traced threads into their exit stop
            self._collect_stopped()
        new = self._new
        for tid in running:
            if not new or tid not in new:
                ptrace(PTRACE_INTERRUPT, tid, 0, 0)
        try:
            if first and self.stagger_budget > 0 and running and not self._group_stop:
                self._stagger(running)
            else:
                self._await_stops(running)
            # the threads created before their creator stopped (seized with
            # PTRACE_O_TRACECLONE, the kernel seizes only the ones created after)
            while seized := self._seize_fresh():
                for tid in seized:
                    if tid not in new:
                        ptrace(PTRACE_INTERRUPT, tid, 0, 0)
                self._await_stops(seized)
        except (ThreadNotStopping, ProgramReplaced) as e:
            # let go what this stop holds; the thread in vfork() (or slow) stays traced with
            # our interrupt pending until it stops, then service()/detach() let it go. An
            # exec waits until the threads it killed are released, and a traced thread is
            # released only once its tracer reaped it: let them go and reap them now, not
            # when the caller is done with its error path
            self.resume()
            if isinstance(e, ProgramReplaced):
                self._reap_exiting(1.0)
            raise
        if self._exiting:
            self._settle_exits()
        self._check_live()
        self._read_all_regs()
        if self.restart_eintr:
            self._restart_interrupted_syscalls()

    def _stagger(self, queue: list[int]) -> None:
        """Wait for the stops of ``queue`` (just interrupted) like :meth:`_await_stops`, but
        do not hold the quick threads stopped while a laggard gets a CPU.

        Why: a thread stops only once it runs, and a normal-priority thread on a busy machine
        may wait for a CPU for tens of ms -- redis's bio threads, idle on a futex and woken by
        the interrupt, while a BGSAVE child and other jobs have both CPUs: the event loop,
        stopped within microseconds, waited with them (window p99 73 ms, every client
        waiting). So: a thread not stopped ``stagger_budget`` s after the interrupt is a
        laggard; the threads of this round already stopped are let go (detached, an -EINTR
        their stop caused rewound first) and run on until every laggard has stopped (held,
        it was waiting for a CPU anyway), then are seized and interrupted again. Laggards
        of earlier rounds stay held. After STAGGER_ROUNDS rounds, or when laggards do not
        stop within ``stagger_wait`` s, everything is stopped and waited for as before (the
        quick threads may be what keeps a laggard from a CPU).

        Accounting: the window proper (:attr:`window_began`) starts with the last round; a
        round's quick threads are noted as held for that round; laggards as held from the
        earliest moment the first of them can have stopped (:meth:`_await_stops_within`).
        """
        began = self._stop_began
        held: set[int] = set()  # laggards of earlier rounds, stopped
        for _ in range(STAGGER_ROUNDS):
            late, _, seen_running = self._await_stops_within(queue, self.stagger_budget)
            if not late:
                return
            quick = self._quick(late, held)
            if not quick and not held:
                # nobody stopped within the budget: on a loaded machine every thread may
                # wait for a CPU, the quick ones too. The first to stop are the quick ones
                # (else everything waited for the slowest: a 138 ms window seen under load)
                late, seen_running = self._await_first_stops(late, self.stagger_wait)
                if not late:
                    return
                quick = self._quick(late, held)
            asleep = self._asleep(quick)
            if not asleep:
                break
            # a quick thread stopped in user code has work: let go, it would take the very
            # CPU the laggards wait for (64 threads spinning on 2 CPUs: the window's p50 2.8
            # ms instead of 1.9); it stays held with the laggards
            busy = [t for t in quick if t not in asleep]
            held.update(busy)
            self._note_hold(began, len(asleep), hosted=False)
            for tid, r in asleep.items():
                if self.restart_eintr and tid not in self._in_clone and tid not in self._exiting:
                    with contextlib.suppress(LivespliceError):
                        self._rewind_eintr(tid, r)
                self._let_go(tid)
            self.staggered += 1
            late, first, _ = self._await_stops_within(late, self.stagger_wait, seen_running)
            for tid in late:
                if self._in_vfork(tid):  # a child that does not exec: no stop until it does
                    raise ThreadInVfork(self.pid, tid)
            held.update(t for t in self._tids if t in self._stopped)
            # the window proper: stop the quick threads again (and any created meanwhile)
            began = self.window_began = time.perf_counter()
            if self.staggered == 1 and not busy:
                # held since: this round's laggards (busy threads kept held: since the start)
                self._stop_began = min(first, began)
            queue = self._seize_fresh()
            for tid in queue:
                if tid not in self._new:
                    self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)
            if late:
                # a laggard still not stopped: maybe the quick threads keep it from a CPU
                # (a spinning SCHED_FIFO thread). Stop everything, wait as long as it takes
                break
        self._await_stops([t for t in self._tids if t not in self._stopped])

    def _asleep(self, quick: list[int]) -> dict[int, Regs]:
        """Of the quick threads, the ones stopped inside a system call (asleep: an event loop
        in epoll_wait, a worker in read or on a futex; a thread just created), with their
        registers; not the ones stopped in user code (orig_rax -1: they were running)."""
        out: dict[int, Regs] = {}
        for tid in quick:
            with contextlib.suppress(LivespliceError):
                r = self.get_regs(tid)
                if not r.orig_rax >> 63:
                    out[tid] = r
        return out

    def _quick(self, late: list[int], held: set[int]) -> list[int]:
        """The threads :meth:`_stagger` lets run on: stopped, not a laggard (of this round,
        ``late``, or of an earlier one, ``held``), not job-stopped."""
        return [
            t
            for t in self._tids
            if t in self._stopped and t not in late and t not in held | self._group_stop
        ]

    def _await_first_stops(self, queue: list[int], timeout: float) -> tuple[list[int], float]:
        """Wait up to ``timeout`` s until some thread of ``queue`` (interrupted, none stopped
        yet) stops, give the others the stagger budget more; the ones not stopped then, and
        when they were last seen running (see :meth:`_await_stops_within`)."""
        deadline = time.monotonic() + timeout
        nap = _FIRST_NAP
        with _sigchld_blocked():
            while queue and not any(t in self._stopped for t in queue):
                for tid in queue:
                    try:
                        got, status = os.waitpid(tid, WALL | os.WNOHANG)
                    except ChildProcessError:
                        got, status = tid, 0
                    if got:
                        queue = queue + self._on_status(tid, status)
                        break  # the queue changed
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    signal.sigtimedwait({signal.SIGCHLD}, min(left, nap))
                    nap = min(nap * 2, 0.001)
                queue = [t for t in queue if t in self._tids]
        late, _, seen_running = self._await_stops_within(
            [t for t in queue if t not in self._stopped], self.stagger_budget
        )
        return late, seen_running

    def _await_stops_within(
        self, queue: list[int], timeout: float, since: float = 0.0
    ) -> tuple[list[int], float, float]:
        """Collect stops of ``queue`` (and of children clone events report) for up to
        ``timeout`` s. Returns the threads not stopped by then; the earliest moment
        (perf_counter) any thread collected here can have stopped: the start of the scan
        before the one that found it (each scan looks at every thread still running, and
        a stop wakes the wait at once with its SIGCHLD), ``since`` for the first scan (when
        the caller last saw them running; default: now); and when the last scan began.
        A thread waiting in vfork() is late like any: its child may exec in a moment.
        """
        deadline = time.monotonic() + timeout
        pending = list(queue)
        earliest = math.inf
        previous = since or time.perf_counter()  # no stop collected below came before
        nap = _FIRST_NAP
        with _sigchld_blocked():
            while True:
                scan = time.perf_counter()
                for tid in list(pending):
                    while tid in self._tids and tid not in self._stopped:
                        status = _waitpid_until(tid, 0.0)
                        if status is None:
                            break
                        pending.extend(self._on_status(tid, status))
                    if tid not in self._tids or tid in self._stopped:
                        pending.remove(tid)
                        earliest = min(earliest, previous)
                previous = scan
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                signal.sigtimedwait({signal.SIGCHLD}, min(left, nap))
                nap = min(nap * 2, 0.001)
        return pending, earliest, previous

    def _await_stops(self, queue: list[int]) -> None:
        """Wait until each thread of ``queue`` (interrupted, or auto-attached and due for
        its first stop) is stopped; children reported by clone events are waited for too.

        :raises ThreadInVfork: a thread waits in vfork() (looked at every 10 ms while it
            does not stop: it may have entered the call after our interrupt).
        :raises ThreadWontStop: a thread did not stop within ``stop_timeout`` s.
        """
        new, stopped = self._new, self._stopped
        deadline = time.monotonic() + self.stop_timeout
        with _sigchld_blocked():
            while queue:
                more: list[int] = []
                for tid in queue:
                    fast = not new or tid not in new  # the interrupt stop of a running thread
                    while tid not in stopped and tid in self._tids:
                        status = _waitpid_until(tid, 0.0)
                        if status is None:
                            status = self._slow_stop(tid, deadline)
                        if fast and status == _INTERRUPT_STOP and not self._group_stop:
                            stopped.add(tid)
                            break
                        fast = False
                        more.extend(self._on_status(tid, status))
                queue = more

    def _slow_stop(self, tid: int, deadline: float) -> int:
        """The next wait status of a thread that did not stop at once (SIGCHLD blocked).

        A thread found in vfork() twice 10 ms apart is given up: the child of a
        posix_spawn() execs within moments (giving up at the first sight made a program
        spawning in a loop CODE_BUSY on a loaded machine), one that sleeps may never."""
        in_vfork = False
        while True:
            if self._in_vfork(tid):
                if in_vfork:
                    raise ThreadInVfork(self.pid, tid)
                in_vfork = True
            else:
                in_vfork = False
            status = _waitpid_until(tid, min(deadline, time.monotonic() + 0.01))
            if status is not None:
                return status
            if time.monotonic() >= deadline:
                raise ThreadWontStop(self.pid, tid, self.stop_timeout, task_state(self.pid, tid))

    def _collect_stopped(self) -> None:
        for tid in list(self._tids):
            try:
                pid, status = os.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                self._forget(tid)
                continue
            if pid:
                self._on_status(tid, status)

    @_op
    def check_alive(self) -> None:
        """Cheap check, while stopped, that the process is not exiting (one waitpid).

        A SIGKILL or an ``exit_group`` by the program wakes stopped threads into their exit
        stop (PTRACE_O_TRACEEXIT); the memory stays readable and writable until they are let
        go, so reads and writes alone do not notice.

        :raises TargetGone: every thread is exiting.
        """
        probe = next((t for t in self._tids if t not in self._exiting), None)
        if probe is None:
            raise TargetGone(f"process {self.pid} exited")
        try:
            pid, status = os.waitpid(probe, os.WNOHANG | WALL)
        except ChildProcessError:
            pid, status = probe, 0
        if not pid:
            return
        self._on_status(probe, status)
        self._collect_stopped()  # something happened: look at every thread
        if self._exiting:
            self._settle_exits()
        self._check_live()

    def _account_stop(self, held_threads: int) -> None:
        """Close the current all-threads-stopped interval: from before the first interrupt
        to after the last thread was let go."""
        if self._stop_began:
            self._note_hold(self._stop_began, held_threads, hosted=False)
            self._stop_began = 0.0

    @_op
    def resume(self) -> None:
        """Let every stopped thread run; re-inject real signals caught while stopped."""
        held = len(self._stopped)
        try:
            self._resume()
        finally:
            self._account_stop(held)

    def _resume(self) -> None:
        """PTRACE_DETACH every stopped thread (PTRACE_CONT for exiting ones: reaped by us);
        the auto-attached threads are let go at their first stop, due now."""
        if not (self._pending or self._group_stop or self._exiting):
            ptrace = self._ptrace
            failed = [
                t for t in self._tids if t in self._stopped and ptrace(PTRACE_DETACH, t, 0, 0)
            ]
            for tid in failed:
                self._after_failed_detach(tid)
            self._tids = [t for t in self._tids if t not in self._stopped]
            self._stopped.clear()
            self._signal_stop.clear()
            self._in_clone.clear()
        for tid in list(self._tids):
            if tid in self._stopped:
                self._let_go(tid)
        for tid in list(self._new):
            # a thread created by code we ran inside the target: its first stop is due now
            try:
                _, status = os.waitpid(tid, WALL)
            except ChildProcessError:
                self._forget(tid)
                continue
            self._on_status(tid, status)
            if tid in self._stopped:
                self._let_go(tid)
        for tid in list(self._exiting):
            self._reap_exit(tid)

    # ------------------------------------------------------------ registers

    def _read_all_regs(self) -> None:
        """PTRACE_GETREGS of every stopped thread into one preallocated uint64 array."""
        import numpy as np

        tids = [t for t in self._tids if t in self._stopped]
        if self._exiting:  # past their exit stop: they will never run user code again
            tids = [t for t in tids if t not in self._exiting]
        n = len(tids)
        if self._regs is None or self._regs.shape[0] < n:
            cap = max(16, 1 << (n - 1).bit_length())
            self._regs = np.zeros((cap, REGS_WORDS), dtype=np.uint64)
            base = self._regs.ctypes.data
            self._regs_ptrs = [ctypes.c_void_p(base + i * REGS_SIZE) for i in range(cap)]
        ptrace = self._ptrace
        bad = [
            tid
            for tid, ptr in zip(tids, self._regs_ptrs, strict=False)
            if ptrace(PTRACE_GETREGS, tid, 0, ptr)
        ]
        if bad:
            # Not in a ptrace-stop any more: a SIGKILL woke it (traced threads wake for
            # SIGKILL only). It heads for its exit stop or its end: wait for that.
            for tid in bad:
                self._stopped.discard(tid)
                self._wait_until_in(tid, self._stopped)
            self._check_live()
            self._read_all_regs()
            return
        self._regs_tids = tids

    def _settle_exits(self) -> None:
        """Some thread is exiting: if the whole process is (SIGKILL, exit_group), wait for
        every thread to reach its exit stop, so that we do not report a dying process alive.

        Both a fatal signal and exit_group() queue SIGKILL on every thread (the kernel's
        zap_other_threads), which also wakes threads in a ptrace-stop; a thread leaving on
        its own (pthread_exit) does neither.
        """
        for tid in list(self._tids):
            if tid in self._exiting:
                continue
            # a thread we hold stopped but not in a ptrace-stop ("t") was woken by SIGKILL
            if task_state(self.pid, tid) == "t" and not _sigkill_pending(self.pid, tid):
                continue
            self._stopped.discard(tid)
            self._wait_until_in(tid, self._exiting)

    def _wait_until_in(self, tid: int, reached: set[int]) -> None:
        """Collect ``tid``'s wait statuses until it is in ``reached`` (stopped, exiting)
        or gone."""
        while tid in self._tids and tid not in reached:
            try:
                _, status = os.waitpid(tid, WALL)
            except ChildProcessError:
                self._forget(tid)
                return
            self._on_status(tid, status)

    def _check_live(self) -> None:
        """Raise TargetGone, letting exiting threads finish, if no thread is left."""
        if [t for t in self._tids if t not in self._exiting]:
            return
        for tid in list(self._tids):
            if tid in self._stopped:
                self._cont(tid)
        raise TargetGone(f"process {self.pid} exited")

    def stopped_regs(self) -> tuple[list[int], npt.NDArray[np.uint64]]:
        """(tids, registers array) captured by the last :meth:`stop`; row i = tids[i].

        Columns follow :class:`Regs` field order (:data:`REG_INDEX`).
        """
        assert self._regs is not None
        return self._regs_tids, self._regs[: len(self._regs_tids)]

    def _restart_interrupted_syscalls(self) -> None:
        import numpy as np

        self.rewound = []
        tids, regs = self.stopped_regs()
        rax = regs[:, REG_INDEX["rax"]]
        if len(tids) <= 8:  # a few threads: cheaper without numpy calls
            cand = [i for i, v in enumerate(rax.tolist()) if v == EINTR_RAX]
        else:
            cand = np.flatnonzero(rax == np.uint64(EINTR_RAX)).tolist()
        for i in cand:
            if self._rewind_eintr(tids[i], Regs.from_buffer_copy(regs[i].tobytes())):
                self.rewound.append(tids[i])

    def _rewind_eintr(self, tid: int, r: Regs) -> bool:
        """Make a system call our interrupt failed with -EINTR run again; True if done."""
        if r.rax != EINTR_RAX or r.orig_rax >> 63:
            return False  # not -EINTR, or orig_rax -1: not stopped in a system call
        if tid in self._pending or tid in self._exiting:
            return False  # a real signal interrupted it: the program must see EINTR
        if self._unblocked_signal_queued(tid):
            return False
        try:
            if self.read(r.rip - 2, 2) != SYSCALL_INSN:
                return False
        except LivespliceError:
            return False
        r.rax = r.orig_rax
        r.rip -= 2
        self.set_regs(tid, r)
        return True

    def get_regs(self, tid: int) -> Regs:
        """The registers of a stopped thread."""
        regs = Regs()
        if self._ptrace(PTRACE_GETREGS, tid, 0, ctypes.byref(regs)) != 0:
            self._fail("PTRACE_GETREGS", tid)
        return regs

    def set_regs(self, tid: int, regs: Regs) -> None:
        """Set the registers of a stopped thread (and keep the stop's cache in step)."""
        if self._ptrace(PTRACE_SETREGS, tid, 0, ctypes.byref(regs)) != 0:
            self._fail("PTRACE_SETREGS", tid)
        if self._regs is not None and tid in self._regs_tids:
            row = self._regs_tids.index(tid)
            ctypes.memmove(self._regs_ptrs[row], ctypes.byref(regs), REGS_SIZE)

    def _gone(self) -> bool:
        """The process exited, or every thread we traced is past its exit (a killed
        process whose leader is a zombie while the others finish exiting: its memory is
        already gone)."""
        if process_dying(self.pid):
            return True
        return bool(self._tids) and all(t in self._exiting for t in self._tids)

    def _fail(self, what: str, tid: int) -> None:
        err = ctypes.get_errno()
        if self._gone():
            raise TargetGone(f"process {self.pid} exited")
        raise LivespliceError(f"{what} on thread {tid} of process {self.pid}: {os.strerror(err)}")

    # ------------------------------------------------------------ memory

    def read(self, addr: int, size: int) -> bytes:
        """Read target memory through /proc/PID/mem."""
        try:
            data = os.pread(self._mem, size, addr)
        except OSError as e:
            data = b""
            err: str = e.strerror or str(e)
        else:
            err = "short read"
        if len(data) != size:
            if self._gone():
                raise TargetGone(f"process {self.pid} exited")
            raise LivespliceError(
                f"cannot read {size} bytes at {addr:#x} in process {self.pid}: {err}"
            )
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Write target memory through /proc/PID/mem (works on read-only text: FOLL_FORCE)."""
        try:
            n = os.pwrite(self._mem, data, addr)
        except OSError as e:
            n = -1
            err: str = e.strerror or str(e)
        else:
            err = "short write"
        if n != len(data):
            if self._gone():
                raise TargetGone(f"process {self.pid} exited")
            raise LivespliceError(
                f"cannot write {len(data)} bytes at {addr:#x} in process {self.pid}: {err}"
            )

    # ------------------------------------------------------------ single thread control

    @_op
    def pick_thread(self) -> int:
        """A stopped thread fit to run code for us (the leader when possible).

        A thread with a recorded signal comes last: the signal is delivered after our code
        ran, and the fewer threads whose stop we reshape the closer the program stays to
        what it would have seen without us.
        """
        fit = self._fit_threads()
        if not fit and self._in_clone:
            # only threads inside clone(): let them finish the call, then stop them again
            self.let_run(sorted(self._in_clone))
            self.stop()
            fit = self._fit_threads()
        for tid in fit:
            if tid not in self._pending:
                return tid
        if fit:
            return fit[0]
        if self._group_stop:
            raise TargetStopped(
                f"process {self.pid} was stopped (SIGSTOP/SIGTSTP) while livesplice worked on "
                "it; nothing was changed and it stays stopped",
                advice=f"continue it (kill -CONT {self.pid}) and run the command again",
            )
        raise TargetGone(f"process {self.pid} has no stopped thread to run code on")

    def _fit_threads(self) -> list[int]:
        return [
            tid
            for tid in dict.fromkeys([self.pid, *self._tids])
            if tid in self._tids
            and tid in self._stopped
            and tid not in self._exiting
            and tid not in self._group_stop
            and tid not in self._in_clone
        ]

    @_op
    def let_run(self, tids: list[int]) -> None:
        """Resume only ``tids`` (stopped ones), re-injecting their recorded signals; the other
        threads stay stopped. :meth:`stop` stops them again."""
        for tid in tids:
            if tid in self._stopped and tid in self._tids:
                self._cont(tid)

    @_op
    def to_event_stop(self, tid: int) -> None:
        """Move a thread from the stop it is in (a syscall-stop, a signal-delivery-stop of a
        trap) into a ``PTRACE_EVENT_STOP``, without running any instruction of the program.

        Why: only in an event stop is the thread safe if we die and exact when we restore
        registers. If the tracer dies while a thread is in a signal-delivery-stop, the kernel
        delivers the signal (a single-step SIGTRAP kills the process; measured on this
        machine). And a syscall-exit-stop returns to user mode without the signal path, so a
        restored ``-ERESTARTSYS`` in ``rax`` would not be restarted; the event stop is inside
        that path (``get_signal``). ``PTRACE_INTERRUPT`` on a stopped thread traps it again
        as soon as it is continued, before it returns to user mode (ptrace(2): "If the
        tracee was already stopped by a signal and PTRACE_LISTEN was sent to it..."; kernel
        ``ptrace_interrupt`` comment: "another trap will happen after the current trap is
        ended with PTRACE_CONT"). Continuing with signal 0 drops a trap's SIGTRAP; a real
        signal stays recorded for :meth:`resume`.

        :raises TargetGone: the thread exited.
        """
        self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)
        if tid in self._stopped:
            self.run_thread(tid, PTRACE_CONT)
        # else running (a call that timed out): the interrupt stops it
        while True:
            _sig, event = self.wait_thread(tid) or (0, 0)
            if event == PTRACE_EVENT_STOP:
                return
            if event == PTRACE_EVENT_EXIT:
                raise TargetGone(f"process {self.pid} is exiting")
            # a real signal or a syscall-stop came first (a signal stays recorded, delivered
            # at resume): go on to the trap -- asked for again, since every ptrace stop
            # clears a pending interrupt (kernel/signal.c ptrace_stop: "any trap clears
            # pending STOP trap"). Without this, a thread interrupted inside a blocking
            # system call (a hook's read(), a stub's call waiting on a seccomp supervisor)
            # reported its syscall-exit-stop, was continued, restarted the call and blocked
            # again: the wait here never ended.
            self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)
            self.run_thread(tid, PTRACE_CONT)

    def get_fpregs(self, tid: int) -> bytes:
        """``struct user_fpregs_struct`` (the 512-byte FXSAVE image: x87, MXCSR, xmm0-15)."""
        buf = ctypes.create_string_buffer(512)
        if self._ptrace(PTRACE_GETFPREGS, tid, 0, buf) != 0:
            self._fail("PTRACE_GETFPREGS", tid)
        return buf.raw

    def set_fpregs(self, tid: int, image: bytes) -> None:
        """Write a thread's FPU/SSE state back (the 512-byte FXSAVE image PTRACE_GETFPREGS read)."""
        buf = ctypes.create_string_buffer(image, 512)
        if self._ptrace(PTRACE_SETFPREGS, tid, 0, buf) != 0:
            self._fail("PTRACE_SETFPREGS", tid)

    def get_xstate(self, tid: int) -> bytes | None:
        """The thread's whole user FPU/vector state: the standard-format XSAVE image (x87,
        SSE, the AVX upper halves, AVX-512, PKRU...) as ``PTRACE_GETREGSET NT_X86_XSTATE``
        gives it, or None where the CPU has no XSAVE (then :meth:`get_fpregs` is all).

        Its length is the kernel's user xstate size for this machine's XCR0 (what CPUID leaf
        0xD reports), so it is also the size of an area ``xsave`` fills in user mode.
        """
        buf = ctypes.create_string_buffer(XSTATE_MAX)
        iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), XSTATE_MAX)
        if self._ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.byref(iov)) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENODEV, errno.EIO):
                return None  # no XSAVE on this CPU/kernel
            self._fail("PTRACE_GETREGSET", tid)
        return buf.raw[: iov.iov_len]

    def set_xstate(self, tid: int, image: bytes) -> None:
        """Put back an image :meth:`get_xstate` returned."""
        buf = ctypes.create_string_buffer(image, len(image))
        iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(image))
        if self._ptrace(PTRACE_SETREGSET, tid, NT_X86_XSTATE, ctypes.byref(iov)) != 0:
            self._fail("PTRACE_SETREGSET", tid)

    @_op
    def run_thread(self, tid: int, request: int = PTRACE_CONT) -> None:
        """Let one stopped thread run (CONT or SINGLESTEP) without delivering any signal."""
        if self._ptrace(request, tid, 0, 0) != 0:
            self._fail("PTRACE_CONT", tid)
        self._in_clone.discard(tid)
        self._stopped.discard(tid)
        self._signal_stop.discard(tid)

    @_op
    def wait_thread(self, tid: int, *, block: bool = True) -> tuple[int, int] | None:
        """Wait for the next stop of one thread we let run; (signal, event) or None.

        A real signal reported here is recorded for :meth:`resume` like any other.

        :raises TargetGone: the thread (process) exited.
        """
        try:
            pid, status = os.waitpid(tid, WALL | (0 if block else os.WNOHANG))
        except ChildProcessError:
            pid, status = tid, 0
        if pid == 0:
            return None
        self._on_status(tid, status)
        if tid not in self._stopped:
            raise TargetGone(f"thread {tid} of process {self.pid} exited")
        return os.WSTOPSIG(status), status >> 16

    @_op
    def run_to_syscall_stop(
        self, tid: int, at: int, nr: int, timeout: float | None = None
    ) -> Regs | None:
        """``PTRACE_SYSCALL`` the stopped thread ``tid`` from stop to stop until a syscall-stop
        at ``at`` for system call ``nr``; return its registers then -- or None when that
        did not come within ``timeout`` s (the thread left running: a system call of the
        stub blocked, e.g. on a seccomp supervisor that never answers).

        For a stub of ours (process/remote.py): its own system calls stop twice each on the
        way and are passed, in a loop kept lean (a named mapping is nine stops while a thread
        of the program is held); a real signal on the way stays recorded (delivered at
        resume); a stale interrupt stop is passed.

        :raises TargetGone: the thread exits.
        """
        ptrace, regs = self._ptrace, Regs()
        ref = ctypes.byref(regs)
        syscall_stop = (SYSCALL_STOP_SIG << 8) | 0x7F
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if ptrace(PTRACE_SYSCALL, tid, 0, 0) != 0:
                self._fail("PTRACE_SYSCALL", tid)
            self._stopped.discard(tid)
            self._signal_stop.discard(tid)
            self._in_clone.discard(tid)
            if deadline is None:
                try:
                    _, status = os.waitpid(tid, WALL)
                except ChildProcessError:
                    status = 0
            else:
                got = self._waitpid_within(tid, deadline - time.monotonic())
                if got is None:
                    return None
                status = got
            if status == syscall_stop:
                self._stopped.add(tid)
                if ptrace(PTRACE_GETREGS, tid, 0, ref) != 0:
                    self._fail("PTRACE_GETREGS", tid)
                if regs.rip == at and regs.orig_rax == nr:
                    return regs
                continue
            self._on_status(tid, status)
            if tid not in self._stopped:
                raise TargetGone(f"thread {tid} of process {self.pid} exited")
            if status >> 16 == PTRACE_EVENT_EXIT:
                raise TargetGone(f"process {self.pid} is exiting")

    def _unblocked_signal_queued(self, tid: int) -> bool:
        """A signal the stopped thread does not block is queued for it (its own queue or the
        process's): :func:`signal_pending_unblocked` with three ptrace calls
        (PTRACE_GETSIGMASK, PTRACE_PEEKSIGINFO of both queues) instead of a read of
        /proc/PID/task/TID/status (~50 µs, inside the window, for each thread whose call our
        interrupt failed with -EINTR: 120 µs of a 0.9 ms redis window). The kernel queues an
        entry for every pending signal but SIGKILL (and, for kill(), unless an atomic
        allocation fails: then the /proc answer is used, as when a request fails)."""
        try:
            blocked = self.blocked_signals(tid)
        except LivespliceError:
            return signal_pending_unblocked(self.pid, tid)
        args, buf = self._peek_args, self._peek_buf
        for flags in (0, PTRACE_PEEKSIGINFO_SHARED):
            args.off, args.flags = 0, flags
            while True:
                n = self._ptrace(PTRACE_PEEKSIGINFO, tid, ctypes.byref(args), buf)
                if n < 0:
                    return signal_pending_unblocked(self.pid, tid)
                raw = buf.raw if n > 0 else b""
                for i in range(n):
                    signo = int.from_bytes(raw[i * SIGINFO_SIZE : i * SIGINFO_SIZE + 4], "little")
                    if not blocked >> (signo - 1) & 1:
                        return True
                if n < args.nr:
                    break
                args.off += n
        return False

    def blocked_signals(self, tid: int) -> int:
        """The stopped thread's blocked-signal mask (bit ``n - 1`` for signal ``n``)."""
        mask = ctypes.c_uint64()
        if self._ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.byref(mask)) != 0:
            self._fail("PTRACE_GETSIGMASK", tid)
        return int(mask.value)

    def seccomp_filtered(self, tid: int) -> bool | None:
        """Whether a seccomp filter may refuse or punish the stopped thread's system calls:
        True (a filter), False (none), None (cannot tell: livesplice lacks CAP_SYS_ADMIN or
        runs under seccomp itself, or the kernel predates the request).

        Why: code run on the thread goes through its filters like the program's own calls,
        and a filter can kill the process for one it does not expect. One
        ``PTRACE_SECCOMP_GET_FILTER`` for the length of the first filter (~1 µs, the thread
        stays held): EINVAL means the thread is not in filter mode (kernel/seccomp.c
        ``get_nth_filter``; also strict mode, and a kernel without
        CONFIG_CHECKPOINT_RESTORE, where this cannot tell).
        """
        if self._ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, None) >= 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return False
        if err == errno.EMEDIUMTYPE:  # a filter whose program the kernel did not keep
            return True
        return None

    def interrupt_thread(self, tid: int) -> None:
        """PTRACE_INTERRUPT one seized thread: it stops without a signal being queued to it."""
        self._ptrace(PTRACE_INTERRUPT, tid, 0, 0)

    def take_signal(self, tid: int, sig: int) -> None:
        """Forget the last recorded ``sig`` of a thread: a trap we caused ourselves."""
        sigs = self._pending.get(tid, [])
        if sig in sigs:
            del sigs[len(sigs) - 1 - sigs[::-1].index(sig)]
        if not sigs:
            self._pending.pop(tid, None)

    def pending_signals(self, tid: int) -> list[int]:
        """Signals seen for a thread while it was stopped and not yet passed on (resume delivers
        them)."""
        return list(self._pending.get(tid, []))
