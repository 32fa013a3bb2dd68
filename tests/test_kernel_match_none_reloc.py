"""Run-pre matching of kernel code with an R_X86_64_NONE relocation (writes no field).

Debian 6.1's drivers/net/ppp/ppp_synctty.o has one in ppp_print_buffer, inside a 5-byte nop
just before the jump to the function's .cold part, at the offset after the call to
_printk. Apply of the ppp_synctty fix (CVE-2026-97964) crashed in matching with
"ValueError: negative shift count" (a 0-byte field read as signed); and a NONE relocation
must not hide a real one of the same instruction (its field would be compared unmasked).
"""

from __future__ import annotations

from livesplice.kernel.kmatch import compare_code
from livesplice.update.format import Reloc, Section

COLD = "drivers/net/ppp/ppp_synctty.c:.text.unlikely.ppp_print_buffer"
# call _printk; nop5 (NONE at +1); jmp .cold (PC32 at +1); int3
PRE = bytes.fromhex("e8000000000f1f440000e900000000cc")
BASE = 0xFFFFFFFFA0000000


def _section(relocs: list[Reloc]) -> Section:
    return Section(
        key="drivers/net/ppp/ppp_synctty.c:.text.ppp_print_buffer",
        role="pre",
        name="ppp_print_buffer",
        unit="drivers/net/ppp/ppp_synctty.c",
        align=16,
        size=len(PRE),
        data=PRE.hex(),
        relocs=relocs,
        executable=True,
    )


def _rel32(src_end: int, target: int) -> bytes:
    return ((target - (BASE + src_end)) & 0xFFFFFFFF).to_bytes(4, "little")


def test_none_relocation_is_no_field_and_the_jump_is_learned() -> None:
    printk, cold = 0xFFFFFFFF81000000, 0xFFFFFFFFA0100000
    running = (
        b"\xe8" + _rel32(5, printk) + bytes.fromhex("0f1f440000") + b"\xe9" + _rel32(15, cold)
    ) + b"\xcc"
    sec = _section(
        [
            Reloc(1, "R_X86_64_PLT32", "_printk", -4),
            Reloc(6, "R_X86_64_NONE", COLD, -4),
            Reloc(11, "R_X86_64_PC32", COLD, -4),
        ]
    )
    learned = compare_code(sec, running, BASE)
    assert learned == {"_printk": printk, COLD: cold}


def test_none_relocation_first_in_an_instruction_does_not_hide_the_real_one() -> None:
    cold = 0xFFFFFFFFA0100000
    pre = bytes.fromhex("e900000000cc")
    sec = _section([Reloc(0, "R_X86_64_NONE", COLD, 0), Reloc(1, "R_X86_64_PC32", COLD, -4)])
    sec.data, sec.size = pre.hex(), len(pre)
    assert compare_code(sec, b"\xe9" + _rel32(5, cold) + b"\xcc", BASE) == {COLD: cold}
