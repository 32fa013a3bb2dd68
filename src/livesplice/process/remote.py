"""Run things INSIDE the target on one stopped thread, then put its registers back.

Every register hijack is self-restoring: if the tool dies (SIGKILL, OOM) at any point, the
kernel detaches the thread and it simply continues where it was, as if nothing happened.

The stub. The thread is pointed at a few bytes of code we write into the target (the
"stub") that do the work and then, in the stub's own code, restore every register the hijack
changed -- the original values are immediates in the stub:

* ``lea rsp, [rsp-128]`` (step over the red zone, psABI 3.2.2), ``movabs rax, FLAGS; push
  rax; popfq`` (flags), ``movabs rsp, RSP``, ``movabs`` for each of the 15 other general
  registers, ``jmp [rip+0]`` with the original ``rip`` after it. Nothing is written at or
  above the thread's ``rsp - 128``.
* :func:`run_syscalls` (and :func:`remote_syscall`, one of them): each system call in turn
  (a result kept in a callee-preserved register for the next one's arguments, a failure
  skipping the rest), then the end marker, then the restore. A named mapping's four calls
  are one stub run: one hold of the host thread instead of four. The marker is
  ``tgkill(getpid(), gettid(), SIG)`` of a signal the program never sees
  (:data:`MARK_SIGNALS`); a plain ``getpid`` where none qualifies or the thread is under a
  seccomp filter (which may kill the process for a ``tgkill``).
* :func:`remote_call`: ``xsave64`` (the whole user FPU/vector state -- x87, SSE, the AVX
  upper halves, AVX-512, PKRU -- into a 64-byte aligned area below the red zone; ``fxsave64``
  on a CPU without XSAVE), ``call [func]``, ``mov rdi, rax`` (the result), ``xrstor64``,
  ``getpid`` (a harmless system call, see below), then the restore. The tool also saves the
  same state with ``PTRACE_GETREGSET NT_X86_XSTATE`` and puts it back when it restores the
  registers, for a callee that never returned.

Pending restarts. A thread stopped on its way out of an interrupted system call has ``rax`` =
``-ERESTARTSYS``/``-ERESTARTNOINTR``/``-ERESTARTNOHAND`` and ``orig_rax`` >= 0; the kernel
would restart the call when the thread resumes (``rax = orig_rax, rip -= 2``;
``-ERESTART_RESTARTBLOCK``: ``rax = __NR_restart_syscall``; arch/x86/kernel/signal.c). Our
registers run with ``orig_rax = -1`` (no restart logic on them), so the stub's restore does the
restart itself (:func:`resume_regs`).

Where the stub lives: the padding after the end of an executable PT_LOAD segment up to the end
of its last page (libc, ld.so, the executable: mapped r-x with the rest of the page, never
executed or referenced by the program). We find it from the ELF program headers read from
the target's own memory (so a deleted/upgraded library works too), write the stub there
through /proc/PID/mem for one hijack and put the original bytes (zeros) back afterwards. Only
zero-filled slots are used: a slot still holding a stub was left by a tool killed during a
call, and its thread may yet return into it. A slot holding some thread's ``rip`` neither.

When the tool is alive it stops the thread itself and restores the registers with
``PTRACE_SETREGS`` (exactly today's registers, restart pending as before):

* system calls: ``PTRACE_CONT`` to the marker's signal-delivery-stop (the signal taken
  back), or ``PTRACE_SYSCALL`` from stop to stop (the steps' own entry and exit stops) until
  the entry stop of the marker's ``getpid``; the result registers are read there. A run
  that has not ended after :data:`STUB_TIMEOUT` (a call blocked: a seccomp supervisor that
  never answers) is interrupted and its registers restored: REMOTE_FAILED.
* call: ``PTRACE_SYSCALL`` until the entry stop of the stub's ``getpid`` (``rdi`` = result;
  the callee's own system calls stop too and are passed), then its exit stop.
* Then :meth:`Tracee.to_event_stop` moves the thread into an interrupt stop before the
  registers are restored. Never a breakpoint, a single-step or a fault as our "stop here":
  a thread left in such a signal-delivery-stop by a dying tracer gets the signal and dies
  (measured: SIGTRAP after a single-step). Syscall-stops carry ``SIGTRAP|0x80``
  (PTRACE_O_TRACESYSGOOD), which the kernel cannot deliver as a signal: safe.

Fault injection: :func:`livesplice.faults.checkpoint` at ``remote:regs-set``,
``remote:after-syscall`` / ``remote:after-call`` and ``remote:before-restore`` (each also
with ``:<name>`` of the system call, e.g. ``remote:regs-set:mmap``, or ``:call``).

Known limit: a thread with less stack left below ``rsp`` than the XSAVE area (2.7 KB with
AVX-512) plus what the callee needs cannot host a call.

If the Tracee is running, each function stops it for the duration and resumes it; if it is
already stopped (inside a stop window), it stays stopped.
"""

from __future__ import annotations

import contextlib
import mmap as _mmap
import os
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from livesplice.errors import HookFailed, LivespliceError, RemoteCallFailed, TargetGone
from livesplice.faults import armed, checkpoint
from livesplice.process import procmaps
from livesplice.process.procmaps import Mapping
from livesplice.process.ptrace import (
    CRASH_SIGNALS,
    PTRACE_CONT,
    PTRACE_EVENT_EXIT,
    PTRACE_SYSCALL,
    SYSCALL_INSN,
    SYSCALL_STOP_SIG,
    Regs,
    Tracee,
    process_dying,
)

SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_FTRUNCATE = 77
SYS_MEMFD_CREATE = 319

PROT_READ, PROT_WRITE, PROT_EXEC = _mmap.PROT_READ, _mmap.PROT_WRITE, _mmap.PROT_EXEC
MAP_PRIVATE, MAP_ANONYMOUS = _mmap.MAP_PRIVATE, _mmap.MAP_ANONYMOUS
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

