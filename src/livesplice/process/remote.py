"""Run things INSIDE the target on one stopped thread, then put its registers back.

* :func:`remote_syscall`: point the thread at an existing ``syscall`` instruction (``0f 05``,
  found once in the target's executable mappings, usually libc) with ``rax`` = number and the
  arguments in ``rdi, rsi, rdx, r10, r8, r9`` (x86-64 syscall ABI), single-step it, read
  ``rax``. Nothing is written to the target's code.
* :func:`remote_call`: call ``func`` with a return address of 0. When the function returns,
  the thread faults at address 0 (SIGSEGV, ``rip == 0``, ``rsp`` just above our return slot):
  that fault is our breakpoint -- address 0 is never mapped (``vm.mmap_min_addr``), and the
  ``rsp`` check tells it apart from a callee that jumps through a NULL pointer.
* ``orig_rax`` is set to -1 while our code runs: the thread may be stopped on the way out of
  a system call, and the kernel's restart logic (``-ERESTARTSYS`` -> ``rip -= 2``) must not
  apply to our registers. Restoring the saved registers restores the pending restart too.

If the Tracee is running, each function stops it for the duration and resumes it; if it is
already stopped (inside a stop window), it stays stopped.
"""

from __future__ import annotations

import contextlib
import mmap as _mmap
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from livesplice.errors import HookFailed, LivespliceError, TargetGone
from livesplice.process.ptrace import (
    PTRACE_CONT,
    PTRACE_EVENT_EXIT,
    PTRACE_SINGLESTEP,
    SYSCALL_INSN,
    Regs,
    Tracee,
)

SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_FTRUNCATE = 77
SYS_MEMFD_CREATE = 319

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17; older kernels treat it as a hint (checked)
MFD_CLOEXEC = 0x1
MFD_EXEC = 0x10  # Linux 6.3: say so explicitly, or vm.memfd_noexec may refuse exec mappings
EEXIST = 17
EINVAL = 22

PAGE = _mmap.PAGESIZE
RED_ZONE = 128  # x86-64 psABI 3.2.2: 128 bytes below rsp belong to the running function
USER_TOP = 0x7FFFFFFFF000  # end of the 47-bit user address space (4-level paging)
MMAP_MIN = 0x10000  # vm.mmap_min_addr default
# Keep away from what grows: the main stack (up to RLIMIT_STACK below [stack] plus the
# kernel's stack_guard_gap of 256 pages) and the brk heap.
STACK_RESERVE = 16 << 20
HEAP_RESERVE = 256 << 20

_CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
     signal.SIGTRAP, signal.SIGSYS}
)
_MASK64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@contextmanager
def stopped(t: Tracee) -> Iterator[int]:
    """Yield a stopped thread of ``t`` to run code on; stop/resume around it if needed."""
    if t.is_stopped():
        yield t.pick_thread()
        return
    t.service()
    t.stop()
    try:
        yield t.pick_thread()
    finally:
        t.resume()


