"""The stop window: stop every thread, check none is inside code being replaced, write, resume.

Per attempt (Ksplice's safety check, done with ptrace):

1. stop every thread (:meth:`Tracee.stop`: interrupt all, wait all, read all registers);
2. a thread is *busy* when its ``rip`` lies in a busy range, or a word of its stack (from
   ``rsp`` to the end of the mapping holding ``rsp``) or of its general registers is a
   *return address* into a busy range;
3. busy threads are *run out* of the busy code (below) while every other thread stays
   stopped;
4. none busy: run the ``inside`` hook, write the jumps, resume. Still busy: resume, wait
   ``interval`` (passing signals on meanwhile), try again; after ``retries`` attempts raise
   :class:`CodeBusy` naming thread id, thread name, function and where it was seen.

Running busy threads out (libcare's answer to hot functions; with 64 threads looping through
two replaced functions some thread is inside one at every stop, so retrying alone never
succeeds). Within a budget of ``run_out`` seconds per attempt: let only the busy threads run
for a short slice (``Tracee.let_run``: recorded signals are delivered, handlers run), stop them
again (``PTRACE_INTERRUPT``, like the first stop: a thread blocked in a system call is
interrupted and its call restarted, never left blocking the window), check the threads that
ran, keep the ones now clear stopped, repeat with a longer slice (20 us growing to 1 ms: a
thread preempted by its siblings needs a slice in which the scheduler gets to it). Threads
never leave an interrupt stop here. Single-stepping or hardware breakpoints on return
addresses would be more precise but hold threads in signal-delivery-stops (SIGTRAP): a tool
SIGKILLed then kills the program (the kernel delivers the trap when the tracer vanishes;
measured), and debug registers set by a dead tracer stay armed.

Everything slow happens before the first stop: parsing /proc/PID/maps (for stack bounds),
disassembling the busy functions, allocating the stack buffer. Inside the window: ptrace
calls, one ``process_vm_readv`` for all stacks, a numpy scan, the writes.

Stack scan precision. A purely conservative scan (any word inside a busy function) gives
false positives that never go away: stale copies of addresses in live frames, function
pointers (``pthread_create`` keeps ``start_routine`` in ``struct pthread`` at the top of the
thread's stack mapping). So by default a stack word counts only if it is a *plausible return
address*: it points just after a ``call`` instruction of a busy function (found once by
disassembling the function with capstone; the end of the function counts too, for a final
call to a ``noreturn`` function). This still over-approximates (a stale return address left
in a live frame counts as busy) but never misses a real frame: every frame's return address
is the address after a call. Precise unwinding with ``.eh_frame`` would remove the rest.
A range capstone cannot decode completely falls back to the conservative rule.

Two refinements of that rule. (1) A return site after a *direct call to a busy leaf* (busy
code that runs from the call's target to its first ``ret`` with no call, no indirect jump and
no jump leaving that run) does not count: that frame is
live only while the thread's ip is in the leaf, which the ip check sees. Stale copies of such
return addresses fill the live frames of functions called later from the same depth
(``usleep`` after a loop calling ``around() -> answer()``: 60 of 64 threads looked busy
forever). (2) A word at an instruction boundary of a busy function that is no return site
counts: it is the interrupted ip in the signal frame of a thread running a handler on top of
the function (a function pointer is the entry, not counted; a word inside an instruction is
no ip).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from livesplice.errors import CodeBusy, LivespliceError, TargetGone
from livesplice.faults import checkpoint
from livesplice.process.ptrace import (
    REG_INDEX,
    REG_NAMES,
    REGS_WORDS,
    ThreadInVfork,
    ThreadNotStopping,
    Tracee,
    process_alive,
    realtime,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    Indices = npt.NDArray[np.intp]

# General registers that may hold a return address (e.g. a function that popped it); rip is
# checked on its own, rsp/orig_rax/eflags/segments/fs_base/gs_base never hold code addresses.
SCANNED_REGS = REG_NAMES[: REG_NAMES.index("orig_rax")]  # the 15 general registers but rsp
SCANNED_COLS = frozenset(REG_INDEX[n] for n in SCANNED_REGS)
RIP = REG_INDEX["rip"]
RSP = REG_INDEX["rsp"]
IOV_MAX = 1024
SMALL = 8  # up to this many threads, per-thread work in Python is cheaper than numpy calls
_ALIGN8 = ~7 & ((1 << 64) - 1)  # <limits.h>: most iovecs per process_vm_readv


@dataclass
class BusyThread:
    """A thread found inside (ip) or below (stack, register) a function being replaced."""

    tid: int
    name: str
    function: str
    where: str  # "ip", "stack" or "register"


@dataclass
class PauseStats:
    """What the stop window cost the target: the pause its threads felt, the attempts and threads
    it took."""

    pause_us: float  # first interrupt to last resume of the successful attempt
    attempts: int
    threads: int
    ran_out: int = 0  # busy threads run out of the busy code in the successful attempt
    slices: int = 0  # run-out slices it took
    staggered: int = 0  # rounds quick threads ran on while a laggard got a CPU (Tracee.stop)


class ThreadsBusy(CodeBusy):
    """CODE_BUSY with the threads found busy in the last attempt."""

    def __init__(
        self, reason: str, busy: list[BusyThread], details: list[str], advice: str
    ) -> None:
        super().__init__(reason, details, advice)
        self.busy = busy


# glibc's __restore_rt: mov $__NR_rt_sigreturn, %rax; syscall
_RESTORE_RT = b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05"
# struct rt_sigframe from its first word (pretcode = the restorer): ucontext at +8
# (uc_flags, uc_link, uc_stack[24]) -> uc_mcontext at +48 bytes = word 6; in struct
# sigcontext rsp is word 15 and rip word 16 (arch/x86/include/uapi/asm/sigcontext.h).
_SIGFRAME_RSP = 6 + 15
_SIGFRAME_RIP = 6 + 16


def mapping_index(starts: list[int], ends: list[int], addr: int) -> int | None:
    """Index of the mapping [starts[i], ends[i]) holding ``addr`` (None: in none); the lists are
    sorted."""
    import bisect

    m = bisect.bisect_right(starts, addr) - 1
    return m if m >= 0 and addr < ends[m] else None


class CodeChanged(LivespliceError):
    """The bytes a jump would replace are not the ones recorded (someone else wrote there)."""

    code = CodeBusy.code  # like CODE_BUSY: nothing was changed, retrying may succeed
    abort = "CODE_CHANGED"


@dataclass
class BusyRanges:
    """Sorted busy ranges and the return addresses inside them, ready for numpy lookups."""

    starts: U64
    ends: U64  # exclusive ends
    names: list[str]
    return_sites: set[int] = field(default_factory=set)  # the ones that count
    conservative: list[bool] = field(default_factory=list)  # per range: any word counts
    lo: np.uint64 | int = 0  # first start
    span: np.uint64 | int = 0  # last end - first start
    all_sites: set[int] = field(default_factory=set)  # every return site, counted or not
    boundaries: set[int] = field(default_factory=set)  # instruction starts but the first

    @classmethod
    def build(
        cls,
        ranges: list[tuple[int, int, str]],
        code: Callable[[int, int], bytes | None],
        precise: bool = True,
    ) -> BusyRanges:
        """The busy ranges as sorted arrays, decoded before the stop so the check inside it is
        one vectorised pass (``code`` reads a range's bytes; ``precise``: find return sites,
        else any word in a range counts)."""
        import numpy as np

        rs = sorted(r for r in ranges if r[1] > r[0])
        conservative: list[bool] = []
        decoded: list[DecodedRange | None] = []
        for start, end, _ in rs:
            blob = code(start, end - start) if precise else None
            d = None if blob is None else decode_range(blob, start)
            decoded.append(d)
            conservative.append(d is None)
        leaves = _leaf_entries([d for d in decoded if d is not None], code)
        sites: set[int] = set()
        all_sites: set[int] = set()
        boundaries: set[int] = set()
        for d in decoded:
            if d is None:
                continue
            all_sites |= d.sites.keys()
            boundaries |= d.boundaries
            # after a direct call to a busy leaf: that frame is live only while the thread's
            # ip is in the leaf (caught by ip), or a signal interrupted the leaf (the
            # interrupted ip, an instruction boundary, is on the stack: caught below)
            sites |= {s for s, target in d.sites.items() if target not in leaves}
        lo = rs[0][0] if rs else 0
        return cls(
            starts=np.array([r[0] for r in rs], dtype=np.uint64),
            ends=np.array([r[1] for r in rs], dtype=np.uint64),
            names=[r[2] for r in rs],
            return_sites=sites,
            conservative=conservative,
            lo=np.uint64(lo),
            span=np.uint64(max((r[1] for r in rs), default=0) - lo),
            all_sites=all_sites,
            boundaries=boundaries,
        )

    def lookup(self, values: U64, *, inclusive: bool = False) -> tuple[Indices, Indices]:
        """(indices into ``values``, range index of each) of values inside a range.

        ``inclusive``: a value equal to a range's end counts for that range (the return
        address of a final call to a noreturn function). One vectorised pass keeps only the
        values within [first start, last end] (unsigned wrap-around: ``v - lo <= span``);
        only those few are looked up range by range.
        """
        import numpy as np

        if not len(self.starts) or not len(values):
            empty = np.zeros(0, dtype=np.intp)
            return empty, empty
        cand = np.flatnonzero((values - self.lo) <= self.span)
        if not len(cand):
            return cand, cand
        v = values[cand]
        idx = np.searchsorted(self.starts, v, side="right").astype(np.intp) - 1
        ends = self.ends[idx]
        inside = (v <= ends) if inclusive else (v < ends)
        return cand[inside], idx[inside]

    def counts(self, word: int, rng: int) -> bool:
        """Does a stack/register word inside range ``rng`` count as a frame in it?"""
        if self.conservative[rng]:
            return word < int(self.ends[rng])
        if word in self.return_sites:
            return True
        # an instruction boundary that no call returns to: the interrupted ip saved in a
        # signal frame (ucontext) of a thread running a handler on top of a busy function
        return word in self.boundaries and word not in self.all_sites


@dataclass
class DecodedRange:
    """What the stack check needs to know about one busy function's code."""

    sites: dict[int, int | None]  # return site -> target of its direct call (None: indirect)
    boundaries: set[int]  # every instruction start but the first (the entry)
    leaf: bool  # no call, no jump out of the range, no indirect jump (no tail call)
    # (address, end, kind, direct target or None): kind "call", "jump", "ret" or ""
    insns: list[tuple[int, int, str, int | None]] = field(default_factory=list)


