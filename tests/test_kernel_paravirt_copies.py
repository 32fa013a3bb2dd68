"""Run-pre matching when several same-named functions all match (kmatch._interchangeable).

A ``static inline`` function gcc emits out of line in several units (Debian's vmlinux has
several ``pfn_swap_entry_to_page``) matches the pre code at every copy. Matching may then pick
any copy only when the copies behave alike: the update does not replace the function, and
every relocation field reaches the same address in all of them. These tests run the real
run_pre_match_kernel on a KernelImage whose "kcore" is a file holding two copies.
No lab needed; cost: milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from livesplice.errors import NoMatch
from livesplice.kernel.kmatch import KernelImage, KSym, run_pre_match_kernel
from livesplice.update.format import Reloc, Section, Target

KEY = "mm/x.c:.text.g"
DATA = "mm/x.c:.data.counter"
# mov rax, [rip+counter]; mov rcx, [rip+counter+8]; ret
CODE = bytes.fromhex("488b0500000000" "488b0d00000000" "c3")
RELOCS = [Reloc(offset=3, type="R_X86_64_PC32", symbol=DATA, addend=-4),
          Reloc(offset=10, type="R_X86_64_PC32", symbol=DATA, addend=4)]  # fmt: skip
VBASE = 0xFFFFFFFF81000000
COPY_A, COPY_B = VBASE + 0x1000, VBASE + 0x2000
T, U = VBASE + 0x8000, VBASE + 0x9000  # counter of one unit, of another


def running(base: int, first: int, second: int) -> bytes:
    """CODE linked at ``base``, its two fields referring to a counter at ``first`` and one
    at ``second`` (R_X86_64_PC32: S + A - P)."""
    code = bytearray(CODE)
    for r, sym in zip(RELOCS, (first, second), strict=True):
        value = sym + r.addend - (base + r.offset)
        code[r.offset : r.offset + 4] = value.to_bytes(4, "little", signed=True)
    return bytes(code)


def image(tmp_path: Path, copies: dict[int, bytes]) -> KernelImage:
    """kallsyms with one ``g`` per copy (in address order), memory from a file."""
    mem = tmp_path / "kcore"
    with mem.open("wb") as f:
        for addr, code in copies.items():
            f.seek(addr - VBASE)
            f.write(code + b"\xcc" * 64)
        f.truncate(0x10000)
    syms = [KSym(a, "t", "g", None) for a in sorted(copies)]
    fd = os.open(mem, os.O_RDONLY)
    return KernelImage(syms, fd, [(VBASE, 0, 0x10000)])


def target(replaced: bool = False) -> Target:
    pre = Section(key=KEY, role="pre", name="g", unit="mm/x.c", align=16, size=len(CODE),
                  data=CODE.hex(), relocs=list(RELOCS), executable=True)  # fmt: skip
    sections = [pre]
    if replaced:
        post = Section(key=KEY + "#post", role="replacement", name="g", unit="mm/x.c",
                       align=16, size=1, data="c3", executable=True, replaces=KEY)  # fmt: skip
        sections.append(post)
    return Target(name="vmlinux", kind="kernel", build_id="", changed_functions=[],
                  new_functions=[], new_data=[], sections=sections, symbols={})  # fmt: skip


# shipped code calls g: a klp symbol whose sympos matching decides
KERNEL = {"klp_symbols": [{"object": "vmlinux", "name": "g", "key": KEY, "learn": None,
                           "count": 0}]}  # fmt: skip


def match(tmp_path: Path, b_first: int, b_second: int, replaced: bool = False) -> object:
    img = image(tmp_path, {COPY_A: running(COPY_A, T, T),
                           COPY_B: running(COPY_B, b_first, b_second)})  # fmt: skip
    try:
        return run_pre_match_kernel(img, [target(replaced)], KERNEL)
    finally:
        os.close(img.fd)


def test_copies_reaching_the_same_data_are_one_function(tmp_path: Path) -> None:
    m = match(tmp_path, T, T)
    assert m.functions == {"vmlinux.g": COPY_A}  # type: ignore[attr-defined]
    assert m.klp_sympos == {"vmlinux.g": 1}  # type: ignore[attr-defined]  # the first copy
    assert m.learned[DATA] == T  # type: ignore[attr-defined]


def test_copies_reading_their_own_data_stay_ambiguous(tmp_path: Path) -> None:
    with pytest.raises(NoMatch) as e:
        match(tmp_path, U, U)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]


def test_every_field_is_compared_not_one_address_per_symbol(tmp_path: Path) -> None:
    """The second copy's first field reaches another unit's counter, its last one the same
    address as the first copy's: the learned map (one address per symbol, the last
    reference's) is equal for both copies; the field-by-field trail is not."""
    with pytest.raises(NoMatch) as e:
        match(tmp_path, U, T)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]


def test_a_replaced_function_is_never_one_of_interchangeable_copies(tmp_path: Path) -> None:
    """Which copy livepatch redirects matters: identical copies of a function the update
    replaces stay an error."""
    with pytest.raises(NoMatch) as e:
        match(tmp_path, T, T, replaced=True)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]