_MASK64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@contextmanager
def stopped(t: Tracee, thread: int | None = None) -> Iterator[int]:
    """Yield a stopped thread of ``t`` to run code on (``thread`` if given).

    Inside a stop window (every thread stopped) one of them; otherwise only that thread is
    stopped for the duration (:meth:`Tracee.hold_one`) and the program's other threads run.
    """
    if t.is_stopped():
        yield t.pick_thread() if thread is None else thread
        return
    # Slow reads first, while the target runs (its ELF headers do not change): the first
    # remote call used to hold every thread stopped for tens of ms while it searched.
    find_stub_area(t)
    # the program's signal handlers as of now (another thread may install one at any time:
    # read afresh before each hold, not inside it), for the choice of the end marker
    t.cache["caught_signals"] = _caught_signals(t.pid)
    # Outside a stop window only the host thread stops; the others run on (issue 8).
    tid = t.hold_one(thread)
    try:
        yield tid
    finally:
        t.release_one(tid)


def read_maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of the process."""
    return [(m.start, m.end, m.perms, m.path) for m in _maps(pid)]


def _maps(pid: int) -> list[Mapping]:
    """The process's mappings; a process that is gone is TARGET_GONE."""
    try:
        return procmaps.read_maps(pid)
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None


# ------------------------------------------------------------------ the stub

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
SYS_GETPID = 39
SYS_GETTID = 186
SYS_TGKILL = 234
SYS_RESTART_SYSCALL = 219
# How long a stub run of system calls may take before it is given up (the thread interrupted,
# its registers restored): a call that blocks -- a seccomp supervisor that never answers,
# a lock the program holds -- must not hold the tool for ever.
STUB_TIMEOUT = 5.0
# The end marker of a batch is a signal the stub sends its own thread: one whose default
# action is to ignore it, that the program has no handler for and the thread does not block,
# so that the program can never see it -- not even when the tool dies while the thread sits
# in its signal-delivery-stop (the kernel then delivers it: ignored).
MARK_SIGNALS = (signal.SIGURG, signal.SIGWINCH, signal.SIGCHLD)
_SYSCALL_NAMES = {
    3: "close",
    9: "mmap",
    10: "mprotect",
    11: "munmap",
    39: "getpid",
    77: "ftruncate",
    319: "memfd_create",
}
SLOT = 256  # bytes per stub slot (the xsave call stub is 243 bytes)
PF_X = 1
PT_LOAD = 1

# movabs reg, imm64 (REX.W B8+r / REX.WB B8+r) for every general register but rsp, which the
# restore sets first; rax last would do too, but order does not matter after popfq.
_MOVABS = {
    "rax": b"\x48\xb8",
    "rcx": b"\x48\xb9",
    "rdx": b"\x48\xba",
    "rbx": b"\x48\xbb",
    "rbp": b"\x48\xbd",
    "rsi": b"\x48\xbe",
    "rdi": b"\x48\xbf",
    "r8": b"\x49\xb8",
    "r9": b"\x49\xb9",
    "r10": b"\x49\xba",
    "r11": b"\x49\xbb",
    "r12": b"\x49\xbc",
    "r13": b"\x49\xbd",
    "r14": b"\x49\xbe",
    "r15": b"\x49\xbf",
}
_LEA_RSP_MINUS_128 = b"\x48\x8d\x64\x24\x80"  # lea rsp, [rsp-0x80]: flags untouched
_PUSH_RAX_POPFQ = b"\x50\x9d"
_MOVABS_RSP = b"\x48\xbc"
_JMP_RIP0 = b"\xff\x25\x00\x00\x00\x00"  # jmp [rip+0]; the 8-byte target follows
_FXSAVE_RSP16 = b"\x48\x0f\xae\x44\x24\x10"  # fxsave64 [rsp+0x10]
_FXRSTOR_RSP16 = b"\x48\x0f\xae\x4c\x24\x10"  # fxrstor64 [rsp+0x10]
# The XSAVE form (the whole user state: x87, SSE, AVX upper halves, AVX-512, PKRU). xsave and
# xrstor take the component mask in edx:eax (all ones: every component XCR0 enables); edx
# holds the callee's third argument, so it is saved around the xsave on the stack.
_PUSH_RDX, _POP_RDX = b"\x52", b"\x5a"
_ALL_COMPONENTS = b"\x83\xc8\xff" + b"\x83\xca\xff"  # or eax, -1; or edx, -1
_XSAVE_RSP48 = b"\x48\x0f\xae\x64\x24\x48"  # xsave64 [rsp+0x48] (rsp+0x40 before the push)
_XRSTOR_RSP40 = b"\x48\x0f\xae\x6c\x24\x40"  # xrstor64 [rsp+0x40]
_XOR_EAX = b"\x31\xc0"  # al = 0 vector registers for a variadic callee
XSAVE_OFFSET = 0x40  # the save area's offset from the callee's rsp (64-byte aligned)
_MOV_RDI_RAX = b"\x48\x89\xc7"
_MOV_EAX_GETPID = b"\xb8" + struct.pack("<I", SYS_GETPID)
_CALL_RIP = b"\xff\x15"  # call [rip+disp32]
_GETPID_MARKER = _MOV_EAX_GETPID + SYSCALL_INSN
_NOP = b"\x90"


def resume_regs(saved: Regs) -> Regs:
    """The registers ``saved`` leads to when the thread returns to user mode untraced.

    Applies a pending system-call restart the way the kernel would (``orig_rax`` >= 0 and
    ``rax`` one of the -ERESTART* codes; arch/x86/kernel/signal.c ``arch_do_signal_or_restart``
    for a thread with no signal to deliver) and clears ``orig_rax``.
    """
    r = saved.copy()
    if not r.orig_rax >> 63:
        err = -_signed64(r.rax)
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            r.rax = r.orig_rax
            r.rip -= 2
        elif err == ERESTART_RESTARTBLOCK:
            r.rax = SYS_RESTART_SYSCALL
            r.rip -= 2
    r.orig_rax = _MASK64
    return r