def _leaf_entries(
    decoded: list[DecodedRange], code: Callable[[int, int], bytes | None] | None = None
) -> set[int]:
    """Direct call targets inside the decoded code that start a leaf: from the target, a
    linear run up to the first ``ret`` with no call, no indirect jump and no jump leaving
    that run. While such a callee's frame is live the thread's ip is inside the run (busy
    by ip). Works also when one busy range holds many functions (undo: the whole
    replacement code), and through a 5-byte ``jmp rel32`` at the target (replacement code
    calls the original entry, whose trampoline jumps to the replacement)."""
    index: dict[int, tuple[DecodedRange, int]] = {}
    for d in decoded:
        for i, insn in enumerate(d.insns):
            index[insn[0]] = (d, i)
    out: set[int] = set()
    for d in decoded:
        for target in d.sites.values():
            if target is None or target in out:
                continue
            start = target
            if start not in index and code is not None:
                head = code(start, 5)
                if head is not None and len(head) == 5 and head[0] == 0xE9:
                    start = start + 5 + int.from_bytes(head[1:], "little", signed=True)
            if start not in index:
                continue
            rd, i = index[start]
            end = None
            jumps: list[int | None] = []
            for _addr, insn_end, kind, to in rd.insns[i:]:
                if kind == "call":
                    break
                if kind == "jump":
                    jumps.append(to)
                if kind == "ret":
                    end = insn_end
                    break
            if end is not None and all(j is not None and start <= j < end for j in jumps):
                out.add(target)
    return out


