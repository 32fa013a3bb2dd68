"""Run-pre matching: find the update's ``pre`` code in a running process and learn addresses.

This is the trust anchor of an update (Ksplice, EuroSys 2009, section 3): every pre function
is found in the running memory and compared instruction by instruction with the code the
update was built from. Relocation fields are wildcards, and what the running code holds in
them reveals where each referenced symbol lives -- static functions, static data, string
literals, PLT entries -- without debug info and even in stripped binaries.

The running code was usually linked from objects built WITHOUT ``-ffunction-sections``,
so the comparison accepts the encodings a linker or assembler legitimately changes:

* ``jmp``/``jcc`` ``rel8`` vs ``rel32`` to the same target: a tail jump to another function
  of the same unit is a 2-byte ``jmp`` when both share ``.text``, but a 5-byte ``jmp`` with a
  relocation when each function has its own section (seen in the kernel's security/selinux/hooks.o);
  intra-function branch targets are checked through a pre-offset -> running-address map;
* nop padding of different lengths (``.p2align`` depends on the surrounding layout);
* the linker's GOTPCRELX relaxations (x86-64 psABI appendix B.2 "Optimize GOTPCRELX
  Relocations"): ``mov foo@GOTPCREL(%rip), %reg`` -> ``lea foo(%rip), %reg`` or (non-PIE)
  ``mov $foo, %reg``; ``call *foo@GOTPCREL(%rip)`` -> ``addr32 call foo``; ``jmp
  *foo@GOTPCREL(%rip)`` -> ``jmp foo; nop``; ``test``/binop with the GOT operand -> immediate;
* the initial-exec -> local-exec TLS relaxation in executables (psABI "Thread-Local Storage",
  ``mov x@gottpoff(%rip), %reg`` -> ``mov $x@tpoff, %reg``).

Matching repeats until no progress: an address learned from one function's relocation
fields can be the only candidate of another function (and tells apart duplicate static
names); the whole text is searched only for functions that have no candidate at all.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from livesplice.arch.x86_64 import (
    ABSOLUTE,
    GOT_RELATIVE,
    PC_RELATIVE,
    Insn,
    decode,
    field_size,
    fields_masked,
    read_field,
    reloc_field,
    signed,
    symbol_address,
)
from livesplice.errors import NoMatch
from livesplice.process.image import MappedImage
from livesplice.process.procmaps import Mapping, mapping_at
from livesplice.update.format import Reloc, Section, Target

Read = Callable[[int, int], bytes]

# where an earlier livesplice update's code lives (state/remote name their memfds this way)
LIVESPLICE_MEMFD = "/memfd:livesplice"

_BRANCHES = {"jmp", "call"}
# Mergeable sections (SHF_MERGE): gcc puts string literals in .rodata[.<fn>].str<N>.<align>
# and constants in .rodata.cst<N>, and ld merges their entries across the whole output
# (deduplicated, each placed on its own), so "section + addend" has no single section base:
# nginx's ngx_http_script_regex_end_code reaches two strings of .rodata.<fn>.str1.1 that ld
# placed 0x2c17 bytes apart. For these, a field reveals where ONE entry lives (S + A), so
# learning and the consistency check are per (key, addend). (ELF gABI, "sh_flags: SHF_MERGE")
_MERGEABLE = re.compile(r"\.(str\d+\.\d+|cst\d+)$")
_MAX_BRUTE_CANDIDATES = 4096


@dataclass
class MatchResult:
    """Where the update's pre code runs in one image of one process."""

    functions: dict[str, int]  # pre section key -> running address where its code was found
    # pre section key -> function entry (where the trampoline goes); differs from
    # functions[k] when the entry already jumps to an earlier livesplice replacement
    entries: dict[str, int]
    learned: dict[str, int]  # symbol key -> running address learned from relocation fields
    warnings: list[str] = field(default_factory=list)
    # pre section key -> running [start, end) of the matched code (for the stop-window check)
    extents: dict[str, tuple[int, int]] = field(default_factory=dict)
    # TLS symbol key -> offset of the variable from the thread pointer (%fs:0)
    tpoff: dict[str, int] = field(default_factory=dict)
    # symbol key -> running address of the image's GOT slot that holds its address
    got_slots: dict[str, int] = field(default_factory=dict)
    # TLS symbol key -> running address of the image's GOT pair for __tls_get_addr
    tlsgd: dict[str, int] = field(default_factory=dict)