# the restore code's layout: lea rsp; movabs rax, FLAGS; push rax; popfq; movabs rsp, RSP;
# movabs for each general register; jmp [rip+0]; RIP -- packed in one call (it is built while
# a thread is held)
_RESTORE = struct.Struct("<5s2sQ2s2sQ" + "2sQ" * len(_MOVABS) + "6sQ")
RESTORE_LEN = _RESTORE.size


def restore_code(r: Regs) -> bytes:
    """Machine code that sets every general register, flags, rsp and rip to ``r``'s values."""
    regs = [x for name, op in _MOVABS.items() for x in (op, getattr(r, name))]
    return _RESTORE.pack(
        _LEA_RSP_MINUS_128,
        _MOVABS["rax"],
        r.eflags,
        _PUSH_RAX_POPFQ,
        _MOVABS_RSP,
        r.rsp,
        *regs,
        _JMP_RIP0,
        r.rip,
    )


@dataclass(frozen=True)
class Ref:
    """An argument that is the result of an earlier step of the same batch."""

    step: int


@dataclass(frozen=True)
class Syscall:
    """One step of a batch run by :func:`run_syscalls`.

    ``args``: integers, :class:`Ref` (an earlier step's result) or bytes (copied into the
    target's memory first; the argument is their address). ``check``: when the call fails
    (a result in [-4095, -1]) the steps after it do not run -- a cleanup step that must run
    anyway (a ``close``) follows an unchecked one.
    """

    nr: int
    args: tuple[int | Ref | bytes, ...] = ()
    check: bool = True

    @property
    def label(self) -> str:
        """The system call's name for fault-injection checkpoints and messages."""
        return _SYSCALL_NAMES.get(self.nr, str(self.nr))


_REGNUM = {  # the x86-64 encoding of each general register
    name: i
    for i, name in enumerate(
        [
            "rax",
            "rcx",
            "rdx",
            "rbx",
            "rsp",
            "rbp",
            "rsi",
            "rdi",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
        ]
    )
}
SYSCALL_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
# Results of a batch's steps: registers the kernel's system-call path preserves (everything
# but rax, rcx and r11) and no step's arguments use.
RESULT_REGS = ("r12", "r13", "r14", "r15", "rbx", "rbp")
NOT_RUN = 1 << 63  # the value a result register holds for a step that did not run
_CMP_RAX_MINUS_4095 = b"\x48\x3d" + struct.pack("<i", -4095)
_JAE_REL32 = b"\x0f\x83"


def _mov_imm(reg: str, value: int) -> bytes:
    """The shortest ``mov reg, value`` (64-bit result) for a general register."""
    n, v = _REGNUM[reg], value & _MASK64
    rex_b = 1 if n >= 8 else 0
    if v < 1 << 32:  # mov r32, imm32 zero-extends
        return (b"\x41" if rex_b else b"") + bytes([0xB8 + (n & 7)]) + struct.pack("<I", v)
    if v >= (1 << 64) - (1 << 31):  # mov r/m64, imm32 sign-extends
        return bytes([0x48 | rex_b, 0xC7, 0xC0 | (n & 7)]) + struct.pack("<i", _signed64(v))
    return bytes([0x48 | rex_b, 0xB8 + (n & 7)]) + struct.pack("<Q", v)


def _mov_reg(dst: str, src: str) -> bytes:
    """``mov dst, src`` between 64-bit general registers."""
    d, s = _REGNUM[dst], _REGNUM[src]
    rex = 0x48 | (4 if s >= 8 else 0) | (1 if d >= 8 else 0)
    return bytes([rex, 0x89, 0xC0 | (s & 7) << 3 | (d & 7)])


def _lea_rip(reg: str, disp: int) -> bytes:
    """``lea reg, [rip + disp]`` (disp counted from the end of this instruction)."""
    n = _REGNUM[reg]
    return bytes([0x48 | (4 if n >= 8 else 0), 0x8D, (n & 7) << 3 | 5]) + struct.pack("<i", disp)


@dataclass(frozen=True)
class Batch:
    """System calls compiled into a stub, all but the restore of the host's registers:
    ``head`` (the calls, then ``getpid`` as the end marker; ``after`` = the offset just
    after the marker's ``syscall``), then the restore code, then ``data`` (the bytes
    arguments, addressed rip-relative: nothing is written to the thread's stack).

    Compiled before a thread is held (only the restore code depends on its registers).
    Why one stub for several calls: every stub run costs the host thread a stop, two
    register writes and an interrupt stop; a named mapping is four calls (memfd_create,
    ftruncate, mmap, close), and the host thread -- often the one accepting connections --
    was held 1 ms for them one by one.
    """

    steps: tuple[Syscall, ...]
    head: bytes
    after: int
    data: bytes
    sig_at: int | None  # the offset of the marker's signal number (an imm32) in head
    marker: int = 0  # the offset where the end marker begins (failed checks jump there)

    def code(self, r: Regs, sig: int) -> bytes:
        """The whole stub for a thread whose registers, when it leaves the stub, are ``r``;
        the marker sends ``sig``. 0: no signal, and no ``gettid``/``tgkill`` either -- a
        plain ``getpid`` ends the batch at the same offset (NOPs before it keep every
        jump and rip-relative address), and the tool steps from syscall-stop to syscall-stop
        up to it. Why not ``tgkill(.., 0)``: a seccomp filter may kill the process for a
        ``tgkill`` (see :func:`_mark_signal`)."""
        head = self.head
        if self.sig_at is not None and sig:
            at = self.sig_at
            head = head[:at] + struct.pack("<I", sig) + head[at + 4 :]
        elif self.sig_at is not None:
            pad = self.after - self.marker - len(_GETPID_MARKER)
            head = head[: self.marker] + _NOP * pad + _GETPID_MARKER
        return head + restore_code(r) + self.data