def decode_range(code: bytes, address: int) -> DecodedRange | None:
    """Linear sweep of a function with capstone; None if it does not decode to its end."""
    from livesplice.arch.x86_64 import disassembler

    md = disassembler()
    out = DecodedRange({}, set(), True, [])
    limit = address + len(code)
    end = address
    for insn_addr, size, mnemonic, op_str in md.disasm_lite(code, address):
        end = insn_addr + size
        if insn_addr != address:
            out.boundaries.add(insn_addr)
        op = mnemonic.split()[-1]  # "notrack jmp", "bnd jmp": the last word is the op
        direct = op_str.startswith("0x")
        to = int(op_str, 16) if direct else None
        kind = ""
        if op.startswith("call"):
            out.leaf = False
            out.sites[end] = to
            kind = "call"
        elif op.startswith("j"):
            kind = "jump"
            if to is None or not address <= to < limit:
                out.leaf = False
        elif op.startswith("ret"):
            kind = "ret"
        out.insns.append((insn_addr, end, kind, to))
    # the tail of a range may be alignment padding cut mid-"instruction" (zeros decode as
    # 2-byte adds): fine when nothing but padding bytes is left
    if end != limit and code[end - address :].strip(b"\x00\x90\xcc"):
        return None
    return out


def call_return_sites(code: bytes, address: int) -> set[int] | None:
    """Addresses just after every ``call`` in ``code`` (linear sweep); None if undecodable."""
    from livesplice.arch.x86_64 import disassembler

    md = disassembler()
    sites: set[int] = set()
    end = address
    for insn_addr, size, mnemonic, _ in md.disasm_lite(code, address):
        end = insn_addr + size
        if mnemonic.startswith("call"):
            sites.add(end)
    if end != address + len(code):
        return None
    return sites


