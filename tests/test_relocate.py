"""x86-64 relocation: livesplice's relocation of each section must give the bytes ld gives.

Oracle in the style of pyelftools' linker tests: compile an object, link it with ld, then
relocate every section of the object ourselves at the address ld chose and compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from match_objsections import PROGS, SPLIT, gcc, read_object

from livesplice.process.relocate import (
    RELOC_TYPES,
    TPOFF_SLOT,
    RelocationError,
    apply_relocs,
)
from livesplice.update.format import Reloc, Section


def linked_symbols(exe: Path) -> tuple[dict[str, int], object]:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    f = open(exe, "rb")  # noqa: SIM115 -- kept open for the ELFFile's lifetime
    elf = ELFFile(f)
    symtab = elf.get_section_by_name(".symtab")
    assert isinstance(symtab, SymbolTableSection)
    syms = {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}
    return syms, elf


def read_vaddr(elf: object, addr: int, n: int) -> bytes:
    for seg in elf.iter_segments():  # type: ignore[attr-defined]
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
            return seg.data()[addr - seg["p_vaddr"] : addr - seg["p_vaddr"] + n]  # type: ignore[no-any-return]
    raise KeyError(hex(addr))


@pytest.mark.parametrize("base", [0x401000, 0x7F0000000000 >> 16])
def test_relocations_equal_what_ld_produced(tmp_path: Path, base: int) -> None:
    obj = tmp_path / "r.o"
    gcc("-O2", "-fno-pie", *SPLIT, "-c", PROGS / "match_reloc.c", "-o", obj)
    exe = tmp_path / "r"
    gcc(
        "-O2",
        "-fno-pie",
        "-no-pie",
        "-nostdlib",
        "-static",
        "-Wl,--no-relax",
        f"-Wl,-Ttext={base:#x}",
        "-o",
        exe,
        obj,
        PROGS / "match_reloc_ext.c",
    )
    unit = read_object(obj, "match_reloc.c")
    syms, elf = linked_symbols(exe)

    # where ld put each section of the object: through a symbol it defines
    placed: dict[str, int] = {}
    for sec in unit.sections.values():
        for key, off in sec.symbols.items():
            name = key.rsplit(":", 1)[-1]
            if name in syms:
                placed[sec.key] = syms[name] - off
                break
        else:
            # merged strings have no symbol: find their bytes in the linked .rodata
            ro = elf.get_section_by_name(".rodata")  # type: ignore[attr-defined]
            at = ro.data().find(sec.bytes) if sec.data and ro is not None else -1
            if at >= 0:
                placed[sec.key] = ro["sh_addr"] + at

    def resolve(key: str) -> int:
        if key in placed:
            return placed[key]
        for sec in unit.sections.values():
            if key in sec.symbols and sec.key in placed:
                return placed[sec.key] + sec.symbols[key]
        return syms[key.rsplit(":", 1)[-1]]

    def no_got(key: str) -> int:
        raise AssertionError(f"no GOT use expected: {key}")

    seen: set[str] = set()
    compared = 0
    for key, sec in unit.sections.items():
        if key not in placed or not sec.data or not sec.relocs:
            continue
        ours = apply_relocs(sec, placed[key], resolve, no_got, resolve)
        assert ours == read_vaddr(elf, placed[key], sec.size), sec.name
        seen.update(r.type for r in sec.relocs)
        compared += 1
    assert compared >= 5
    assert {"R_X86_64_PLT32", "R_X86_64_PC32", "R_X86_64_32S", "R_X86_64_32", "R_X86_64_64"} <= seen


def _section(relocs: list[Reloc], size: int = 16) -> Section:
    return Section(
        key="u.c:.text.f",
        role="replacement",
        name="f",
        unit="u.c",
        align=16,
        size=size,
        data="00" * size,
        relocs=relocs,
        executable=True,
    )


def test_overflow_is_reported_like_ld() -> None:
    sec = _section([Reloc(1, "R_X86_64_PC32", "far", -4)])
    with pytest.raises(RelocationError, match="truncated to fit: R_X86_64_PC32 against 'far'"):
        apply_relocs(
            sec, 0x1000, lambda k: 0x1000 + (3 << 30), lambda k: 0, lambda k: 0x1000 + (3 << 30)
        )
    # a PC32 call to a far function goes through the veneer plt_stub gives
    out = apply_relocs(sec, 0x1000, lambda k: 0x1000 + (3 << 30), lambda k: 0, lambda k: 0x2000)
    assert int.from_bytes(out[1:5], "little", signed=True) == 0x2000 - 4 - 0x1001
    with pytest.raises(RelocationError, match="R_X86_64_32 "):
        apply_relocs(
            _section([Reloc(0, "R_X86_64_32", "neg", 0)]), 0, lambda k: -8, lambda k: 0, lambda k: 0
        )
    with pytest.raises(RelocationError, match="R_X86_64_32S"):
        apply_relocs(
            _section([Reloc(0, "R_X86_64_32S", "hi", 0)]),
            0,
            lambda k: 1 << 31,
            lambda k: 0,
            lambda k: 0,
        )


def test_got_and_tls_types() -> None:
    sec = _section(
        [Reloc(3, "R_X86_64_REX_GOTPCRELX", "v", -4), Reloc(10, "R_X86_64_GOTTPOFF", "t", -4)]
    )
    slots = {"v": 0x5000, TPOFF_SLOT + "t": 0x5008}
    out = apply_relocs(sec, 0x4000, lambda k: 0, slots.__getitem__, lambda k: 0)
    assert int.from_bytes(out[3:7], "little", signed=True) == 0x5000 - 4 - 0x4003
    assert int.from_bytes(out[10:14], "little", signed=True) == 0x5008 - 4 - 0x400A
    tp = apply_relocs(
        _section([Reloc(0, "R_X86_64_TPOFF32", "t", 0)]),
        0,
        lambda k: 0,
        lambda k: 0,
        lambda k: 0,
        tpoff=lambda k: -16,
    )
    assert int.from_bytes(tp[0:4], "little", signed=True) == -16
    with pytest.raises(RelocationError, match="not supported"):
        apply_relocs(
            _section([Reloc(0, "R_X86_64_GOTOFF64", "x", 0)]),
            0,
            lambda k: 0,
            lambda k: 0,
            lambda k: 0,
        )


def test_every_table_entry_is_named_as_the_abi_spells_it() -> None:
    from elftools.elf.enums import ENUM_RELOC_TYPE_x64

    for name in RELOC_TYPES:
        assert name in ENUM_RELOC_TYPE_x64 or name.endswith("GOTPCRELX"), name


def test_loader_and_field_widths_agree() -> None:
    """The loader's table and the architecture's field widths (used by the diff and both
    matchers) must say the same width for every type the loader implements."""
    from livesplice.arch.x86_64 import FIELD_SIZE

    assert {n: t.size for n, t in RELOC_TYPES.items()} == {n: FIELD_SIZE[n] for n in RELOC_TYPES}