def compile_batch(steps: list[Syscall], *, signal_marker: bool = True) -> Batch:
    """Step i's result stays in ``RESULT_REGS[i]`` (the tool reads them all at the end
    marker's stop); a failed checked step jumps straight to the marker.

    The marker: ``tgkill(getpid(), gettid(), SIG)`` (the tool lets the thread run to its
    signal-delivery-stop), or with ``signal_marker=False`` a plain ``getpid`` (the tool
    steps from syscall-stop to syscall-stop up to it: slower, 25 bytes shorter).
    """
    if len(steps) > len(RESULT_REGS):
        raise ValueError(f"at most {len(RESULT_REGS)} system calls per batch")
    code = bytearray()
    data = bytearray()
    jumps: list[int] = []  # offsets of rel32 fields that jump to the marker
    leas: list[tuple[int, int]] = []  # (offset of a rel32 field, offset of its bytes in data)
    for i, step in enumerate(steps):
        if len(step.args) > len(SYSCALL_ARG_REGS):
            raise ValueError(f"at most {len(SYSCALL_ARG_REGS)} arguments")
        for reg, arg in zip(SYSCALL_ARG_REGS, step.args, strict=False):
            if isinstance(arg, Ref):
                if not 0 <= arg.step < i:
                    raise ValueError(f"step {i} refers to step {arg.step}")
                code += _mov_reg(reg, RESULT_REGS[arg.step])
            elif isinstance(arg, bytes):
                code += _lea_rip(reg, 0)
                leas.append((len(code) - 4, len(data)))
                data += arg
            else:
                code += _mov_imm(reg, arg)
        code += _mov_imm("rax", step.nr) + SYSCALL_INSN + _mov_reg(RESULT_REGS[i], "rax")
        if step.check and i < len(steps) - 1:
            code += _CMP_RAX_MINUS_4095 + _JAE_REL32
            jumps.append(len(code))
            code += bytes(4)
    marker = len(code)
    for at in jumps:
        code[at : at + 4] = struct.pack("<i", marker - (at + 4))
    sig_at = None
    if signal_marker:  # tgkill(getpid(), gettid(), SIG)
        code += _mov_imm("rax", SYS_GETPID) + SYSCALL_INSN + _mov_reg("rdi", "rax")
        code += _mov_imm("rax", SYS_GETTID) + SYSCALL_INSN + _mov_reg("rsi", "rax")
        code += _mov_imm("rdx", 0)
        sig_at = len(code) - 4
        code += _mov_imm("rax", SYS_TGKILL) + SYSCALL_INSN
    else:  # getpid, reached by stepping from syscall-stop to syscall-stop
        code += _GETPID_MARKER
    data_at = len(code) + RESTORE_LEN
    for at, off in leas:
        code[at : at + 4] = struct.pack("<i", data_at + off - (at + 4))
    return Batch(tuple(steps), bytes(code), len(code), bytes(data), sig_at, marker)


def call_stub(func: int, r: Regs, *, xsave: bool) -> tuple[bytes, int]:
    """Save the vector state, call ``func``, keep the result in rdi, restore the vector state,
    ``getpid``, restore ``r``. Returns the code and the offset just after its ``syscall``.

    ``xsave``: the whole user state with xsave/xrstor into a 64-byte aligned area at
    ``rsp + XSAVE_OFFSET`` (header zeroed by the caller: xrstor faults on a non-zero
    XCOMP_BV or reserved bytes); otherwise x87/SSE only with fxsave at ``rsp + 0x10`` (CPUs
    without XSAVE have nothing more). The thread's rsp at entry: 16-byte aligned (psABI: at
    the call).
    """
    if xsave:
        save = _PUSH_RDX + _ALL_COMPONENTS + _XSAVE_RSP48 + _POP_RDX + _XOR_EAX
        restore_vec = _ALL_COMPONENTS + _XRSTOR_RSP40
    else:
        save, restore_vec = _FXSAVE_RSP16, _FXRSTOR_RSP16
    tail = _MOV_RDI_RAX + restore_vec + _MOV_EAX_GETPID + SYSCALL_INSN
    after_syscall = len(save) + len(_CALL_RIP) + 4 + len(tail)
    restore = restore_code(r)
    # call [rip+disp32]: disp counts from the end of the call to func's slot after `restore`
    disp = len(tail) + len(restore)
    code = b"".join(
        [save, _CALL_RIP, struct.pack("<i", disp), tail, restore, struct.pack("<Q", func)]
    )
    assert len(code) <= SLOT, len(code)
    return code, after_syscall


def _read_maps_offsets(pid: int) -> list[tuple[int, int, str, int, str]]:
    """(start, end, perms, file offset, path) of every mapping."""
    return [(m.start, m.end, m.perms, m.offset, m.path) for m in _maps(pid)]


