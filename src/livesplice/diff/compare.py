"""Compare a pre section with its post twin by meaning, not by bytes.

Two sections are the same when, after masking every relocated field, their bytes are equal and
their relocations are pairwise equal in *meaning*: same offset and type, and a target that
means the same thing in both builds (:func:`reloc_meaning`):

* a named function or object -> its pre name (post names translate through the twin) and the
  addend (``helper.isra.1 - 4`` in post means ``helper.isra.0 - 4`` in pre);
* a mergeable string (``.rodata.work.str1.1 + 13``) -> the string itself, because adding one
  string literal to a unit shifts the offsets of all the others;
* a mergeable constant (``.rodata.cst8``) -> the constant's bytes;
* other read-only data local to the unit (switch jump tables ``.rodata.<fn>``,
  ``CSWTCH.N``, ``__func__.N``, ``static const`` tables) -> its content, recursively, so a
  jump table travels with its function and a changed ``static const`` table makes every
  function that reads it changed;
* an undefined symbol -> its name and addend.

Line-number-only changes
------------------------
Inserting lines above a function shifts the ``__LINE__`` its ``assert()`` passes to
``__assert_fail``: a changed immediate, with no change to the source of the function. We
recognise that case by *explaining* every difference with the patch itself:

1. the two sections have the same size, relocations (by meaning) and instruction boundaries
   (capstone), and differ only inside immediate operands (``mov $0x2a,%edx``);
2. every differing pair of immediates ``(a, b)`` is a line shift of the patch: in some file
   ``F`` the patch touches, line ``a`` is an unchanged (context) line of pre that is line
   ``b`` in post, ``a != b``;
3. ``a`` lies inside the function's own line rows for ``F`` (DWARF ``.debug_line`` of the pre
   object, inlined code included): the immediate is a line of this very function.

A real change passes all three only if it changes a constant from ``a`` to exactly the new line
number of line ``a`` of the same function -- while the patch moves that function. This is
more robust than matching calls to ``__assert_fail`` (the argument register depends on the
callee and on inlining; printk-style loggers pass lines in many ways), and it needs no second
compile (kernel ``klp-build`` injects ``#line`` directives and rebuilds; our build stage runs
the project's own build system once per side).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from livesplice.diff.elfmodel import PC_RELATIVE, ObjReloc, ObjSection, ObjSymbol

if TYPE_CHECKING:
    from capstone import CsInsn  # no type hints: Any to mypy

# a section's meaning: strings, numbers and nested meanings, compared and hashed whole
Meaning = tuple[object, ...]


class Verdict(enum.Enum):
    """How a post section compares with its pre twin."""

    SAME = "same"
    LINE_ONLY = "line-only"  # differs only in line-number immediates: treated as SAME
    CHANGED = "changed"


@dataclass
class LineMap:
    """Pre line -> post line, per file, from the hunks of a unified diff."""

    # file (path as in the patch, "src/a.c") -> hunks (pre_start, pre_len, post_start,
    # post_len, {pre line: post line for context lines inside the hunk})
    hunks: dict[str, list[tuple[int, int, int, int, dict[int, int]]]] = field(default_factory=dict)

    @classmethod
    def from_patch(cls, text: str) -> LineMap:
        """Read the hunks of a unified diff: which lines moved where, so an immediate that is
        only a line number (``__LINE__``, assertions) can be told from a real change."""
        import re

        hunk_re = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
        out: dict[str, list[tuple[int, int, int, int, dict[int, int]]]] = {}
        current: str | None = None
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("+++ "):
                path = line[4:].split("\t")[0].strip()
                if path.startswith("b/"):
                    path = path[2:]
                current = None if path == "/dev/null" else path
                i += 1
                continue
            m = hunk_re.match(line)
            if m and current is not None:
                pre_start, post_start = int(m.group(1)), int(m.group(3))
                pre_len = int(m.group(2)) if m.group(2) is not None else 1
                post_len = int(m.group(4)) if m.group(4) is not None else 1
                mapping: dict[int, int] = {}
                a, b = pre_start, post_start
                i += 1
                while i < len(lines) and (a < pre_start + pre_len or b < post_start + post_len):
                    body = lines[i]
                    if body.startswith("\\"):
                        i += 1
                        continue
                    tag = body[:1]
                    if tag == "-":
                        a += 1
                    elif tag == "+":
                        b += 1
                    else:
                        mapping[a] = b
                        a += 1
                        b += 1
                    i += 1
                hunk = (pre_start, pre_len, post_start, post_len, mapping)
                out.setdefault(current, []).append(hunk)
                continue
            i += 1
        return cls(out)

    def shift(self, file: str, line: int) -> int | None:
        """Post line of pre ``line`` of ``file``; None when the patch deleted or rewrote it."""
        delta = 0
        for pre_start, pre_len, post_start, post_len, mapping in self.hunks.get(file, []):
            if pre_len and pre_start <= line < pre_start + pre_len:
                return mapping.get(line)
            # A zero-length side names the line *before* the hunk (diff(1) unified format).
            next_pre = pre_start + pre_len if pre_len else pre_start + 1
            next_post = post_start + post_len if post_len else post_start + 1
            if line >= next_pre:
                delta = next_post - next_pre
        return line + delta

    def files_matching(self, dwarf_path: str) -> list[str]:
        """Patch files that are ``dwarf_path`` (DWARF names are often absolute).

        Some builds compile a *copy* of the patched file: Debian's expat rules copy
        ``expat/*`` into ``src/`` and ``srcw/`` and compile those, so DWARF says
        ``src/lib/xmlparse.c`` where the patch says ``expat/lib/xmlparse.c``. When no patch
        file is a suffix of the DWARF path, the one patch file with the same base name stands
        for it (never when two patch files share that name); rules 2 and 3 still have to
        explain every differing immediate.
        """
        exact = [f for f in self.hunks if dwarf_path == f or dwarf_path.endswith("/" + f)]
        if exact:
            return exact
        base = dwarf_path.rsplit("/", 1)[-1]
        same_name = [f for f in self.hunks if f.rsplit("/", 1)[-1] == base]
        return same_name if len(same_name) == 1 else []

    def explains(self, a: int, b: int, function_lines: dict[str, tuple[int, int]]) -> bool:
        """Is ``a -> b`` the line shift of a line of this function (rules 2 and 3 above)?"""
        if a == b:
            return False
        for dwarf_file, (low, high) in function_lines.items():
            if not low <= a <= high:
                continue
            for f in self.files_matching(dwarf_file):
                if self.shift(f, a) == b:
                    return True
        return False


class MeaningContext:
    """Computes relocation meanings for one side (pre or post) of a unit."""

    def __init__(self, side: str) -> None:
        self.side = side  # "pre" or "post"
        self._insn_ends: dict[int, dict[int, int]] = {}
        self._fingerprints: dict[int, Meaning] = {}
        self._in_progress: set[int] = set()

    # -- names ----------------------------------------------------------------------------
    def name_of(self, sym: ObjSymbol) -> str:
        """Pre-side name: post symbols translate through their twin; new ones are marked."""
        if self.side == "post":
            if sym.twin is not None:
                return sym.twin.name
            return "new:" + sym.name
        return sym.name

    def section_name(self, sec: ObjSection) -> str:
        """A side-neutral name of a section (through its primary symbol when it has one), so pre
        and post meanings compare equal when only names differ by the build."""
        primary = sec.primary
        if primary is not None:
            return self.name_of(primary)
        if self.side == "post":
            return sec.twin.name if sec.twin is not None else "new:" + sec.name
        return sec.name

    # -- targets --------------------------------------------------------------------------
    def target_offset(self, sec: ObjSection, rel: ObjReloc) -> int:
        """Offset inside the target's section that ``rel`` really points at."""
        base = rel.symbol.value if rel.symbol.type != "section" else 0
        bias = 0
        if rel.type in PC_RELATIVE and sec.is_code:
            end = self.insn_ends(sec).get(rel.offset)
            bias = (end - rel.offset) if end is not None else rel.size
        return base + rel.addend + bias

    def insn_ends(self, sec: ObjSection) -> dict[int, int]:
        """Relocated field offset -> end of its instruction (capstone, linear sweep)."""
        cached = self._insn_ends.get(id(sec))
        if cached is not None:
            return cached
        ends: dict[int, int] = {}
        offsets = {r.offset for r in sec.relocs}
        for insn in decode(sec.data):
            for off in range(insn.address, insn.address + insn.size):
                if off in offsets:
                    ends[off] = insn.address + insn.size
        self._insn_ends[id(sec)] = ends
        return ends

    def reloc_meaning(self, sec: ObjSection, rel: ObjReloc) -> Meaning:
        """What a relocation refers to, independent of where the linker put things: an external
        name, a symbol, a string's contents, a constant's bytes, or read-only data by its own
        meaning."""
        sym = rel.symbol
        target = sym.section
        if target is None:
            return ("ext", sym.name, rel.addend)
        if sym.bind != "local" and sym.type != "section":
            return ("sym", self.name_of(sym), rel.addend)
        if target.is_merge_strings:
            return ("str", target.string_at(self.target_offset(sec, rel)))
        if target.is_merge_constants:
            off = self.target_offset(sec, rel)
            ent = max(target.entsize, 1)
            start = off - off % ent
            return ("cst", target.read_data(start, ent), off - start)
        offset = rel.addend + (sym.value if sym.type != "section" else 0)
        if target.is_readonly_data and not _has_global(target):
            return ("ro", self.fingerprint(target), offset)
        holder = object_at(target, self.target_offset(sec, rel))
        if holder is not None:
            # A variable among others in one section (``.data.once``, ``.bss`` without
            # -fdata-sections): a new variable before it moves its offset, not its meaning.
            return ("sym", self.name_of(holder), offset - holder.value)
        return ("sym", self.section_name(target), offset)

    def fingerprint(self, sec: ObjSection) -> Meaning:
        """Content of a section by meaning: size, masked bytes, relocation meanings."""
        key = id(sec)
        done = self._fingerprints.get(key)
        if done is not None:
            return done
        if key in self._in_progress:
            return ("cycle", self.section_name(sec))
        self._in_progress.add(key)
        try:
            relocs = tuple((r.offset, r.type, self.reloc_meaning(sec, r)) for r in sec.relocs)
            result: Meaning = (sec.size, masked_bytes(sec), relocs)
        finally:
            self._in_progress.discard(key)
        self._fingerprints[key] = result
        return result


def object_at(sec: ObjSection, offset: int) -> ObjSymbol | None:
    """The named data object of ``sec`` that covers ``offset``, if exactly one does."""
    found = [
        s
        for s in sec.symbols
        if s.type in ("object", "tls") and s.size > 0 and s.value <= offset < s.value + s.size
    ]
    return found[0] if len(found) == 1 else None


def _has_global(sec: ObjSection) -> bool:
    return any(s.bind != "local" for s in sec.symbols)


def masked_bytes(sec: ObjSection) -> bytes:
    """Section bytes with every relocated field zeroed."""
    if not sec.data:
        return b""
    data = bytearray(sec.data)
    for r in sec.relocs:
        data[r.offset : r.offset + r.size] = b"\0" * min(r.size, len(data) - r.offset)
    return bytes(data)


def decode(code: bytes) -> list[CsInsn]:
    """x86-64 instructions of ``code`` with details (capstone), from offset 0."""
    from livesplice.arch.x86_64 import disassembler

    return list(disassembler(detail=True, skipdata=True).disasm(code, 0))


def compare_sections(
    pre: ObjSection,
    post: ObjSection,
    pre_ctx: MeaningContext,
    post_ctx: MeaningContext,
    *,
    line_map: LineMap | None = None,
    function_lines: dict[str, tuple[int, int]] | None = None,
) -> Verdict:
    """SAME, LINE_ONLY (treated as same) or CHANGED."""
    if pre.size != post.size or pre.type != post.type:
        return Verdict.CHANGED
    pre_fp = pre_ctx.fingerprint(pre)
    post_fp = post_ctx.fingerprint(post)
    if pre_fp == post_fp:
        return Verdict.SAME
    if pre_fp[2] != post_fp[2] or not pre.is_code or line_map is None or not function_lines:
        return Verdict.CHANGED
    # a section's own fingerprint (never a cycle marker here) is (size, masked bytes, relocs)
    pre_code, post_code = cast(bytes, pre_fp[1]), cast(bytes, post_fp[1])
    if line_only_difference(pre_code, post_code, line_map, function_lines):
        return Verdict.LINE_ONLY
    return Verdict.CHANGED


def line_only_difference(
    pre_code: bytes,
    post_code: bytes,
    line_map: LineMap,
    function_lines: dict[str, tuple[int, int]],
) -> bool:
    """Do the two (relocation-masked) codes differ only in line-number immediates?"""
    pre_insns = decode(pre_code)
    post_insns = decode(post_code)
    if len(pre_insns) != len(post_insns):
        return False
    for a, b in zip(pre_insns, post_insns, strict=True):
        if a.address != b.address or a.size != b.size:
            return False
        if a.bytes == b.bytes:
            continue
        if a.mnemonic != b.mnemonic or a.imm_size == 0 or a.imm_offset != b.imm_offset:
            return False
        lo, hi = a.imm_offset, a.imm_offset + a.imm_size
        if a.bytes[:lo] != b.bytes[:lo] or a.bytes[hi:] != b.bytes[hi:]:
            return False
        va = int.from_bytes(a.bytes[lo:hi], "little", signed=True)
        vb = int.from_bytes(b.bytes[lo:hi], "little", signed=True)
        if not line_map.explains(va, vb, function_lines):
            return False
    return True