def scan_stacks(words: U64, bounds: U64, ranges: BusyRanges) -> dict[int, int]:
    """Which stacks hold a frame of a busy range: {stack index: range index}.

    ``words`` is every stack one after another; stack i is ``words[bounds[i]:bounds[i+1]]``
    (``bounds`` has one more entry than there are stacks). Only the first hit per stack is
    reported.
    """
    import numpy as np

    hits, rng = ranges.lookup(words, inclusive=True)
    out: dict[int, int] = {}
    if not len(hits):
        return out
    owner = np.searchsorted(bounds, hits, side="right") - 1
    for h, r, s in zip(hits.tolist(), rng.tolist(), owner.tolist(), strict=True):
        if s in out:
            continue
        if ranges.counts(int(words[h]), r):
            out[s] = r
    return out


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class StopWindow:
    """Stop the whole process briefly to check busy code and write the trampolines.

    :param busy_ranges: ``[start, end)`` and name of every function being replaced (of the
        replacement code when undoing).
    :param precise: count only plausible return addresses on stacks (see module docstring);
        False = every word inside a range counts (Ksplice's rule).
    :param fifo: run the patcher SCHED_FIFO during the window (:func:`realtime`), the
        default. On a loaded machine a patcher at normal priority is descheduled
        inside the window, with every thread of the target stopped: measured at load ~19 on
        2 CPUs (benchmarks/bench_pause.py --fifo on|off), p99 of the window 0.7/0.5/4.5 ms
        with FIFO for 1/4/8 spinning threads against 2.4/10.5/36 ms without; on the soak
        benchmark (--rt-load) the longest client request during apply fell from 19.5 ms to
        1.7 ms. False: benchmarks compare.
    :param run_out: seconds per attempt for running busy threads out of the busy code while
        the others stay stopped (module docstring); 0 = plain retry. It bounds the extra
        pause of an attempt that finds busy threads.
    """

    def __init__(
        self,
        t: Tracee,
        busy_ranges: list[tuple[int, int, str]],
        *,
        retries: int = 5,
        interval: float = 1.0,
        precise: bool = True,
        fifo: bool = True,
        run_out: float = 0.05,
    ) -> None:
        import numpy as np

        self.t = t
        self.retries = max(1, retries)
        self.interval = interval
        self.fifo = fifo
        self.run_out = run_out
        self.ranges = BusyRanges.build(busy_ranges, self._read_code, precise)
        self._load_maps()
        self._restorers = self._find_signal_restorers()
        self._buf = np.empty(1 << 20, dtype=np.uint8)
        self._iov = np.zeros((64, 2), dtype=np.uint64)
        self._local = _IoVec()
        self._few_iov = (_IoVec * SMALL)()
        self.last_busy: list[BusyThread] = []
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._readv = self._libc.process_vm_readv
        self._readv.restype = ctypes.c_ssize_t

    def _read_code(self, addr: int, size: int) -> bytes | None:
        try:
            return self.t.read(addr, size)
        except TargetGone:
            raise
        except LivespliceError:
            return None

    def _find_signal_restorers(self) -> list[int]:
        """Addresses of glibc's ``__restore_rt`` (``mov $15,%rax; syscall`` =
        rt_sigreturn): the return address at the bottom of every signal frame.

        A thread running a signal handler on an alternate stack (sigaltstack) has the code
        it interrupted on ANOTHER stack; the frame pushed by the kernel (struct rt_sigframe,
        arch/x86/include/asm/sigframe.h) holds that context, found from this address.
        """
        from livesplice.process.remote import read_maps

        out: list[int] = []
        for lo, hi, perms, path in read_maps(self.t.pid):
            if "x" not in perms or "libc" not in path.rsplit("/", 1)[-1]:
                continue
            try:
                data = self.t.read(lo, hi - lo)
            except LivespliceError:
                continue
            at = data.find(_RESTORE_RT)
            while at >= 0:
                out.append(lo + at)
                at = data.find(_RESTORE_RT, at + 1)
        return out

    def _signal_frames_busy(
        self, words: U64, bounds: U64, rsps: list[int], skip: set[int]
    ) -> dict[int, tuple[str, str]]:
        """Threads interrupted by a signal inside busy code, or with busy frames on the
        stack the signal interrupted (when the handler runs on an alternate stack)."""
        import numpy as np

        found: dict[int, tuple[str, str]] = {}
        if not self._restorers or not len(words):
            return found
        r = self.ranges
        # a comparison per restorer (there are one or two): np.isin costs 6x as much here,
        # inside the window
        mask = words == np.uint64(self._restorers[0])
        for addr in self._restorers[1:]:
            mask |= words == np.uint64(addr)
        hits = np.flatnonzero(mask)
        for h in hits.tolist():
            i = int(np.searchsorted(bounds, h, side="right")) - 1
            if i in skip or i in found or h + _SIGFRAME_RIP >= int(bounds[i + 1]):
                continue
            saved_rsp = int(words[h + _SIGFRAME_RSP])
            saved_rip = int(words[h + _SIGFRAME_RIP])
            for k in range(len(r.starts)):
                if int(r.starts[k]) <= saved_rip < int(r.ends[k]):
                    found[i] = (r.names[k], "ip interrupted by a signal")
            if i in found:
                continue
            base = rsps[i] & ~7
            top = base + 8 * (int(bounds[i + 1]) - int(bounds[i]))
            if base <= saved_rsp < top:
                continue  # the same stack: the scan above has read it
            m = mapping_index(self._map_starts_list, self._map_ends_list, saved_rsp)
            if m is None:
                found[i] = ("code interrupted by a signal", "unreadable interrupted stack")
                continue
            lo = saved_rsp & ~7
            try:
                other = self.t.read(lo, self._map_ends_list[m] - lo)
            except LivespliceError:
                found[i] = ("code interrupted by a signal", "unreadable interrupted stack")
                continue
            w2 = np.frombuffer(other[: len(other) // 8 * 8], dtype=np.uint64)
            b2 = np.array([0, len(w2)], dtype=np.uint64)
            for _, k in scan_stacks(w2, b2, r).items():
                found[i] = (r.names[k], "stack interrupted by a signal (sigaltstack)")
        return found

    def _load_maps(self) -> None:
        import numpy as np

        from livesplice.process.remote import read_maps

        maps = read_maps(self.t.pid)
        self._map_starts_list = [m[0] for m in maps]
        self._map_ends_list = [m[1] for m in maps]
        self._map_starts = np.array(self._map_starts_list, dtype=np.uint64)
        self._map_ends = np.array(self._map_ends_list, dtype=np.uint64)

    # ------------------------------------------------------------ the window

    def run(
        self,
        writes: list[tuple[int, bytes]],
        inside: Callable[[], None] | None = None,
        expect: list[bytes] | None = None,
    ) -> PauseStats:
        """Try up to ``retries`` times to find no thread busy; then ``inside()``, writes.

        ``expect``: the bytes each write must replace (what the caller recorded for undo).
        They are compared inside the window, right before writing: code changed since
        planning (another tool, a debugger's breakpoint) aborts with nothing written.

        :raises CodeBusy: (a :class:`ThreadsBusy`) every attempt found a busy thread; the
            process is resumed unchanged.
        :raises TargetGone: the process exited.
        """
        t = self.t
        originals = [(addr, t.read(addr, len(data))) for addr, data in writes]
        priority = t.rt_priority() if self.fifo else 1
        for attempt in range(1, self.retries + 1):
            t.service()  # pass on signals / start new threads before we time anything
            try:
                with realtime(self.fifo, priority), _no_gc():
                    t.seize_all()  # traces, stops nothing: the threads run until stop()
                    t0 = time.perf_counter_ns()
                    t.stop()
                    # the window proper begins with the last round of interrupts: earlier
                    # ones let the quick threads run on (their holds are noted apart)
                    t0 = max(t0, int(t.window_began * 1e9))
                    ran_out = slices = 0
                    try:
                        busy = self._busy_threads()
                        if busy and self.run_out > 0:
                            ran_out = len(busy)
                            busy, slices = self._run_out(busy)
                        if not busy:
                            if expect is not None:
                                self._check_expected(writes, expect)
                            if inside is not None:
                                inside()
                            self._write_all(writes, originals)
                        t.check_alive()
                    except BaseException:
                        with contextlib.suppress(LivespliceError):
                            t.resume()
                        raise
                    nthreads = len(t.threads())
                    t.resume()
                    t1 = time.perf_counter_ns()
            except ThreadNotStopping as e:  # the program ran on, unchanged: try again later
                what = "vfork()" if isinstance(e, ThreadInVfork) else "a wait it would not leave"
                self.last_busy = [BusyThread(e.tid, t.thread_name(e.tid), what, e.where)]
                if attempt < self.retries:
                    self._wait(self.interval)
                continue
            if not busy:
                return PauseStats(
                    (t1 - t0) / 1000.0, attempt, nthreads, ran_out, slices, t.staggered
                )
            self.last_busy = [
                BusyThread(tid, t.thread_name(tid), fn, where) for tid, fn, where in busy
            ]
            if attempt < self.retries:
                self._wait(self.interval)
        raise self._code_busy()

    def _check_expected(self, writes: list[tuple[int, bytes]], expect: list[bytes]) -> None:
        for (addr, _), want in zip(writes, expect, strict=True):
            now = self.t.read(addr, len(want))
            if now != want:
                raise CodeChanged(
                    f"the code at {addr:#x} changed since the update was planned",
                    details=[f"expected {want.hex()}, found {now.hex()}"],
                    advice="another tool or a debugger is modifying this process; "
                    "nothing was written -- retry when it is done",
                )

    def _run_out(self, busy: list[tuple[int, str, str]]) -> tuple[list[tuple[int, str, str]], int]:
        """Let only the busy threads run, in slices, until none is busy or the budget is
        spent. Returns the threads still busy (all stopped) and the number of slices."""
        t = self.t
        deadline = time.perf_counter() + self.run_out
        nap = 20e-6
        slices = 0
        while busy and time.perf_counter() < deadline:
            moved = [tid for tid, _, _ in busy]
            held = set(t.threads()) - set(moved)  # stopped and found clear: they stay so
            t.let_run(moved)
            time.sleep(nap)
            t.stop()  # interrupts only the threads let run (and new ones); all registers
            slices += 1
            nap = min(nap * 1.5, 1e-3)
            # check the threads that ran and the ones created meanwhile
            busy = self._busy_threads(skip=held)
        return busy, slices

    def _code_busy(self) -> ThreadsBusy:
        busy = self.last_busy
        fns = sorted({b.function for b in busy})
        return ThreadsBusy(
            f"{len(busy)} thread(s) stayed inside {', '.join(fns)} "
            f"for {self.retries} attempt(s) {self.interval:g} s apart; nothing was changed",
            busy,
            [f"thread {b.tid} ({b.name}): in {b.function} ({b.where})" for b in busy],
            "retry when the program is less busy (or with more --retries); a function "
            "that never returns (a main loop) cannot be replaced: patch what it calls",
        )

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.t.service()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.01))
            if not process_alive(self.t.pid):
                raise TargetGone(f"process {self.t.pid} exited")

    def _write_all(
        self, writes: list[tuple[int, bytes]], originals: list[tuple[int, bytes]]
    ) -> None:
        done = 0
        try:
            for addr, data in writes:
                self.t.write(addr, data)
                done += 1
                if done == 1:
                    checkpoint("stop:after-first-write")
        except BaseException:
            # never leave half the trampolines written
            for addr, data in reversed(originals[:done]):
                with contextlib.suppress(LivespliceError):
                    self.t.write(addr, data)
            raise

    # ------------------------------------------------------------ the check

    def _busy_threads(self, skip: set[int] | None = None) -> list[tuple[int, str, str]]:
        """(tid, function, where) of every busy thread, from the stop's registers.

        ``skip``: threads known clear that have not run since (not checked again).
        """
        tids, regs = self.t.stopped_regs()
        if skip:
            rows = [i for i, tid in enumerate(tids) if tid not in skip]
            tids = [tids[i] for i in rows]
            regs = regs[rows]
        r = self.ranges
        if not len(r.starts):
            return []
        busy: dict[int, tuple[str, str]] = {}
        # rip and the general registers of every thread in one pass over the array
        flat = regs.reshape(-1)
        hits, rng = r.lookup(flat, inclusive=True)
        if len(hits):
            for h, k in zip(hits.tolist(), rng.tolist(), strict=True):
                row, col = divmod(h, REGS_WORDS)
                word = int(flat[h])
                if col == RIP and word < int(r.ends[k]):
                    busy[row] = (r.names[k], "ip")
                elif col in SCANNED_COLS and r.counts(word, k):
                    busy.setdefault(row, (r.names[k], "register"))
        words, bounds = self._read_stacks(regs)
        for i, k in scan_stacks(words, bounds, r).items():
            if busy.get(i, ("", "register"))[1] == "register":
                busy[i] = (r.names[k], "stack")
        rsps = [int(x) for x in regs[:, RSP]]
        for i, hit in self._signal_frames_busy(words, bounds, rsps, set(busy)).items():
            busy[i] = hit
        return [(tids[i], fn, where) for i, (fn, where) in sorted(busy.items())]

    def _read_stacks(self, regs: U64) -> tuple[U64, U64]:
        """Every thread's stack, rsp up to the end of its mapping, with one process_vm_readv.

        Returns all stacks as one uint64 array and the word offset where each starts.
        """
        import numpy as np

        n = regs.shape[0]
        if n <= SMALL:
            return self._read_few_stacks(regs)
        if self._iov.shape[0] < n:
            self._iov = np.zeros((max(n, 2 * self._iov.shape[0]), 2), dtype=np.uint64)
        iov = self._iov[:n]
        rsp = iov[:, 0]
        np.bitwise_and(regs[:, RSP], _ALIGN8, out=rsp)
        m = np.searchsorted(self._map_starts, rsp, side="right") - 1
        ends = self._map_ends[m]  # m == -1 picks the last mapping: then rsp >= its end
        if (ends <= rsp).any():  # a stack mapped after we read the maps (a new thread): rare
            self._load_maps()
            m = np.searchsorted(self._map_starts, rsp, side="right") - 1
            ends = self._map_ends[m]
            ends = np.where((m < 0) | (ends <= rsp), rsp, ends)  # unknown: read nothing
        np.subtract(ends, rsp, out=iov[:, 1])
        bounds = np.empty(n + 1, dtype=np.uint64)
        bounds[0] = 0
        np.cumsum(iov[:, 1] >> np.uint64(3), out=bounds[1:])
        total = int(bounds[-1]) * 8
        if self._buf.shape[0] < total:
            self._buf = np.empty(total * 2, dtype=np.uint8)
        base = self._buf.ctypes.data
        if n <= IOV_MAX:
            self._local.base = base
            self._local.len = total
            rv = self._readv(
                self.t.pid,
                ctypes.byref(self._local),
                1,
                ctypes.c_void_p(self._iov.ctypes.data),
                n,
                0,
            )
            if rv != total:
                self._read_slowly(iov, 0, n, 0, rv)
        else:
            got = 0
            for first in range(0, n, IOV_MAX):
                cnt = min(IOV_MAX, n - first)
                want = int(iov[first : first + cnt, 1].sum())
                self._local.base = base + got
                self._local.len = want
                rv = self._readv(
                    self.t.pid,
                    ctypes.byref(self._local),
                    1,
                    ctypes.c_void_p(self._iov.ctypes.data + first * 16),
                    cnt,
                    0,
                )
                if rv != want:
                    self._read_slowly(iov, first, cnt, got, rv)
                got += want
        words: U64 = self._buf[:total].view(np.uint64)
        return words, bounds

    def _read_few_stacks(self, regs: U64) -> tuple[U64, U64]:
        """_read_stacks for a few threads: plain Python beats a dozen numpy calls here."""
        import numpy as np

        starts, ends = self._map_starts_list, self._map_ends_list
        iov = self._few_iov
        bounds = [0]
        total = 0
        for i, sp in enumerate(regs[:, RSP].tolist()):
            sp &= _ALIGN8
            j = bisect.bisect_right(starts, sp) - 1
            if j < 0 or sp >= ends[j]:
                self._load_maps()  # a stack mapped after we read the maps: rare
                starts, ends = self._map_starts_list, self._map_ends_list
                j = bisect.bisect_right(starts, sp) - 1
            size = ends[j] - sp if j >= 0 and sp < ends[j] else 0
            iov[i].base = sp
            iov[i].len = size
            total += size
            bounds.append(total >> 3)
        if self._buf.shape[0] < total:
            self._buf = np.empty(total * 2, dtype=np.uint8)
        self._local.base = self._buf.ctypes.data
        self._local.len = total
        n = len(bounds) - 1
        rv = self._readv(self.t.pid, ctypes.byref(self._local), 1, iov, n, 0)
        if rv != total:
            rows = np.array([[iov[i].base or 0, iov[i].len] for i in range(n)], dtype=np.uint64)
            self._read_slowly(rows, 0, n, 0, rv)
        words: U64 = self._buf[:total].view(np.uint64)
        return words, np.array(bounds, dtype=np.uint64)

    def _read_slowly(self, iov: U64, first: int, cnt: int, at: int, rv: int) -> None:
        """process_vm_readv stops at the first unreadable range: read stack by stack."""
        if rv < 0 and not process_alive(self.t.pid):
            raise TargetGone(f"process {self.t.pid} exited")
        off = at
        for i in range(first, first + cnt):
            addr, size = int(iov[i, 0]), int(iov[i, 1])
            try:
                data = self.t.read(addr, size)
            except TargetGone:
                raise
            except LivespliceError:
                data = b"\0" * size  # gone since (thread exited): nothing to find there
            self._buf[off : off + size] = memoryview(data)
            off += size


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage collection pause inside the window (it costs milliseconds)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