def find_stub_area(t: Tracee) -> tuple[int, int]:
    """[lo, hi): the largest padding after an executable PT_LOAD segment, cached per Tracee.

    Read from the ELF header and program headers in the target's memory (the mapping at
    file offset 0 of each file); the padding must be inside an executable mapping.
    """
    if "stub_lo" in t.cache:
        return t.cache["stub_lo"], t.cache["stub_hi"]
    maps = _read_maps_offsets(t.pid)
    execs = [(lo, hi) for lo, hi, perms, _, _ in maps if "x" in perms]
    best = (0, 0)
    for start, end, _, offset, path in maps:
        if offset != 0 or not path.startswith("/"):
            continue
        try:
            ehdr = t.read(start, 64)
        except TargetGone:
            raise
        except LivespliceError:
            continue
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:  # ELFCLASS64 only
            continue
        phoff = struct.unpack_from("<Q", ehdr, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        if phentsize != 56 or not 0 < phnum < 64 or phoff + phnum * 56 > end - start:
            continue
        try:
            raw = t.read(start + phoff, phnum * 56)
        except LivespliceError:
            continue
        loads = [struct.unpack_from("<IIQQQQQQ", raw, i * 56) for i in range(phnum)]
        loads = [ph for ph in loads if ph[0] == PT_LOAD]
        first = next((ph for ph in loads if ph[2] & ~(PAGE - 1) == 0), None)
        if first is None:
            continue
        bias = start - (first[3] & ~(PAGE - 1))
        for _type, flags, _off, vaddr, _pa, filesz, memsz, _al in loads:
            if not flags & PF_X or memsz != filesz:
                continue
            lo = (bias + vaddr + filesz + 15) & ~0xF
            hi = _page_up(bias + vaddr + filesz)
            inside = any(a <= lo and hi <= b for a, b in execs)
            if inside and hi - lo > best[1] - best[0]:
                best = (lo, hi)
    if not execs or process_dying(t.pid):  # torn down: its maps read empty, its ELFs fail
        raise TargetGone(f"process {t.pid} exited")
    if best[1] - best[0] < SLOT:
        raise LivespliceError(
            f"no room for the remote-execution stub in process {t.pid}",
            details=[
                "no executable segment of a mapped ELF file ends 256 bytes or more "
                "before the end of its page"
            ],
        )
    t.cache["stub_lo"], t.cache["stub_hi"] = best
    return best


@dataclass
class _PlacedStub:
    addr: int
    original: bytes

    def remove(self, t: Tracee) -> None:
        with contextlib.suppress(LivespliceError):  # gone: nothing to put back
            t.write(self.addr, self.original)


def _place_stub(t: Tracee, code: bytes) -> _PlacedStub:
    """Write ``code`` into free stub slots (as many consecutive ones as it needs) that no
    thread's rip is in; a slot that is not all zeros is a leftover of a dead tool."""
    lo, hi = find_stub_area(t)
    _, regs = t.stopped_regs()
    from livesplice.process.ptrace import REG_INDEX

    rips = set(regs[:, REG_INDEX["rip"]].tolist())
    span = -(-len(code) // SLOT) * SLOT
    area = t.read(lo, hi - lo)
    for at in range(hi - span, lo - 1, -SLOT):
        # a slot not all zeros holds the stub of a tool killed mid-call whose thread may
        # still return into it (its callee runs): never reused
        if area[at - lo : at - lo + span].count(0) != span:
            continue
        if not any(at <= ip < at + span for ip in rips):
            t.write(at, code)
            return _PlacedStub(at, bytes(len(code)))
    raise LivespliceError(
        f"no free stub slot in process {t.pid}",
        details=[f"stub area {lo:#x}-{hi:#x}: no zero-filled {span}-byte run of slots"],
    )


def _point(stage: str, *labels: str) -> None:
    """The checkpoints ``remote:<stage>`` and ``remote:<stage>:<label>`` of each label."""
    if armed():  # one look at the environment: these run while a thread is held
        checkpoint(f"remote:{stage}")
        for label in labels:
            checkpoint(f"remote:{stage}:{label}")


def _set_args(r: Regs, args: tuple[int, ...], regs: tuple[str, ...]) -> None:
    if len(args) > len(regs):
        raise ValueError(f"at most {len(regs)} arguments")
    for name, value in zip(regs, args, strict=False):
        setattr(r, name, value & _MASK64)


def _syscalls_on(t: Tracee, tid: int, batch: Batch) -> list[int | None]:
    """Run ``batch`` in one stub run on the stopped thread ``tid``; each step's raw result
    (negative errno), None for a step a failed check skipped."""
    lo, hi = find_stub_area(t)
    if len(batch.steps) > 1 and len(batch.head) + RESTORE_LEN + len(batch.data) > hi - lo:
        return _one_by_one(t, tid, batch.steps)
    saved = t.get_regs(tid)
    sig = 0 if batch.sig_at is None else _mark_signal(t, tid)
    stub = _place_stub(t, batch.code(resume_regs(saved), sig))
    labels = [s.label for s in batch.steps]
    r = saved.copy()
    for reg in RESULT_REGS:
        setattr(r, reg, NOT_RUN)
    r.rip = stub.addr
    r.orig_rax = _MASK64  # -1: no restart logic on our registers
    settled = escaped = False
    at = stub.addr + batch.after
    try:
        t.set_regs(tid, r)
        _point("regs-set", *labels)
        if sig:
            end = _run_to_signal(t, tid, at, sig, STUB_TIMEOUT)
        else:  # every stop up to the marker's: the steps' own syscall-stops, passed
            end = t.run_to_syscall_stop(tid, at, SYS_GETPID, timeout=STUB_TIMEOUT)
        if end is None:  # never came: find where the thread is
            t.to_event_stop(tid)
            escaped = not stub.addr <= t.get_regs(tid).rip < at
            settled = True
            raise RemoteCallFailed(
                f"the stub run in thread {tid} of process {t.pid} did not report its end "
                f"within {STUB_TIMEOUT:g} s",
                details=[
                    "its registers were restored by the stub itself"
                    if escaped
                    else "a system call of it did not return (a seccomp supervisor, a "
                    "lock held by the program); the thread was interrupted and its "
                    "registers were restored"
                ],
            )
        results: list[int | None] = []
        for reg, _ in zip(RESULT_REGS, batch.steps, strict=False):
            v = getattr(end, reg)
            results.append(None if v == NOT_RUN else _signed64(v))
        _point("after-syscall", *labels)
        t.to_event_stop(tid)
        settled = True
        _point("before-restore", *labels)
        return results
    finally:
        if escaped:  # back in the program's code on its own: its registers are its own
            stub.remove(t)
        else:
            _restore(t, tid, saved, stub, settled)


def _mark_signal(t: Tracee, tid: int) -> int:
    """A signal of :data:`MARK_SIGNALS` the program cannot see (no handler -- as read right
    before the hold, or when the stop window began -- and not blocked by the thread), or 0
    when none is.

    None under a seccomp filter (or when livesplice cannot tell): the marker's ``gettid`` and
    ``tgkill`` are calls a sandboxed program may be forbidden -- a filter that kills on
    ``tgkill`` killed the target, one that fails it left the tool waiting 5 s for a marker
    that never came, the mapping made and lost (tests/test_remote_marker.py). Stepping to a
    ``getpid`` marker runs no call but the batch's own and ``getpid``.
    """
    if t.seccomp_filtered(tid) is not False:
        return 0
    if "caught_signals" not in t.cache:
        t.cache["caught_signals"] = _caught_signals(t.pid)
    unusable = t.cache["caught_signals"] | t.blocked_signals(tid)
    return next((int(s) for s in MARK_SIGNALS if not unusable >> (s - 1) & 1), 0)


def _caught_signals(pid: int) -> int:
    """The signals the process has handlers for (SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        raise TargetGone(f"process {pid} exited") from None
    return (1 << 64) - 1  # unknown: treat every signal as caught


def _run_to_signal(t: Tracee, tid: int, at: int, sig: int, timeout: float = 5.0) -> Regs | None:
    """Let the thread run the stub (no syscall-stops on the way) until the signal-delivery
    stop of the marker's ``sig`` at ``at``; its registers, the signal taken back (never
    delivered). None if it did not come within ``timeout``.

    Why not step from syscall-stop to syscall-stop: each stop is a round trip between two
    CPUs (~35 µs on a VM) and a named mapping had nine, while the held thread -- often the one
    accepting connections -- waited. The wait sleeps in ``sigtimedwait`` for the SIGCHLD of
    the stop (SIGCHLD blocked meanwhile; 1 ms at most, for a SIGCHLD the kernel hands to
    another thread of the tool): never a busy loop, which at SCHED_FIFO would keep one of the
    CPUs from the very thread we wait for (measured: p90 5.4 ms at load 20 with a 5 ms spin).
    """
    t.run_thread(tid, PTRACE_CONT)
    deadline = time.monotonic() + timeout
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while True:
            st = t.wait_thread(tid, block=False)
            if st is not None:
                regs = _marker_stop(t, tid, st, at, sig)
                if regs is not None:
                    return regs
                continue
            if time.monotonic() > deadline:
                return None
            if signal.sigtimedwait({signal.SIGCHLD}, 0.001) is not None:
                t.service(skip=tid)  # the program's other threads run: pass their events on
    finally:
        if signal.SIGCHLD not in mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _marker_stop(t: Tracee, tid: int, st: tuple[int, int], at: int, sig: int) -> Regs | None:
    """The registers if stop ``st`` of the thread running a stub is the end marker's
    signal-delivery-stop (the signal taken back); otherwise the thread is let run on."""
    got, event = st
    if event == PTRACE_EVENT_EXIT:
        raise TargetGone(f"process {t.pid} is exiting")
    if event == 0 and got == sig:
        regs = t.get_regs(tid)
        if regs.rip == at:
            t.take_signal(tid, sig)
            return regs
    if event == 0 and got in CRASH_SIGNALS:
        t.take_signal(tid, got)
        raise RemoteCallFailed(
            f"the stub run in thread {tid} of process {t.pid} faulted "
            f"({signal.Signals(got).name}); its registers were restored"
        )
    # a real signal for the program (recorded, delivered at release) or a stale
    # interrupt: run on
    t.run_thread(tid, PTRACE_CONT)
    return None


def _one_by_one(t: Tracee, tid: int, steps: tuple[Syscall, ...]) -> list[int | None]:
    """The batch as one stub run per step (same results), for a process whose largest stub
    area is too small for the whole batch: the shortest stubs (a ``getpid`` marker), the
    bytes arguments below the red zone of the thread's stack."""
    blobs = [a for step in steps for a in step.args if isinstance(a, bytes)]
    where: dict[int, int] = {}
    if blobs:
        data = b"".join(blobs)
        at = (t.get_regs(tid).rsp - RED_ZONE - 512 - len(data)) & ~0xF
        t.write(at, data)  # a thread at the very bottom of its stack: REMOTE_FAILED
        for blob in blobs:
            where[id(blob)] = at
            at += len(blob)
    results: list[int | None] = [None] * len(steps)
    for i, step in enumerate(steps):
        known = tuple(
            (results[a.step] or 0)
            if isinstance(a, Ref)
            else where[id(a)]
            if isinstance(a, bytes)
            else a
            for a in step.args
        )
        rv = _syscalls_on(t, tid, compile_batch([Syscall(step.nr, known)], signal_marker=False))[0]
        results[i] = rv
        if step.check and rv is not None and -4096 < rv < 0:
            break
    return results


def _restore(
    t: Tracee,
    tid: int,
    saved: Regs,
    stub: _PlacedStub,
    settled: bool,
    fpregs: bytes | None = None,
    xstate: bytes | None = None,
) -> None:
    """Put the thread's registers back (from an event stop), then the stub slot's bytes.

    The vector state too, although the stub's xrstor/fxrstor restored it already: a callee
    that timed out or crashed never reached it."""
    with contextlib.suppress(TargetGone):  # gone: nothing left to restore
        if not settled:
            t.to_event_stop(tid)
        t.set_regs(tid, saved)
        if xstate is not None:
            t.set_xstate(tid, xstate)
        if fpregs is not None:
            t.set_fpregs(tid, fpregs)
        stub.remove(t)


def remote_syscall(t: Tracee, nr: int, *args: int, thread: int | None = None) -> int:
    """Execute system call ``nr`` in the target; return the raw ``rax`` (negative errno).

    ``thread``: the thread to run it on (default: :meth:`Tracee.pick_thread`).
    """
    result = run_syscalls(t, [Syscall(nr, args)], thread=thread)[0]
    assert result is not None  # a single step always runs
    return result


def run_syscalls(t: Tracee, steps: list[Syscall], thread: int | None = None) -> list[int | None]:
    """Execute ``steps`` in the target one after the other, holding one thread once.

    Returns each step's raw result (negative errno), None for a step that did not run
    because a checked step before it failed.
    """
    batch = compile_batch(steps)
    with stopped(t, thread) as tid:
        return _syscalls_on(t, tid, batch)


def _check(t: Tracee, what: str, rv: int) -> int:
    """A raw system call result; a negative errno becomes :class:`RemoteCallFailed`."""
    if -4096 < rv < 0:
        raise RemoteCallFailed(
            f"{what} failed in process {t.pid}: {os.strerror(-rv)}",
            advice="the target lacks a resource (memory, file descriptors); "
            "free some and try again",
        )
    return rv


def free_gaps(maps: list[tuple[int, int, str, str]], lo: int, hi: int) -> list[tuple[int, int]]:
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


_NO_MFD_EXEC: list[bool] = []  # [True] once the kernel refused MFD_EXEC (older than 6.3)


def _mapping_steps(name: str | None, size: int, prot: int, flags: int, want: int) -> list[Syscall]:
    """The system calls of one mapping: anonymous, or a private mapping of a memfd named
    ``name`` (memfd_create, ftruncate, mmap, close -- the close runs whatever mmap did)."""
    if want:
        flags |= MAP_FIXED_NOREPLACE
    if name is None:
        return [Syscall(SYS_MMAP, (want, size, prot, flags | MAP_ANONYMOUS, -1, 0))]
    raw = name.encode()
    if len(raw) > 249:  # memfd_create(2): at most 249 bytes
        raise ValueError(f"memfd name too long: {name!r}")
    mfd = MFD_CLOEXEC
    if prot & PROT_EXEC and not _NO_MFD_EXEC:
        mfd |= MFD_EXEC
    return [
        Syscall(SYS_MEMFD_CREATE, (raw + b"\0", mfd)),
        Syscall(SYS_FTRUNCATE, (Ref(0), size)),
        Syscall(SYS_MMAP, (want, size, prot, flags, Ref(0), 0), check=False),
        Syscall(SYS_CLOSE, (Ref(0),), check=False),
    ]


def _map_on(t: Tracee, tid: int, batch: Batch, size: int) -> int:
    """One mapping (:func:`_mapping_steps`) in one stub run; the raw mmap result. A failed
    memfd_create or ftruncate raises REMOTE_FAILED, its descriptor closed."""
    res = _syscalls_on(t, tid, batch)
    if len(batch.steps) == 1:
        return res[0] or 0
    fd, truncated, mapped = res[0] or 0, res[1], res[2]
    create = batch.steps[0]
    if fd == -EINVAL and create.args[1] != MFD_CLOEXEC:
        _NO_MFD_EXEC.append(True)  # a kernel older than 6.3 does not know MFD_EXEC
        again = Syscall(SYS_MEMFD_CREATE, (create.args[0], MFD_CLOEXEC))
        return _map_on(t, tid, compile_batch([again, *batch.steps[1:]]), size)
    _check(t, "memfd_create", fd)
    if truncated is not None and truncated < 0:
        _syscalls_on(t, tid, compile_batch([Syscall(SYS_CLOSE, (fd,))]))
        _check(t, "ftruncate", truncated)
    assert mapped is not None
    return mapped


def remote_mmap(
    t: Tracee,
    size: int,
    prot: int,
    near: tuple[int, int] | None = None,
    name: str | None = None,
    thread: int | None = None,
) -> int:
    """Map ``size`` bytes (rounded up to pages) in the target with protection ``prot``.

    ``near=(lo, hi)``: the mapping lies entirely inside [lo, hi) (a free gap from
    /proc/PID/maps, claimed with MAP_FIXED_NOREPLACE, retried if something took it first).
    ``name``: the mapping is a private mapping of ``memfd_create(name)``, so /proc/PID/maps
    shows ``/memfd:<name> (deleted)`` (this kernel has no CONFIG_ANON_VMA_NAME). It is
    MAP_PRIVATE so that a fork of the target copies it like any other private memory.

    All system calls of one try run in one stub run (one short hold of one thread),
    compiled before the hold; the free gaps are read from /proc/PID/maps before too, while
    the program runs.
    """
    size = _page_up(max(size, 1))
    if near is None:
        batch = compile_batch(_mapping_steps(name, size, prot, MAP_PRIVATE, 0))
        with stopped(t, thread) as tid:
            return _check(t, "mmap", _map_on(t, tid, batch, size))
    lo, hi = near
    for _attempt in range(8):
        cands = _near_candidates(read_maps(t.pid), size, lo, hi)
        if not cands:
            break
        want = cands[0]
        batch = compile_batch(_mapping_steps(name, size, prot, MAP_PRIVATE, want))
        with stopped(t, thread) as tid:
            got = _map_on(t, tid, batch, size)
            if got >= 0 and got != want:  # flag ignored (old kernel): the kernel chose elsewhere
                _syscalls_on(t, tid, compile_batch([Syscall(SYS_MUNMAP, (got, size))]))
                break
        if got == want:
            return got
        if got == -EEXIST:
            continue  # taken since we read the maps: read them again
        _check(t, "mmap", got)
    raise LivespliceError(
        f"no free {size}-byte range in [{lo:#x}, {hi:#x}) of process {t.pid}",
        advice="the update must lie within ±2 GB of the code it patches",
    )


def remote_munmap(t: Tracee, addr: int, size: int) -> None:
    """munmap inside the target (a failure raises REMOTE_FAILED)."""
    remote_munmap_all(t, [(addr, size)])


def remote_munmap_all(t: Tracee, ranges: list[tuple[int, int]]) -> None:
    """munmap each (address, size) inside the target, holding one thread once (six per run);
    every one is tried, then the first failure raises REMOTE_FAILED."""
    for i in range(0, len(ranges), len(RESULT_REGS)):
        chunk = ranges[i : i + len(RESULT_REGS)]
        steps = [Syscall(SYS_MUNMAP, (a, _page_up(n)), check=False) for a, n in chunk]
        for rv in run_syscalls(t, steps):
            _check(t, "munmap", rv or 0)


def remote_mprotect(t: Tracee, addr: int, size: int, prot: int) -> None:
    """mprotect inside the target (a failure raises REMOTE_FAILED)."""
    _check(t, "mprotect", remote_syscall(t, SYS_MPROTECT, addr, _page_up(size), prot))


def remote_call(
    t: Tracee, func: int, *args: int, timeout: float = 5.0, thread: int | None = None
) -> int:
    """Call ``func(args...)`` (integer arguments) on one thread of the target; return ``eax``.

    The call runs through a call stub (module docstring) on the thread's own stack below its
    red zone, 16-byte aligned at the call (psABI 3.2.2: ``rsp + 8`` is a multiple of 16 at
    function entry). Other threads stay as they are (stopped inside a stop window, running
    otherwise).

    :raises HookFailed: the callee crashed (its signal is swallowed) or ran past ``timeout``;
        the thread's registers are restored either way.
    """
    with stopped(t, thread) as tid:
        saved = _without_restart_block(t.get_regs(tid))
        xstate = t.get_xstate(tid)
        fpregs = None if xstate is not None else t.get_fpregs(tid)
        if xstate is not None:
            area = (saved.rsp - RED_ZONE - len(xstate)) & ~0x3F  # xsave needs 64 alignment
            sp = area - XSAVE_OFFSET
            t.write(area, bytes(len(xstate)))  # zero header (and fails here if no stack)
        else:
            sp = ((saved.rsp - RED_ZONE - 512) & ~0xF) - 16  # fxsave area at sp + 16
        t.write(sp - 64, b"\0" * 64)  # fails here, not in the target, if the stack is full
        code, after = call_stub(func, resume_regs(saved), xsave=xstate is not None)
        stub = _place_stub(t, code)
        r = saved.copy()
        _set_args(r, args, ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))
        r.rip = stub.addr
        r.rsp = sp
        r.rax = 0  # variadic callees read al = number of vector registers used
        r.orig_rax = _MASK64
        settled = False
        try:
            t.set_regs(tid, r)
            _point("regs-set", "call")
            rv = _run_call(t, tid, func, stub.addr + after, timeout)
            t.run_to_syscall_stop(tid, stub.addr + after, SYS_GETPID)  # its exit
            _point("after-call", "call")
            t.to_event_stop(tid)
            settled = True
            _point("before-restore", "call")
            return rv
        finally:
            _restore(t, tid, saved, stub, settled, fpregs, xstate)


