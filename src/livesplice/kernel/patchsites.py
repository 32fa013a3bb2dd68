"""Boot-time rewrites of x86-64 kernel code: the patch-site tables and what the kernel writes.

A Debian 6.1 kernel (PARAVIRT_XXL, alternatives) does not run the code its objects hold:
``alternative_instructions()`` (arch/x86/kernel/alternative.c) first runs
``apply_paravirt`` over ``.parainstructions``, then ``apply_alternatives`` over
``.altinstructions``; ``module_finalize`` does the same for each module as it loads. Run-pre
matching must accept at those places exactly what the kernel may have put there, and nothing
else. This module knows both halves, for one architecture:

* :func:`read_sites` reads the tables of a ``pre`` object into :class:`PatchSite` entries of
  the code section they point into (create ships them with each ``pre`` section);
* :func:`site_forms` lists the byte patterns the running kernel may show at a group of
  sites at one offset (kmatch compares them; the original code is compared as usual).

The forms, from the 6.1 sources:

``paravirt`` (``paravirt_patch``, ``paravirt_patch_call``): ``call *pv_ops+8*type(%rip)``
is replaced by ``call <pv_ops slot's function>`` (``call paravirt_BUG`` for a NULL slot),
or nothing when the slot holds ``_paravirt_nop``; the rest of the site is ``add_nops``.

``alternative``: when the CPU feature says so (``ALT_NOT``: when it is absent) the
replacement is copied in, a 5-byte ``call`` at its start re-aimed at the same target, a
5-byte ``jmp`` re-encoded by ``recompute_jump`` (2-byte ``jmp`` + a 3-byte nop, or 5-byte),
padded with ``0x90``; in every case ``optimize_nops`` then turns each run of two or more
``0x90`` into ``add_nops`` of the same length. ALTERNATIVE_2 / ALTERNATIVE_TERNARY give two
entries for one site; the later one wins when both apply, so each replacement is a form.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from livesplice.arch.x86_64 import decode_one
from livesplice.update.format import PatchSite, Reloc

if TYPE_CHECKING:
    from livesplice.diff.elfmodel import ElfObject

# struct paravirt_patch_site {u8 *instr; u8 type; u8 len;} + the asm's ".short clobber",
# _ASM_ALIGN'ed: 16 bytes (arch/x86/include/asm/paravirt_types.h _paravirt_alt)
PARAVIRT_SITE_SIZE = 16
# struct alt_instr {s32 instr_offset; s32 repl_offset; u16 cpuid; u8 instrlen;
# u8 replacementlen;} __packed (arch/x86/include/asm/alternative.h)
ALT_INSTR_SIZE = 12
ALTINSTR_FLAG_INV = 0x8000

# x86_nops for 64-bit (arch/x86/include/asm/nops.h BYTES_NOP1..8, ASM_NOP_MAX = 8)
X86_NOPS = (
    b"",
    b"\x90",
    b"\x66\x90",
    b"\x0f\x1f\x00",
    b"\x0f\x1f\x40\x00",
    b"\x0f\x1f\x44\x00\x00",
    b"\x66\x0f\x1f\x44\x00\x00",
    b"\x0f\x1f\x80\x00\x00\x00\x00",
    b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
)
ASM_NOP_MAX = 8


def add_nops(n: int) -> bytes:
    """``add_nops``: ``n`` bytes of the kernel's nops, longest first."""
    out = b""
    while n > 0:
        k = min(n, ASM_NOP_MAX)
        out += X86_NOPS[k]
        n -= k
    return out


def optimize_nops(code: bytes) -> bytes:
    """``optimize_nops``: walk the instructions; each run of two or more one-byte nops
    becomes ``add_nops`` of its length. Stops, as the kernel does, at what does not decode."""
    out = bytearray(code)
    i = 0
    while i < len(out):
        insn = decode_one(bytes(out[i:]), i)
        if insn is None:
            break
        if insn.raw == b"\x90":
            j = i
            while j < len(out) and out[j] == 0x90:
                j += 1
            if j - i > 1:
                out[i:j] = add_nops(j - i)
            i = j
        else:
            i += insn.size
    return bytes(out)


