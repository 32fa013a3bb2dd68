"""x86-64 instruction knowledge shared by both run-pre matchers: decoding, nops, branch targets
and what a relocation field in running code says about its symbol.

The process matcher (process/match.py) and the kernel matcher (kernel/kmatch.py) compare
``pre`` code with running code instruction by instruction; what counts as padding, where a
branch goes and how a relocation field's running value turns into the address of its symbol
are facts about the architecture, not about either target, so they live here once, with the
width of every relocation type's field (also used by the diff). Another architecture gets its
own module beside this one with the same functions.

capstone is set up here only (:func:`disassembler`); every user of it asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capstone import Cs  # no type hints: Any to mypy

MASK64 = (1 << 64) - 1

# Width in bytes of the field each x86-64 relocation type writes (System V psABI x86-64,
# table "Relocation Types"), for every type an object file may hold: the diff masks these
# bytes before comparing code, the matchers treat them as wildcards. The loader's table
# (process/relocate.py) implements a subset; tests/test_relocate.py checks their widths agree.
FIELD_SIZE: dict[str, int] = {
    "R_X86_64_NONE": 0,
    "R_X86_64_64": 8,
    "R_X86_64_PC32": 4,
    "R_X86_64_GOT32": 4,
    "R_X86_64_PLT32": 4,
    "R_X86_64_GOTPCREL": 4,
    "R_X86_64_32": 4,
    "R_X86_64_32S": 4,
    "R_X86_64_16": 2,
    "R_X86_64_PC16": 2,
    "R_X86_64_8": 1,
    "R_X86_64_PC8": 1,
    "R_X86_64_DTPMOD64": 8,
    "R_X86_64_DTPOFF64": 8,
    "R_X86_64_TPOFF64": 8,
    "R_X86_64_TLSGD": 4,
    "R_X86_64_TLSLD": 4,
    "R_X86_64_DTPOFF32": 4,
    "R_X86_64_GOTTPOFF": 4,
    "R_X86_64_TPOFF32": 4,
    "R_X86_64_PC64": 8,
    "R_X86_64_GOTOFF64": 8,
    "R_X86_64_GOTPC32": 4,
    "R_X86_64_SIZE32": 4,
    "R_X86_64_SIZE64": 8,
    "R_X86_64_GOTPCRELX": 4,
    "R_X86_64_REX_GOTPCRELX": 4,
}

# S + A - P: the field holds the distance from itself to the symbol (psABI "Relocation Types")
PC_RELATIVE = frozenset(
    {"R_X86_64_PC32", "R_X86_64_PLT32", "R_X86_64_PC64", "R_X86_64_PC16", "R_X86_64_PC8"}
)
# S + A: the field holds the symbol's address
ABSOLUTE = frozenset({"R_X86_64_32", "R_X86_64_32S", "R_X86_64_64", "R_X86_64_16", "R_X86_64_8"})
# G + GOT + A - P: the field holds the distance to the symbol's GOT slot
GOT_RELATIVE = frozenset({"R_X86_64_GOTPCREL", "R_X86_64_GOTPCRELX", "R_X86_64_REX_GOTPCRELX"})


@cache
def disassembler(*, detail: bool = False, skipdata: bool = False) -> Cs:
    """A capstone x86-64 decoder, made once per configuration.

    ``detail`` (operands, groups) costs time and is only wanted by the diff; ``skipdata``
    makes the sweep go on past bytes that do not decode (the diff compares whole sections).
    """
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = detail
    md.skipdata = skipdata
    return md


def is_nop(mnemonic: str, raw: bytes) -> bool:
    """Padding: every ``nop`` form gcc, gas and the kernel emit (``nop``, ``nopw``/``nopl``
    with any prefixes, which capstone names "nop") and ``xchg %ax,%ax`` (66 90)."""
    return mnemonic == "nop" or raw == b"\x66\x90"


def branch_target(mnemonic: str, op_str: str) -> int | None:
    """The target of a direct jmp / jcc / call / loop (None: not one, or indirect).

    The operation is the last word of the mnemonic: ``notrack jmp`` and ``bnd jmp`` are
    jumps too.
    """
    op = mnemonic.split()[-1] if mnemonic else ""
    if op in ("jmp", "call") or op.startswith(("j", "loop")):
        try:
            return int(op_str, 0)
        except ValueError:
            return None
    return None


@dataclass
class Insn:
    """One decoded instruction."""

    off: int  # offset (pre code) or running address
    size: int
    mnemonic: str
    op_str: str
    raw: bytes

    @property
    def is_nop(self) -> bool:
        """Padding (see :func:`is_nop`)."""
        return is_nop(self.mnemonic, self.raw)

    @property
    def branch_target(self) -> int | None:
        """Where a direct branch goes (see :func:`branch_target`)."""
        return branch_target(self.mnemonic, self.op_str)


def decode(code: bytes, base: int) -> list[Insn]:
    """Linear sweep of ``code`` placed at ``base``; stops at the first byte that does not
    decode (callers compare the decoded length with ``len(code)`` when that matters)."""
    return [
        Insn(addr, size, mnem, ops, code[addr - base : addr - base + size])
        for addr, size, mnem, ops in disassembler().disasm_lite(code, base)
    ]


def decode_one(code: bytes, base: int) -> Insn | None:
    """The first instruction of ``code`` at ``base`` (None if it does not decode)."""
    for addr, size, mnem, ops in disassembler().disasm_lite(code[:16], base):
        return Insn(addr, size, mnem, ops, code[:size])
    return None


def signed(value: int, bits: int) -> int:
    """``value`` (``bits`` wide) read as two's complement."""
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def field_size(rtype: str) -> int:
    """Bytes of the field a relocation type writes (4 for a type the table does not know:
    every x86-64 instruction relocation not in it is 32-bit)."""
    return FIELD_SIZE.get(rtype, 4)


def read_field(raw: bytes, pos: int, size: int, *, is_signed: bool = True) -> int:
    """The little-endian field of ``size`` bytes at ``raw[pos]``."""
    v = int.from_bytes(raw[pos : pos + size], "little")
    return signed(v, 8 * size) if is_signed else v


def reloc_field(raw: bytes, pos: int, rtype: str) -> int:
    """The running value of a relocation field of type ``rtype`` at ``raw[pos]``: signed
    when narrower than 8 bytes (a 32-bit displacement or sign-extended immediate), the
    plain 64-bit value otherwise."""
    size = field_size(rtype)
    if size == 0:  # R_X86_64_NONE: no field, nothing to read
        return 0
    return read_field(raw, pos, size, is_signed=size < 8)


def symbol_address(rtype: str, value: int, place: int, addend: int) -> int | None:
    """The symbol's address S a PC-relative or absolute field with running ``value`` at
    address ``place`` reveals (None for other kinds: GOT and TLS fields say something else,
    each matcher handles those it supports)."""
    if rtype in PC_RELATIVE:
        return (value - addend + place) & MASK64
    if rtype in ABSOLUTE:
        return (value - addend) & MASK64
    return None


def fields_masked(raw: bytes, start: int, relocs: list[tuple[int, str]]) -> bytes:
    """``raw`` (the bytes at offset ``start``) with every relocation field zeroed:
    ``relocs`` are (offset, type); what is left must be equal for two encodings to match."""
    out = bytearray(raw)
    for off, rtype in relocs:
        pos = off - start
        for k in range(max(pos, 0), min(pos + field_size(rtype), len(out))):
            out[k] = 0
    return bytes(out)
