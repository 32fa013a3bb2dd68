"""DWARF of relocatable objects: debug info with relocations applied, line rows per section.

pyelftools applies the relocations of ``.rela.debug_*`` itself, but stops at types it has no
recipe for -- gcc emits ``R_X86_64_DTPOFF32`` in ``.debug_info`` for every ``__thread``
variable. Debug info needs only one thing from relocation: string and cross-section offsets
(``DW_FORM_strp``, ``DW_FORM_line_strp``, ``DW_AT_stmt_list`` are ``S + A`` against a section
symbol whose value is 0). So we read the sections unrelocated and add ``S + A`` ourselves for
every data-sized relocation, whatever its type.

With ``-ffunction-sections`` every function is its own line-number *sequence*, started by a
``DW_LNE_set_address`` whose operand is relocated (``R_X86_64_64`` against ``.text.<fn>``).
In a ``.o`` every such address is 0, so the sequence's section is known only from the
relocation: the k-th ``R_X86_64_64`` of ``.rela.debug_line`` belongs to the k-th
``DW_LNE_set_address`` (the header's relocations are 32-bit ``.debug_line_str`` offsets).
"""

from __future__ import annotations

import struct
from collections import defaultdict
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.arch.x86_64 import FIELD_SIZE

if TYPE_CHECKING:
    # pyelftools has no type hints: to mypy these are Any, to a reader they say what it is
    from elftools.dwarf.compileunit import CompileUnit
    from elftools.dwarf.dwarfinfo import DWARFInfo
    from elftools.dwarf.lineprogram import LineProgram
    from elftools.elf.sections import Section

# the relocation types gcc puts in debug sections, written as S + A (the field widths come
# from the one x86-64 table; the type numbers from pyelftools' psABI enum)
_DEBUG_RELOCS = (
    "R_X86_64_64",
    "R_X86_64_PC32",
    "R_X86_64_32",
    "R_X86_64_32S",
    "R_X86_64_DTPOFF64",
    "R_X86_64_DTPOFF32",
    "R_X86_64_PC64",
)


@cache
def _widths() -> dict[int, int]:
    """r_type number -> bytes of the field, for the types :data:`_DEBUG_RELOCS` names."""
    from elftools.elf.enums import ENUM_RELOC_TYPE_x64

    return {ENUM_RELOC_TYPE_x64[name]: FIELD_SIZE[name] for name in _DEBUG_RELOCS}


def open_dwarf(path: Path) -> DWARFInfo | None:
    """Return (DWARFInfo | None) for the object at ``path``; None when it has no DWARF."""
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    class _RelocatingELF(ELFFile):
        def _read_dwarf_section(
            self, section: Section, relocate_dwarf_sections: bool
        ) -> DebugSectionDescriptor:
            desc = super()._read_dwarf_section(section, False)
            desc.stream.seek(0)
            data = bytearray(desc.stream.read())
            symtab = self.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                symtab = None
            for rs in self._relocations_of(section):
                for rel in rs.iter_relocations():
                    width = _widths().get(rel["r_info_type"])
                    if width is None or symtab is None:
                        continue
                    sym = symtab.get_symbol(rel["r_info_sym"])
                    value = int(sym["st_value"]) + (int(rel["r_addend"]) if rel.is_RELA() else 0)
                    off = int(rel["r_offset"])
                    fmt = "<Q" if width == 8 else "<I"
                    struct.pack_into(fmt, data, off, value & ((1 << (8 * width)) - 1))
            return DebugSectionDescriptor(
                stream=BytesIO(bytes(data)),
                name=desc.name,
                global_offset=desc.global_offset,
                size=desc.size,
                address=desc.address,
            )

        def _relocations_of(self, section: Section) -> list[RelocationSection]:
            """The relocation sections applying to ``section``, from a table built once.

            pyelftools' section access is linear (each ``iter_sections`` re-reads every
            header), so looking the table up per debug section kept diffs quadratic in the
            number of sections -- thousands with ``-ffunction-sections``.
            """
            Table = dict[tuple[str, int], list[RelocationSection]]
            table: Table | None = getattr(self, "_reloc_table", None)
            if table is None:
                sections = list(self.iter_sections())
                key_of = {i: (s.name, int(s["sh_offset"])) for i, s in enumerate(sections)}
                table = defaultdict(list)
                for rs in sections:
                    if isinstance(rs, RelocationSection) and int(rs["sh_info"]) in key_of:
                        table[key_of[int(rs["sh_info"])]].append(rs)
                self._reloc_table = table
            return table.get((section.name, int(section["sh_offset"])), [])

    stream = open(path, "rb")  # noqa: SIM115 - pyelftools reads lazily; kept open by DWARFInfo
    elf = _RelocatingELF(stream)
    if not elf.has_dwarf_info():
        stream.close()
        return None
    return elf.get_dwarf_info()


def line_rows_by_section(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """For each code section: {source file path: (lowest line, highest line)} of its rows.

    Includes the rows of code inlined into the function (they carry the inlined function's
    file and lines). Empty when the object has no line table.
    """
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        rela = elf.get_section_by_name(".rela.debug_line")
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(rela, RelocationSection) or not isinstance(symtab, SymbolTableSection):
            return {}
        sections = list(elf.iter_sections())
        seq_sections: list[str] = []
        for rel in sorted(rela.iter_relocations(), key=lambda r: int(r["r_offset"])):
            if rel["r_info_type"] != 1:  # R_X86_64_64
                continue
            sym = symtab.get_symbol(rel["r_info_sym"])
            shndx = sym["st_shndx"]
            seq_sections.append(sections[shndx].name if isinstance(shndx, int) else "")
    dwarf = open_dwarf(path)
    if dwarf is None:
        return {}
    result: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    seq = -1
    for cu in dwarf.iter_CUs():
        lp = dwarf.line_program_for_CU(cu)
        if lp is None:
            continue
        files = _line_program_files(lp, cu)
        for entry in lp.get_entries():
            if entry.command == 0x02 and entry.is_extended:  # DW_LNE_set_address
                seq += 1
                continue
            state = entry.state
            if state is None or state.end_sequence or seq < 0 or seq >= len(seq_sections):
                continue
            fname = files.get(state.file, "")
            result[seq_sections[seq]][fname].append(int(state.line))
    return {
        sec: {f: (min(lines), max(lines)) for f, lines in per_file.items() if lines}
        for sec, per_file in result.items()
    }


def _line_program_files(lp: LineProgram, cu: CompileUnit) -> dict[int, str]:
    """File index -> path as the line program names it (DWARF 5 counts from 0, older from 1)."""
    header = lp.header
    version = int(header["version"])
    dirs = [_text(d) for d in header["include_directory"]]
    comp_dir_attr = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
    comp_dir = _text(comp_dir_attr.value) if comp_dir_attr is not None else ""
    out: dict[int, str] = {}
    for i, fe in enumerate(header["file_entry"]):
        name = _text(fe.name)
        dir_index = int(fe.dir_index)
        if version >= 5:
            directory = dirs[dir_index] if dir_index < len(dirs) else ""
            index = i
        else:
            directory = comp_dir if dir_index == 0 else dirs[dir_index - 1]
            index = i + 1
        if not name.startswith("/") and directory:
            name = directory.rstrip("/") + "/" + name
        out[index] = name
    return out


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