def read_sites(obj: ElfObject) -> dict[str, list[PatchSite]]:
    """Code section name -> its patch sites (offsets within the section), from the object's
    ``.parainstructions`` and ``.altinstructions``. Symbol keys of the replacements'
    relocations follow the manifest's rules (a global by name, else ``unit:section``)."""
    out: dict[str, list[PatchSite]] = {}
    para = obj.section(".parainstructions")
    if para is not None:
        at = {r.offset: r for r in para.relocs}
        for start in range(0, len(para.data) - PARAVIRT_SITE_SIZE + 1, PARAVIRT_SITE_SIZE):
            rel = at.get(start)
            if rel is None or rel.symbol.section is None:
                continue
            sec, off = _place(rel.symbol, rel.addend)
            pv_type, length = para.data[start + 8], para.data[start + 9]
            out.setdefault(sec, []).append(
                PatchSite(kind="paravirt", offset=off, length=length, pv_type=pv_type)
            )
    alt = obj.section(".altinstructions")
    repl_sec = obj.section(".altinstr_replacement")
    if alt is not None:
        at = {r.offset: r for r in alt.relocs}
        for start in range(0, len(alt.data) - ALT_INSTR_SIZE + 1, ALT_INSTR_SIZE):
            orig, repl = at.get(start), at.get(start + 4)
            if orig is None or repl is None or orig.symbol.section is None:
                continue
            cpuid, instrlen, repl_len = struct.unpack_from("<HBB", alt.data, start + 8)
            # the fields are PC-relative to themselves: &field + value = S + A (+ 0)
            sec, off = _place(orig.symbol, orig.addend)
            rsec, roff = _place(repl.symbol, repl.addend)
            data, relocs = b"", []
            if repl_len and repl_sec is not None and rsec == repl_sec.name:
                data = repl_sec.data[roff : roff + repl_len]
                relocs = [
                    _replacement_reloc(r, roff, obj)
                    for r in repl_sec.relocs
                    if roff <= r.offset < roff + repl_len
                ]
            out.setdefault(sec, []).append(
                PatchSite(
                    kind="alternative",
                    offset=off,
                    length=instrlen,
                    feature=cpuid,
                    replacement=data.hex(),
                    relocs=relocs,
                )
            )
    for sites in out.values():
        sites.sort(key=lambda s: (s.offset, s.kind != "paravirt"))
    return out


def _place(sym: object, addend: int) -> tuple[str, int]:
    from livesplice.diff.elfmodel import ObjSymbol

    assert isinstance(sym, ObjSymbol) and sym.section is not None
    return sym.section.name, addend + (sym.value if sym.type != "section" else 0)


def _replacement_reloc(rel: object, start: int, obj: ElfObject) -> Reloc:
    from livesplice.diff.elfmodel import ObjReloc

    assert isinstance(rel, ObjReloc)
    sym = rel.symbol
    if sym.section is None or (sym.bind != "local" and sym.type != "section"):
        return Reloc(rel.offset - start, rel.type, sym.name, rel.addend)
    sec, off = _place(sym, rel.addend)
    return Reloc(rel.offset - start, rel.type, f"{obj.unit}:{sec}", off)


# ---------------------------------------------------------------------------------------
# what the running kernel may show at a site
# ---------------------------------------------------------------------------------------


@dataclass
class BootFacts:
    """What the running kernel decided at boot that the paravirt forms depend on: the
    function in each ``pv_ops`` slot (0 for NULL) and the two special targets. ``pv_op``
    None: not a paravirt kernel (its sites must show the original call)."""

    pv_op: Callable[[int], int] | None = None
    paravirt_nop: int | None = None
    paravirt_bug: int | None = None
    # address of a vmlinux symbol with a unique name (a replacement's call target), if known
    symbol: Callable[[str], int | None] | None = None