@dataclass
class _Learn:
    kind: str  # "addr" | "tpoff" | "tlsgd" | "got"
    key: str
    value: int
    where: str  # for messages: "work+0x12 (R_X86_64_PC32)"


@dataclass
class _Attempt:
    ok: bool
    address: int
    entry: int
    end: int = 0
    learned: list[_Learn] = field(default_factory=list)
    fail_off: int = -1
    expected: bytes = b""
    found: bytes = b""
    why: str = ""


def _lea_adds_to_itself(ins: Insn) -> bool:
    """``lea N(%reg), %reg``: the only lea that equals ``add $N, %reg`` (the linker's
    initial-exec -> local-exec relaxation); ``lea N(%rbx), %rax`` computes something else."""
    dest, _, mem = ins.op_str.partition(",")
    mem = mem.strip()
    if not (mem.startswith("[") and mem.endswith("]")):
        return False
    base = mem[1:-1].split("+")[0].split("-")[0].strip()
    return base == dest.strip()


def _reg_operand(ins: Insn) -> str:
    """The register operand of a two-operand instruction ("" if none)."""
    for op in ins.op_str.split(","):
        op = op.strip()
        if op and "[" not in op and not op[0].isdigit() and not op.startswith("-"):
            return op
    return ""


class _Matcher:
    def __init__(
        self,
        read: Read,
        image: MappedImage,
        target: Target,
        maps: list[Mapping],
        offline: bool = False,
    ):
        self.read = read
        self.image = image
        self.target = target
        self.maps = maps
        # a file on disk (not a process): GOT slots are not filled in, learn nothing from them
        self.offline = offline
        self.learned: dict[tuple[str, str], _Learn] = {}
        self._text: list[tuple[int, bytes]] | None = None

    # -- memory -------------------------------------------------------------------------
    def read_code(self, addr: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``addr``, within its mapping (b"" when unmapped or unreadable)."""
        m = mapping_at(self.maps, addr)
        if m is None:
            return b""
        n = min(n, m.end - addr)
        try:
            return self.read(addr, n)
        except OSError:
            return b""

    def read_u64(self, addr: int) -> int | None:
        """The 8-byte word at ``addr`` (a GOT slot), None when unreadable."""
        data = self.read_code(addr, 8)
        return struct.unpack("<Q", data)[0] if len(data) == 8 else None

    def text(self) -> list[tuple[int, bytes]]:
        """The image's executable ranges and their bytes, read once (for the brute-force search)."""
        if self._text is None:
            self._text = [(lo, self.read_code(lo, hi - lo)) for lo, hi in self.image.text]
        return self._text

    # -- learning -----------------------------------------------------------------------
    def learn_field(
        self, r: Reloc, value: int, place: int, sec: Section, out: list[_Learn]
    ) -> str | None:
        """Learn from one relocation field whose running value is ``value`` at ``place``.

        Returns an error text when the field cannot be right (e.g. a GOT slot not mapped).
        """
        where = f"{sec.name}+{r.offset:#x} ({r.type})"
        t = r.type
        if _MERGEABLE.search(r.symbol) and t in PC_RELATIVE | ABSOLUTE:
            entry = value + place if t in PC_RELATIVE else value
            out.append(_Learn("merged", f"{r.symbol}{r.addend:+#x}", entry & (2**64 - 1), where))
            return None
        addr = symbol_address(t, value, place, r.addend)
        if addr is not None:
            out.append(_Learn("addr", r.symbol, addr, where))
        elif t in GOT_RELATIVE and self.offline:
            out.append(_Learn("got", r.symbol, value - r.addend + place, where))
        elif t == "R_X86_64_GOTTPOFF" and self.offline:
            pass
        elif t in GOT_RELATIVE:
            slot = value - r.addend + place
            s = self.read_u64(slot)
            if s is None:
                return f"{where}: GOT slot {slot:#x} is not readable"
            out.append(_Learn("got", r.symbol, slot, where))
            out.append(_Learn("addr", r.symbol, s, where))
        elif t in ("R_X86_64_TPOFF32", "R_X86_64_TPOFF64"):
            out.append(_Learn("tpoff", r.symbol, value - r.addend, where))
        elif t == "R_X86_64_GOTTPOFF":
            slot = value - r.addend + place
            s = self.read_u64(slot)
            if s is None:
                return f"{where}: GOT slot {slot:#x} is not readable"
            out.append(_Learn("tpoff", r.symbol, signed(s, 64), where))
        elif t == "R_X86_64_TLSGD":
            out.append(_Learn("tlsgd", r.symbol, value - r.addend + place, where))
        return None

    def conflicts(self, items: list[_Learn]) -> str | None:
        """First disagreement between ``items`` and among themselves, as text."""
        seen = dict(self.learned)
        for it in items:
            old = seen.get((it.kind, it.key))
            if old is not None and old.value != it.value:
                if it.kind == "addr" and self._plt_alias(it.key, old.value, it.value):
                    continue
                return (
                    f"inconsistent addresses for {it.key}: {old.value:#x} (from "
                    f"{old.where}) vs {it.value:#x} (from {it.where})"
                )
            seen[(it.kind, it.key)] = it
        return None

    def _plt_alias(self, key: str, a: int, b: int) -> bool:
        # A function called through its PLT entry and loaded from its GOT slot has two
        # correct addresses (PIE code; interposable symbols in shared libraries) -- but only
        # if the PLT address is THAT symbol's PLT entry (the image's .rela.plt says which).
        if self.image.in_plt(a) == self.image.in_plt(b):
            return False
        plt = a if self.image.in_plt(a) else b
        return self.image.plt_entry(key.rsplit(":", 1)[-1]) == plt

    def commit(self, items: list[_Learn]) -> None:
        """Record what an accepted match learned (a PLT address never replaces the function)."""
        for it in items:
            old = self.learned.get((it.kind, it.key))
            if old is not None and it.kind == "addr" and self.image.in_plt(it.value):
                continue  # keep the function itself rather than its PLT entry
            if old is None or it.kind != "addr" or self.image.in_plt(old.value):
                self.learned[(it.kind, it.key)] = it

    def known(self, kind: str, key: str) -> int | None:
        """The value learned for (kind, key), None if nothing was learned yet."""
        it = self.learned.get((kind, key))
        return None if it is None else it.value

    # -- comparing one candidate --------------------------------------------------------
    def attempt(self, sec: Section, entry: int) -> _Attempt:
        """Compare ``sec`` with the running code at candidate ``entry`` (past a livesplice
        jump when updates are stacked)."""
        address = self.follow_livesplice_jump(entry)
        if not sec.executable:
            return self.attempt_data(sec, address, entry)
        pre = sec.bytes
        run_code = self.read_code(address, 2 * len(pre) + 64)
        if not run_code:
            return _Attempt(False, address, entry, fail_off=0, why="not mapped")
        pre_insns = decode(pre, 0)
        if sum(i.size for i in pre_insns) != len(pre):
            return _Attempt(False, address, entry, fail_off=0, why="pre code does not decode")
        run_insns = decode(run_code, address)
        relocs = sorted(sec.relocs, key=lambda r: r.offset)
        res = _Attempt(True, address, entry)
        offmap: dict[int, int] = {}
        run_nops: dict[int, int] = {}  # running nop address -> address after its nop run
        branches: list[tuple[int, int, int]] = []  # (pre off, pre target off, run target)
        i = j = 0
        while i < len(pre_insns):
            p = pre_insns[i]
            if p.is_nop or (j < len(run_insns) and run_insns[j].is_nop):
                skipped_pre = []
                while i < len(pre_insns) and pre_insns[i].is_nop:
                    skipped_pre.append(pre_insns[i].off)
                    i += 1
                skipped_run = []
                while j < len(run_insns) and run_insns[j].is_nop:
                    skipped_run.append(run_insns[j].off)
                    j += 1
                after = run_insns[j].off if j < len(run_insns) else address + len(run_code)
                for off in skipped_pre:
                    offmap[off] = after
                for a in skipped_run:
                    run_nops[a] = after
                continue
            if j >= len(run_insns):
                return self._fail(res, p, b"", "running code ends")
            r = run_insns[j]
            offmap[p.off] = r.off
            rels = [x for x in relocs if p.off <= x.offset < p.off + p.size]
            why = self.compare_insn(sec, p, r, rels, res, branches)
            if why is not None:
                return self._fail(res, p, r.raw, why)
            i += 1
            j += 1
        res.end = run_insns[j - 1].off + run_insns[j - 1].size if j else address
        offmap[len(pre)] = res.end
        for off, tgt_off, run_tgt in branches:
            want = offmap.get(tgt_off)
            got = run_nops.get(run_tgt, run_tgt)
            if want is None or run_nops.get(want, want) != got:
                p = next(x for x in pre_insns if x.off == off)
                run_raw = self.read_code(offmap[off], p.size)
                return self._fail(res, p, run_raw, "branch target differs")
        why = self.conflicts(res.learned)
        if why is not None:
            res.ok, res.why = False, why
        return res

    @staticmethod
    def _fail(res: _Attempt, p: Insn, found: bytes, why: str) -> _Attempt:
        res.ok = False
        res.fail_off, res.expected, res.found, res.why = p.off, p.raw, found, why
        return res

    def compare_insn(
        self,
        sec: Section,
        p: Insn,
        r: Insn,
        rels: list[Reloc],
        res: _Attempt,
        branches: list[tuple[int, int, int]],
    ) -> str | None:
        """Compare one pre instruction with its running twin; the reason they differ, or None."""
        if not rels:
            tgt = p.branch_target
            if tgt is not None and 0 <= tgt <= len(sec.bytes):
                rt = r.branch_target
                if r.mnemonic != p.mnemonic or rt is None:
                    return "different instruction"
                branches.append((p.off, tgt, rt))
                return None
            return None if p.raw == r.raw else "different bytes"
        # same encoding: bytes equal outside the relocation fields
        if p.size == r.size and self._equal_outside(p, r, rels):
            for x in rels:
                pos = x.offset - p.off
                value = reloc_field(r.raw, pos, x.type)
                err = self.learn_field(x, value, r.off + pos, sec, res.learned)
                if err:
                    return err
            return None
        if len(rels) != 1:
            return "different bytes"
        return self.compare_alternate(sec, p, r, rels[0], res)

    @staticmethod
    def _equal_outside(p: Insn, r: Insn, rels: list[Reloc]) -> bool:
        fields = [(x.offset, x.type) for x in rels]
        return fields_masked(p.raw, p.off, fields) == fields_masked(r.raw, p.off, fields)

    def compare_alternate(
        self, sec: Section, p: Insn, r: Insn, x: Reloc, res: _Attempt
    ) -> str | None:
        """One instruction with one relocation, encoded differently in the running code."""
        where = f"{sec.name}+{x.offset:#x} ({x.type})"
        pos = x.offset - p.off
        field_at_end = pos + 4 == p.size
        rt = r.branch_target
        # jmp/jcc/call rel32 with a relocation vs a shorter (or longer) direct branch:
        # target T = end of insn + S + A - P, and P = end - 4, so S = T - A - 4.
        if x.type in PC_RELATIVE and field_at_end and p.branch_target is not None:
            if r.mnemonic != p.mnemonic or rt is None:
                return "different instruction"
            res.learned.append(_Learn("addr", x.symbol, rt - x.addend - 4, where))
            return None
        if x.type in GOT_RELATIVE and field_at_end:
            # call/jmp *foo@GOTPCREL(%rip) -> (addr32) call foo / jmp foo; nop: S = target
            if p.mnemonic in _BRANCHES and "[rip" in p.op_str:
                if r.mnemonic != p.mnemonic or rt is None:
                    return "different instruction"
                res.learned.append(_Learn("addr", x.symbol, rt, where))
                return None
            if p.size == r.size and _reg_operand(p) == _reg_operand(r):
                # mov -> lea foo(%rip): same field, now S + A - P instead of GOT + A - P
                if p.mnemonic == "mov" and r.mnemonic == "lea" and "[rip" in r.op_str:
                    value = read_field(r.raw, pos, 4)
                    res.learned.append(
                        _Learn("addr", x.symbol, value - x.addend + r.off + pos, where)
                    )
                    return None
                # non-PIE: mov/test/binop $foo, %reg -- imm32 where disp32 was; S + A - P
                # becomes S alone (the linker drops the addend of the PC-relative form)
                if self._same_op_to_imm(p, r):
                    s = read_field(r.raw, pos, 4, is_signed=self._rex_w(r))
                    res.learned.append(_Learn("addr", x.symbol, s & (2**64 - 1), where))
                    return None
        # initial-exec -> local-exec: mov/add x@gottpoff(%rip), %reg -> mov/add $tpoff, %reg
        # (or lea tpoff(%reg), %reg); the immediate is where the displacement was
        if (
            x.type == "R_X86_64_GOTTPOFF"
            and field_at_end
            and p.size == r.size
            and _reg_operand(p) == _reg_operand(r)
            and (
                self._same_op_to_imm(p, r)
                or (p.mnemonic == "add" and r.mnemonic == "lea" and _lea_adds_to_itself(r))
            )
        ):
            res.learned.append(_Learn("tpoff", x.symbol, read_field(r.raw, pos, 4), where))
            return None
        return "different bytes"

    @staticmethod
    def _rex_w(ins: Insn) -> bool:
        return bool(ins.raw) and 0x48 <= ins.raw[0] <= 0x4F

    @staticmethod
    def _same_op_to_imm(p: Insn, r: Insn) -> bool:
        ops = r.op_str.split(",")
        if len(ops) != 2 or "[" in r.op_str:
            return False
        try:
            int(ops[1].strip(), 0)
        except ValueError:
            return False
        return r.mnemonic == p.mnemonic

    def attempt_data(self, sec: Section, address: int, entry: int) -> _Attempt:
        """Pre data: only the relocation fields are read (the rest may have changed)."""
        res = _Attempt(True, address, entry, end=address + sec.size)
        run = self.read_code(address, sec.size)
        if len(run) < sec.size:
            res.ok, res.fail_off, res.why = False, 0, "not mapped"
            return res
        for x in sec.relocs:
            value = reloc_field(run, x.offset, x.type)
            err = self.learn_field(x, value, address + x.offset, sec, res.learned)
            if err:
                res.ok, res.why = False, err
                return res
        why = self.conflicts(res.learned)
        if why is not None:
            res.ok, res.why = False, why
        return res

    def follow_livesplice_jump(self, entry: int) -> int:
        """Stacking: an entry that is ``jmp rel32`` into livesplice code -> the jump target."""
        for _ in range(8):
            head = self.read_code(entry, 5)
            if len(head) < 5 or head[0] != 0xE9:
                return entry
            tgt = entry + 5 + read_field(head, 1, 4)
            m = mapping_at(self.maps, tgt)
            if m is None or not m.path.startswith(LIVESPLICE_MEMFD):
                return entry
            entry = tgt
        return entry

    # -- candidates ---------------------------------------------------------------------
    def candidates(self, sec: Section) -> tuple[list[int], bool]:
        """Candidate entries and whether they are authoritative (learned from relocations)."""
        learned: list[int] = []
        for key, off in [(sec.key, 0), *sec.symbols.items()]:
            v = self.known("addr", key)
            if v is not None and not self.image.in_plt(v) and v - off not in learned:
                learned.append(v - off)
        if learned:
            return learned, True
        return self.image.symbols(sec.name), False

    def brute_force(self, sec: Section) -> list[int]:
        """Search all executable text of the image for the pre code (Ksplice does the same
        when there is no symbol table): anchor on a fixed byte run, then verify each hit.

        Relocation fields are wildcards; nops and branches with a relocation are left out
        of the runs, as the running code may encode them differently. A run before the
        first such instruction keeps its offset from the entry; a later one is only used to
        filter hits of a short early run (its offset may shift by a few bytes).
        """
        pre = sec.bytes
        fixed = [True] * len(pre)
        for x in sec.relocs:
            for k in range(x.offset, min(x.offset + field_size(x.type), len(pre))):
                fixed[k] = False
        stable_end = len(pre)
        if sec.executable:
            for ins in decode(pre, 0):
                has_rel = any(ins.off <= x.offset < ins.off + ins.size for x in sec.relocs)
                if ins.is_nop or (
                    has_rel and (ins.branch_target is not None or x_is_gotpcrel(sec, ins))
                ):
                    stable_end = min(stable_end, ins.off)
                    for k in range(ins.off, ins.off + ins.size):
                        fixed[k] = False
        runs: list[tuple[int, int]] = []
        k = 0
        while k < len(pre):
            if fixed[k]:
                s = k
                while k < len(pre) and fixed[k]:
                    k += 1
                runs.append((s, k))
            else:
                k += 1
        if not runs:
            return []
        best = max(runs, key=lambda x: x[1] - x[0])
        stable = max(
            (x for x in runs if x[1] <= stable_end), key=lambda x: x[1] - x[0], default=None
        )
        if stable is None:
            stable, check = best, None
        else:
            check = best if stable[1] - stable[0] < 8 and best != stable else None
        anchor = pre[stable[0] : stable[1]]
        out: list[int] = []
        for base, data in self.text():
            pos = data.find(anchor)
            while pos >= 0 and len(out) < _MAX_BRUTE_CANDIDATES:
                cand = pos - stable[0]
                if (
                    check is None
                    or data.find(
                        pre[check[0] : check[1]],
                        max(cand + check[0] - 32, 0),
                        cand + check[1] + 32,
                    )
                    >= 0
                ):
                    out.append(base + cand)
                pos = data.find(anchor, pos + 1)
        if len(out) >= _MAX_BRUTE_CANDIDATES:
            # The real function may be among the candidates never tried, and a lone
            # look-alike must not be taken for it: refuse rather than guess.
            raise NoMatch(
                f"no match for {sec.name}: its code is too common to find without a symbol "
                f"table ({len(out)}+ places start like it)",
                advice="apply to an unstripped build, or one with its symbol table (.symtab)",
            )
        return out


def x_is_gotpcrel(sec: Section, ins: Insn) -> bool:
    """Whether ``ins`` holds a GOT-relative field the linker may have relaxed (re-encoded)."""
    return any(
        ins.off <= x.offset < ins.off + ins.size
        and (x.type in GOT_RELATIVE or x.type == "R_X86_64_GOTTPOFF")
        for x in sec.relocs
    )


def _describe(sec: Section, failures: list[_Attempt]) -> str:
    if not failures:
        return f"no match for {sec.name}: no candidate (no symbol; not found in the text)"
    best = max(failures, key=lambda a: a.fail_off)
    if best.fail_off < 0:
        return f"no match for {sec.name} at {best.address:#x}: {best.why}"
    return (
        f"no match for {sec.name}: first difference at +{best.fail_off:#x}: expected "
        f"{best.expected.hex(' ') or '(nothing)'} found {best.found.hex(' ') or '(nothing)'}"
        f" ({best.why}, candidate {best.address:#x})"
    )


def run_pre_match(
    read: Read,
    image: MappedImage,
    target: Target,
    maps: list[Mapping],
    *,
    compiler: str = "",
    offline: bool = False,
) -> MatchResult:
    """Find every ``pre`` section of ``target`` in ``image``; raise NoMatch on any doubt.

    ``read(addr, n)`` reads the process's memory; ``compiler`` is the update's compiler
    identity (Manifest.compiler) to compare with the image's ``.comment``. ``offline``: the
    image is a file on disk (:func:`livesplice.process.image.file_image`), not relocated.
    """
    m = _Matcher(read, image, target, maps, offline)
    result = MatchResult({}, {}, {})
    compiler = compiler or str(getattr(target, "compiler", "") or "")
    if compiler and compiler not in image.comment:
        built_by = image.comment.splitlines()[-1] if image.comment else "an unknown compiler"
        result.warnings.append(
            f"{image.path} was built by {built_by}, the update by {compiler}; the code "
            "comparison decides"
        )
    pending = {s.key: s for s in target.sections if s.role == "pre"}
    failures: dict[str, list[_Attempt]] = {}
    ambiguous: dict[str, list[int]] = {}
    brute_done: set[str] = set()
    brute = False
    while pending:
        progress = False
        for key, sec in list(pending.items()):
            cands, authoritative = m.candidates(sec)
            if not cands and brute and key not in brute_done:
                brute_done.add(key)
                cands = m.brute_force(sec)
            if not cands:
                continue
            attempts = [m.attempt(sec, c) for c in cands]
            good = [a for a in attempts if a.ok]
            failures[key] = [a for a in attempts if not a.ok]
            if len(good) == 1:
                _accept(m, result, sec, good[0])
                del pending[key]
                ambiguous.pop(key, None)
                failures.pop(key, None)
                progress = True
            elif len(good) > 1:
                ambiguous[key] = [a.entry for a in good]
            elif authoritative:
                ambiguous.pop(key, None)
        if not progress:
            if brute or all(k in brute_done for k in pending):
                break
            brute = True
    if pending:
        lines = []
        for key, sec in pending.items():
            if key in ambiguous:
                addrs = ", ".join(f"{a:#x}" for a in ambiguous[key])
                lines.append(f"multiple candidates for {sec.name} at {addrs}")
            else:
                lines.append(_describe(sec, failures.get(key, [])))
        raise NoMatch(
            lines[0]
            if len(lines) == 1
            else f"{len(lines)} functions do not match {image.path}: {lines[0]}",
            details=lines,
            advice="the running program was not built from the source (or compiler) the update "
            "was created from; create the update from the exact source tree and build "
            "configuration of the running binary",
        )
    return result


def _accept(m: _Matcher, result: MatchResult, sec: Section, a: _Attempt) -> None:
    items = list(a.learned)
    # the function itself: other code calls it at its entry (its trampoline, when stacked)
    items.append(_Learn("addr", sec.key, a.entry, f"{sec.name} (matched)"))
    for k, off in sec.symbols.items():
        items.append(
            _Learn("addr", k, a.entry if off == 0 else a.address + off, f"{sec.name} (matched)")
        )
    why = m.conflicts(items)
    if why is not None:
        raise NoMatch(
            f"no match for {sec.name}: {why}",
            advice="the running code is not what the update was built from",
        )
    m.commit(items)
    result.functions[sec.key] = a.address
    result.entries[sec.key] = a.entry
    result.extents[sec.key] = (a.address, a.end)
    for (kind, key), it in m.learned.items():
        if kind == "merged":
            continue  # checked for consistency only: no section base to resolve against
        {
            "addr": result.learned,
            "tpoff": result.tpoff,
            "got": result.got_slots,
            "tlsgd": result.tlsgd,
        }[kind][key] = it.value


def match_file(path: str, target: Target, *, compiler: str = "") -> MatchResult:
    """Run-pre matching of ``target`` against an ELF file on disk (a shipped binary), as
    apply would do against it running: ``create --verify-against``.

    :raises NoMatch: the file's code is not what the update's pre code was built from.
    """
    from livesplice.process.image import elf_errors, file_image

    try:
        image, maps, read = file_image(path)
    except elf_errors() as e:
        raise NoMatch(f"{path} is not a usable ELF file ({e})") from None
    return run_pre_match(read, image, target, maps, compiler=compiler, offline=True)
