"""x86-64 relocation types: one table entry per ABI name, with overflow checks.

Notation as in the System V x86-64 psABI ("Relocation Types"): S = the symbol's value,
A = the addend, P = the address of the field being relocated, G + GOT = the address of the
symbol's GOT slot, L = the address of the symbol's PLT entry (for us: the symbol itself, or a
veneer when it is beyond +-2GB of the loaded code).

Unlike ld we never relax instructions: a ``mov foo@GOTPCREL(%rip), %reg`` stays a load from a
slot that livesplice fills with foo's address (psABI B.2 allows a linker to treat
R_X86_64_GOTPCRELX as R_X86_64_GOTPCREL).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from livesplice.errors import NoMatch
from livesplice.update.format import Reloc, Section

# Prefixes of the keys ``got_slot`` is asked for when the slot does not hold an address:
# GOTTPOFF wants a slot holding the variable's offset from the thread pointer; TLSGD wants the
# (module id, offset) pair that __tls_get_addr takes.
TPOFF_SLOT = "@tpoff:"
TLSGD_SLOT = "@tlsgd:"


class RelocationError(NoMatch):
    """A relocation cannot be applied (overflow or a type livesplice does not implement).

    Raised while planning the load, before the process is touched.
    """


@dataclass(frozen=True)
class RelocContext:
    """How the symbols of a relocation are found in the running process: the psABI's S, G + GOT,
    L and the thread-pointer offset, each as a lookup."""

    resolve: Callable[[str], int]  # S
    got_slot: Callable[[str], int]  # G + GOT
    plt_stub: Callable[[str], int]  # L
    tpoff: Callable[[str], int]  # the variable's offset from the thread pointer


@dataclass(frozen=True)
class RelocType:
    """One relocation type: its field width, how to check overflow, and its value."""

    name: str
    size: int  # bytes of the field
    check: str  # "signed" | "unsigned" | "none" (wraps modulo 2**(8*size))
    value: Callable[[RelocContext, Reloc, int], int]


def _s(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.resolve(r.symbol) + r.addend


def _s_pcrel(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.resolve(r.symbol) + r.addend - p


def _l_pcrel(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.plt_stub(r.symbol) + r.addend - p


def _got_pcrel(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.got_slot(r.symbol) + r.addend - p


def _gottpoff(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.got_slot(TPOFF_SLOT + r.symbol) + r.addend - p


def _tlsgd(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.got_slot(TLSGD_SLOT + r.symbol) + r.addend - p


def _tpoff(ctx: RelocContext, r: Reloc, p: int) -> int:
    return ctx.tpoff(r.symbol) + r.addend


def _none(ctx: RelocContext, r: Reloc, p: int) -> int:
    return 0


RELOC_TYPES: dict[str, RelocType] = {
    t.name: t
    for t in (
        RelocType("R_X86_64_NONE", 0, "none", _none),
        RelocType("R_X86_64_64", 8, "none", _s),
        RelocType("R_X86_64_PC32", 4, "signed", _s_pcrel),
        RelocType("R_X86_64_PLT32", 4, "signed", _l_pcrel),
        RelocType("R_X86_64_GOTPCREL", 4, "signed", _got_pcrel),
        RelocType("R_X86_64_GOTPCRELX", 4, "signed", _got_pcrel),
        RelocType("R_X86_64_REX_GOTPCRELX", 4, "signed", _got_pcrel),
        RelocType("R_X86_64_32", 4, "unsigned", _s),
        RelocType("R_X86_64_32S", 4, "signed", _s),
        RelocType("R_X86_64_16", 2, "unsigned", _s),
        RelocType("R_X86_64_PC16", 2, "signed", _s_pcrel),
        RelocType("R_X86_64_8", 1, "unsigned", _s),
        RelocType("R_X86_64_PC8", 1, "signed", _s_pcrel),
        RelocType("R_X86_64_PC64", 8, "none", _s_pcrel),
        RelocType("R_X86_64_TPOFF32", 4, "signed", _tpoff),
        RelocType("R_X86_64_TPOFF64", 8, "none", _tpoff),
        RelocType("R_X86_64_GOTTPOFF", 4, "signed", _gottpoff),
        RelocType("R_X86_64_TLSGD", 4, "signed", _tlsgd),
    )
}

_PACK = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def fits(value: int, size: int, check: str) -> bool:
    """Whether ``value`` fits a ``size``-byte field under the type's overflow ``check`` (ld's
    "relocation truncated to fit")."""
    bits = 8 * size
    if check == "signed":
        return -(1 << (bits - 1)) <= value < (1 << (bits - 1))
    if check == "unsigned":
        return 0 <= value < (1 << bits)
    return True


def reloc_value(r: Reloc, place: int, ctx: RelocContext) -> tuple[RelocType, int]:
    """The value of relocation ``r`` at running address ``place`` (field address)."""
    rt = RELOC_TYPES.get(r.type)
    if rt is None:
        raise RelocationError(
            f"relocation type {r.type} against {r.symbol!r} is not supported by the process target",
            advice="report this with the update file; build the unit without the feature "
            "that needs it",
        )
    value = rt.value(ctx, r, place)
    # A PC32 reference to a function beyond +-2GB can still be *called* through a veneer
    # (like ld routing an out-of-range call through the PLT); plt_stub refuses non-functions.
    if r.type == "R_X86_64_PC32" and not fits(value, rt.size, rt.check):
        value = _l_pcrel(ctx, r, place)
    if not fits(value, rt.size, rt.check):
        raise RelocationError(
            f"relocation truncated to fit: {r.type} against {r.symbol!r}",
            details=[
                f"field at {place:#x}, value {value:#x} does not fit {rt.size} bytes ({rt.check})"
            ],
            advice="the replacement code must be loaded within 2GB of what it references",
        )
    return rt, value


def apply_relocs(
    section: Section,
    place: int,
    resolve: Callable[[str], int],
    got_slot: Callable[[str], int],
    plt_stub: Callable[[str], int],
    tpoff: Callable[[str], int] | None = None,
) -> bytes:
    """The bytes of ``section`` relocated for loading at running address ``place``.

    ``resolve(key)`` gives S, ``got_slot(key)`` the address of a slot holding S (or, with a
    ``TPOFF_SLOT`` / ``TLSGD_SLOT`` prefix, a TLS slot), ``plt_stub(key)`` the address to
    call for ``key`` (the function or a veneer), ``tpoff(key)`` a TLS variable's offset
    from the thread pointer. Raises :class:`RelocationError` on overflow.
    """

    def no_tls(key: str) -> int:
        raise RelocationError(f"no thread-local offset known for {key!r}")

    ctx = RelocContext(resolve, got_slot, plt_stub, tpoff or no_tls)
    buf = bytearray(section.bytes)
    for r in section.relocs:
        rt, value = reloc_value(r, place + r.offset, ctx)
        if rt.size == 0:
            continue
        if r.offset < 0 or r.offset + rt.size > len(buf):
            raise RelocationError(
                f"relocation {r.type} at {section.key}+{r.offset:#x} is outside the section"
            )
        struct.pack_into(_PACK[rt.size], buf, r.offset, value & ((1 << (8 * rt.size)) - 1))
    return bytes(buf)