@dataclass
class Form:
    """One byte pattern the kernel may have written over a group of sites.

    ``code`` is compared byte for byte except at ``branch`` (position of a rel8/rel32
    displacement of a call/jmp at the start: the running target is checked against
    ``target``, an absolute address, or a reloc of the replacement) and ``masked`` fields
    (relocation fields of a replacement, learned like relocation fields of pre code)."""

    what: str
    code: bytes
    branch: tuple[int, int] | None = None  # (position, width) of a displacement
    target: int | None = None  # absolute address the branch must reach
    target_reloc: Reloc | None = None  # or: the replacement's relocation it must reach
    masked: list[Reloc] = field(default_factory=list)


def describe(sites: list[PatchSite]) -> str:
    """The sites of a group in words ("paravirt site (pv_ops slot 62) + alternative
    (feature !8*32+16)")."""
    parts = []
    for s in sites:
        if s.kind == "paravirt":
            parts.append(f"paravirt site (pv_ops slot {s.pv_type})")
        else:
            inv = "!" if s.feature & ALTINSTR_FLAG_INV else ""
            f = s.feature & ~ALTINSTR_FLAG_INV
            parts.append(f"alternative (feature {inv}{f >> 5}*32+{f & 31})")
    return " + ".join(parts)


def site_forms(sites: list[PatchSite], pre: bytes, facts: BootFacts) -> list[Form]:
    """The rewritten forms of a group of sites that start at one offset (``pre``: the pre
    code of the group, its longest site's length). The original is not among them: it is
    compared instruction by instruction like the rest of the function (with its 0x90 runs
    optimized when an alternative covers it, see :func:`original_form`)."""
    length = len(pre)
    has_alt = any(s.kind == "alternative" for s in sites)
    forms: list[Form] = []

    def finish(f: Form) -> Form:
        if has_alt:
            f.code = optimize_nops(f.code)
        return f

    for s in sites:
        if s.kind == "paravirt":
            forms.extend(finish(f) for f in _paravirt_forms(s, pre, facts))
        else:
            forms.append(finish(_alternative_form(s, length)))
    return forms


def original_form(sites: list[PatchSite], pre: bytes) -> bytes:
    """The original code of a group as the kernel leaves it when it does not patch it:
    optimize_nops runs over every alternative site, patched or not."""
    return optimize_nops(pre) if any(s.kind == "alternative" for s in sites) else pre


def _paravirt_forms(s: PatchSite, pre: bytes, facts: BootFacts) -> list[Form]:
    if facts.pv_op is None or s.length < 5:
        return []
    tail = pre[s.length :]
    fn = facts.pv_op(s.pv_type)
    if fn and fn == facts.paravirt_nop:
        return [Form("nops (the slot holds _paravirt_nop)", add_nops(s.length) + tail)]
    if not fn:
        if facts.paravirt_bug is None:
            return []
        fn, what = facts.paravirt_bug, "call paravirt_BUG (the slot is NULL)"
    else:
        what = f"call {fn:#x} (pv_ops slot {s.pv_type}) padded with nops"
    return [Form(what, b"\xe8\0\0\0\0" + add_nops(s.length - 5) + tail, branch=(1, 4), target=fn)]


def _alternative_form(s: PatchSite, length: int) -> Form:
    repl = bytes.fromhex(s.replacement)
    what = f"replacement {repl.hex() or '(empty)'} padded with nops"
    first = next((r for r in s.relocs if r.offset == 1), None)
    if len(repl) == 5 and repl[0] in (0xE8, 0xE9, 0xEB) and first is not None:
        # the kernel re-aims a call/jmp at the start; recompute_jump may shorten a jmp to
        # 2 bytes + a 3-byte nop (kmatch accepts either encoding reaching the target)
        code = repl[:1] + b"\0\0\0\0" + b"\x90" * (length - 5)
        others = [r for r in s.relocs if r is not first]
        return Form(what, code, branch=(1, 4), target_reloc=first, masked=others)
    return Form(what, repl + b"\x90" * (length - len(repl)), masked=list(s.relocs))