def read_maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of the process."""
    out: list[tuple[int, int, str, str]] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = parts[0].split("-")
                path = parts[5].strip() if len(parts) > 5 else ""
                out.append((int(lo, 16), int(hi, 16), parts[1], path))
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    return out


def _syscall_insn(t: Tracee) -> int:
    """Address of some ``syscall`` instruction bytes in executable memory (cached)."""
    if "syscall_insn" in t.cache:
        return t.cache["syscall_insn"]
    maps = read_maps(t.pid)
    # libc first (it certainly makes system calls), then everything executable
    order = sorted(
        (m for m in maps if "x" in m[2] and m[3] != "[vsyscall]"),
        key=lambda m: ("libc" not in m[3], m[0]),
    )
    for lo, hi, _, _ in order:
        chunk = 1 << 20
        for start in range(lo, hi, chunk):
            try:
                data = t.read(start, min(chunk + 1, hi - start))
            except LivespliceError:
                break
            at = data.find(SYSCALL_INSN)
            if at >= 0:
                t.cache["syscall_insn"] = start + at
                return start + at
    raise LivespliceError(f"no syscall instruction found in process {t.pid}")


def _set_args(r: Regs, args: tuple[int, ...], regs: tuple[str, ...]) -> None:
    if len(args) > len(regs):
        raise ValueError(f"at most {len(regs)} arguments")
    for name, value in zip(regs, args, strict=False):
        setattr(r, name, value & _MASK64)


def _syscall_on(t: Tracee, tid: int, nr: int, args: tuple[int, ...]) -> int:
    insn = _syscall_insn(t)
    saved = t.get_regs(tid)
    r = saved.copy()
    r.rax = nr
    _set_args(r, args, ("rdi", "rsi", "rdx", "r10", "r8", "r9"))
    r.rip = insn
    r.orig_rax = _MASK64  # -1: not in a system call (no restart logic on our registers)
    t.set_regs(tid, r)
    try:
        while True:
            t.run_thread(tid, PTRACE_SINGLESTEP)
            sig, event = _wait(t, tid)
            if event == 0 and sig == signal.SIGTRAP:
                t.take_signal(tid, sig)
                now = t.get_regs(tid)
                if now.rip == insn + len(SYSCALL_INSN):
                    return _signed64(now.rax)
                # a trap elsewhere: not ours (cannot happen for one instruction); step on
            # any other stop (a real signal, recorded for resume; a stale interrupt): retry
            # from where the thread is: either before the instruction or already past it
            now = t.get_regs(tid)
            if now.rip == insn + len(SYSCALL_INSN):
                return _signed64(now.rax)
    finally:
        _restore(t, tid, saved)


def _wait(t: Tracee, tid: int) -> tuple[int, int]:
    st = t.wait_thread(tid)
    assert st is not None
    if st[1] == PTRACE_EVENT_EXIT:
        raise TargetGone(f"process {t.pid} is exiting")
    return st


def _restore(t: Tracee, tid: int, saved: Regs) -> None:
    with contextlib.suppress(TargetGone):  # gone: nothing left to restore
        t.set_regs(tid, saved)


def remote_syscall(t: Tracee, nr: int, *args: int) -> int:
    """Execute system call ``nr`` in the target; return the raw ``rax`` (negative errno)."""
    with stopped(t) as tid:
        return _syscall_on(t, tid, nr, args)


def _check(t: Tracee, what: str, rv: int) -> int:
    if -4096 < rv < 0:
        import os

        raise LivespliceError(f"{what} failed in process {t.pid}: {os.strerror(-rv)}")
    return rv


def free_gaps(
    maps: list[tuple[int, int, str, str]], lo: int, hi: int
) -> list[tuple[int, int]]:
    """Unmapped [start, end) ranges inside [lo, hi), keeping clear of stack and heap growth."""
    busy: list[tuple[int, int]] = []
    for start, end, _, path in maps:
        if start >= USER_TOP:
            continue
        if path == "[stack]":
            start = max(0, start - STACK_RESERVE)
        elif path == "[heap]":
            end = end + HEAP_RESERVE
        busy.append((start, end))
    busy.sort()
    gaps: list[tuple[int, int]] = []
    cur = max(lo, MMAP_MIN)
    top = min(hi, USER_TOP)
    for start, end in busy:
        if start > cur:
            gaps.append((cur, min(start, top)))
        cur = max(cur, end)
        if cur >= top:
            break
    if cur < top:
        gaps.append((cur, top))
    return [(a, b) for a, b in gaps if b > a]


def _near_candidates(
    maps: list[tuple[int, int, str, str]], size: int, lo: int, hi: int
) -> list[int]:
    """Page-aligned addresses where ``size`` bytes fit in [lo, hi), nearest the middle first."""
    mid = (lo + hi) // 2
    out: list[int] = []
    for a, b in free_gaps(maps, lo, hi):
        first = _page_up(a)
        last = (b - size) & ~(PAGE - 1)
        if last < first:
            continue
        # the spot inside this gap closest to the middle of [lo, hi)
        out.append(min(max(mid & ~(PAGE - 1), first), last))
    return sorted(out, key=lambda x: abs(x + size // 2 - mid))


def _scratch_string(t: Tracee, tid: int, text: bytes) -> tuple[int, int]:
    """Put a NUL-terminated string in target memory: (address, mapping to unmap or 0).

    Below the red zone of the stopped thread's stack is free memory; if that is not mapped
    (a thread at the very bottom of its stack) use a fresh anonymous page.
    """
    data = text + b"\0"
    rsp = t.get_regs(tid).rsp
    addr = (rsp - RED_ZONE - 512 - len(data)) & ~0xF
    try:
        t.write(addr, data)
        return addr, 0
    except TargetGone:
        raise
    except LivespliceError:
        pass
    page = _check(
        t, "mmap",
        _syscall_on(t, tid, SYS_MMAP, (0, PAGE, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)),
    )
    t.write(page, data)
    return page, page


def _memfd(t: Tracee, tid: int, name: str, size: int, executable: bool) -> int:
    raw = name.encode()
    if len(raw) > 249:  # memfd_create(2): at most 249 bytes
        raise ValueError(f"memfd name too long: {name!r}")
    addr, scratch = _scratch_string(t, tid, raw)
    try:
        flags = MFD_CLOEXEC | (MFD_EXEC if executable else 0)
        fd = _syscall_on(t, tid, SYS_MEMFD_CREATE, (addr, flags))
        if fd == -EINVAL and executable:  # a kernel older than 6.3 does not know MFD_EXEC
            fd = _syscall_on(t, tid, SYS_MEMFD_CREATE, (addr, MFD_CLOEXEC))
        _check(t, "memfd_create", fd)
    finally:
        if scratch:
            _syscall_on(t, tid, SYS_MUNMAP, (scratch, PAGE))
    rv = _syscall_on(t, tid, SYS_FTRUNCATE, (fd, size))
    if rv < 0:
        _syscall_on(t, tid, SYS_CLOSE, (fd,))
        _check(t, "ftruncate", rv)
    return fd


def remote_mmap(
    t: Tracee,
    size: int,
    prot: int,
    near: tuple[int, int] | None = None,
    name: str | None = None,
) -> int:
    """Map ``size`` bytes (rounded up to pages) in the target with protection ``prot``.

    ``near=(lo, hi)``: the mapping lies entirely inside [lo, hi) (a free gap from
    /proc/PID/maps, claimed with MAP_FIXED_NOREPLACE, retried if something took it first).
    ``name``: the mapping is a private mapping of ``memfd_create(name)``, so /proc/PID/maps
    shows ``/memfd:<name> (deleted)`` (this kernel has no CONFIG_ANON_VMA_NAME). It is
    MAP_PRIVATE so that a fork of the target copies it like any other private memory.
    """
    size = _page_up(max(size, 1))
    with stopped(t) as tid:
        fd = -1
        flags = MAP_PRIVATE
        if name is not None:
            fd = _memfd(t, tid, name, size, bool(prot & PROT_EXEC))
        else:
            flags |= MAP_ANONYMOUS
        try:
            if near is None:
                return _check(
                    t, "mmap", _syscall_on(t, tid, SYS_MMAP, (0, size, prot, flags, fd, 0))
                )
            lo, hi = near
            for _attempt in range(8):
                cands = _near_candidates(read_maps(t.pid), size, lo, hi)
                if not cands:
                    break
                want = cands[0]
                got = _syscall_on(
                    t, tid, SYS_MMAP, (want, size, prot, flags | MAP_FIXED_NOREPLACE, fd, 0)
                )
                if got == want:
                    return got
                if got == -EEXIST:
                    continue  # taken since we read the maps: read them again
                if got >= 0:  # flag ignored (old kernel): the kernel chose elsewhere
                    _syscall_on(t, tid, SYS_MUNMAP, (got, size))
                    break
                _check(t, "mmap", got)
            raise LivespliceError(
                f"no free {size}-byte range in [{lo:#x}, {hi:#x}) of process {t.pid}",
                advice="the update must lie within ±2 GB of the code it patches",
            )
        finally:
            if fd >= 0:
                _syscall_on(t, tid, SYS_CLOSE, (fd,))


def remote_munmap(t: Tracee, addr: int, size: int) -> None:
    _check(t, "munmap", remote_syscall(t, SYS_MUNMAP, addr, _page_up(size)))


def remote_mprotect(t: Tracee, addr: int, size: int, prot: int) -> None:
    _check(t, "mprotect", remote_syscall(t, SYS_MPROTECT, addr, _page_up(size), prot))


def remote_call(t: Tracee, func: int, *args: int, timeout: float = 5.0) -> int:
    """Call ``func(args...)`` (integer arguments) on one thread of the target; return ``eax``.

    The call runs on the thread's own stack below its red zone, 16-byte aligned at the call
    (psABI 3.2.2: ``rsp + 8`` is a multiple of 16 at function entry), with return address 0.
    Other threads stay as they are (stopped inside a stop window, running otherwise).

    :raises HookFailed: the callee crashed (its signal is swallowed) or ran past ``timeout``;
        the thread's registers are restored either way.
    """
    with stopped(t) as tid:
        saved = t.get_regs(tid)
        sp = ((saved.rsp - RED_ZONE - 256) & ~0xF) - 8
        t.write(sp, b"\0" * 8)  # the return address: 0, our breakpoint
        r = saved.copy()
        _set_args(r, args, ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))
        r.rip = func
        r.rsp = sp
        r.rax = 0  # variadic callees read al = number of vector registers used
        r.orig_rax = _MASK64
        t.set_regs(tid, r)
        try:
            return _run_call(t, tid, func, sp, timeout)
        finally:
            _restore(t, tid, saved)


def _run_call(t: Tracee, tid: int, func: int, sp: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    t.run_thread(tid, PTRACE_CONT)
    nap = 0.0001
    while True:
        st = t.wait_thread(tid, block=False)
        if st is None:
            if time.monotonic() < deadline:
                time.sleep(nap)
                nap = min(nap * 2, 0.01)
                continue
            t.interrupt_thread(tid)
            _wait(t, tid)
            raise HookFailed(
                f"the function at {func:#x} did not return within {timeout:g} s",
                details=[f"thread {tid} ({t.thread_name(tid)}) was interrupted; "
                         "its registers are restored"],
                advice="a hook must not block (other threads may be stopped)",
            )
        sig, event = st
        if event == PTRACE_EVENT_EXIT:
            raise TargetGone(f"process {t.pid} exited during a call into it")
        if event == 0:
            now = t.get_regs(tid)
            if sig == signal.SIGSEGV and now.rip == 0 and now.rsp == sp + 8:
                t.take_signal(tid, sig)
                eax = now.rax & 0xFFFFFFFF
                return eax - (1 << 32) if eax >> 31 else eax
            if sig in _CRASH_SIGNALS:
                t.take_signal(tid, sig)
                raise HookFailed(
                    f"the function at {func:#x} crashed with {signal.Signals(sig).name}",
                    details=[f"thread {tid}: rip={now.rip:#x} rsp={now.rsp:#x}; "
                             "registers restored, the signal was not delivered"],
                )
            # a real signal for the program: recorded, delivered at resume
        t.run_thread(tid, PTRACE_CONT)