def _without_restart_block(saved: Regs) -> Regs:
    """A pending ``-ERESTART_RESTARTBLOCK`` restart made a plain restart of the call.

    ``restart_syscall`` continues from the thread's ``restart_block`` in the kernel, which a
    callee's own interruptible sleep (nanosleep, poll with a timeout, futex) replaces: the
    original call would then fail with EINTR (seen: a thread hijacked in nanosleep whose
    callee slept). Re-executing the original system call instead (``rax = orig_rax``,
    ``rip -= 2``, like the -EINTR rewind in :meth:`Tracee.stop`) is safe; its timeout starts
    afresh.
    """
    if saved.orig_rax >> 63 or -_signed64(saved.rax) != ERESTART_RESTARTBLOCK:
        return saved
    r = saved.copy()
    r.rax = r.orig_rax
    r.rip -= 2
    return r


def _run_call(t: Tracee, tid: int, func: int, at: int, timeout: float) -> int:
    """Run the call stub up to the entry stop of its ``getpid`` (just before ``at``); return
    the callee's ``eax`` (kept in ``rdi``). The callee's own system calls stop too: passed."""
    deadline = time.monotonic() + timeout
    t.run_thread(tid, PTRACE_SYSCALL)
    nap = 0.0001
    while True:
        st = t.wait_thread(tid, block=False)
        if st is None:
            if time.monotonic() < deadline:
                # the program's other threads may run (outside a stop window): pass on their
                # signals and clone events instead of leaving them stopped while we wait
                t.service(skip=tid)
                time.sleep(nap)
                nap = min(nap * 2, 0.01)
                continue
            t.to_event_stop(tid)  # interrupts it: safe to restore from there
            raise HookFailed(
                f"the function at {func:#x} did not return within {timeout:g} s",
                details=[
                    f"thread {tid} ({t.thread_name(tid)}) was interrupted; "
                    "its registers are restored"
                ],
                advice="a hook must not block (other threads may be stopped)",
            )
        sig, event = st
        if event == PTRACE_EVENT_EXIT:
            raise TargetGone(f"process {t.pid} exited during a call into it")
        if sig == SYSCALL_STOP_SIG:
            now = t.get_regs(tid)
            if now.rip == at and now.orig_rax == SYS_GETPID:
                edi = now.rdi & 0xFFFFFFFF
                return edi - (1 << 32) if edi >> 31 else edi
        elif event == 0 and sig in CRASH_SIGNALS:
            now = t.get_regs(tid)
            t.take_signal(tid, sig)
            t.to_event_stop(tid)  # out of the signal-delivery-stop before anything else
            raise HookFailed(
                f"the function at {func:#x} crashed with {signal.Signals(sig).name}",
                details=[
                    f"thread {tid}: rip={now.rip:#x} rsp={now.rsp:#x}; "
                    "registers restored, the signal was not delivered"
                ],
            )
        # a real signal for the program (recorded, delivered at resume), a clone, a stale
        # interrupt, the callee's own system calls: run on
        t.run_thread(tid, PTRACE_SYSCALL)
