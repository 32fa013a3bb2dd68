"""One in-memory model of an ELF relocatable object (x86-64), read with pyelftools.

The diff works on two of these, ``pre`` and ``post``. Every :class:`ObjSection` and
:class:`ObjSymbol` gets a ``twin`` in the other object (set by :mod:`correlate`) and a
:class:`Status` (set by the engine), the shape of kpatch's ``kpatch-elf.h`` model.

The compiler wrapper builds with ``-ffunction-sections -fdata-sections``, so each function and
each data object lives in its own section (``.text.work``, ``.bss.counter``,
``.rodata.CSWTCH.10``): a section is the unit of comparison and of shipping, and its *primary
symbol* (the function or object at offset 0) names it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from elftools.elf.constants import SH_FLAGS

from livesplice.arch.x86_64 import field_size

if TYPE_CHECKING:
    from elftools.elf.sections import Section  # no type hints: Any to mypy

# sh_flags (ELF gABI), as pyelftools names them
SHF_WRITE = SH_FLAGS.SHF_WRITE
SHF_ALLOC = SH_FLAGS.SHF_ALLOC
SHF_EXECINSTR = SH_FLAGS.SHF_EXECINSTR
SHF_MERGE = SH_FLAGS.SHF_MERGE
SHF_STRINGS = SH_FLAGS.SHF_STRINGS
SHF_TLS = SH_FLAGS.SHF_TLS

# Relocation types whose value is relative to the relocated field (S + A - P): for these the
# assembler folds "distance from the field to the end of the instruction" into the addend, so
# the byte a reference points at is ``addend + (instruction end - field offset)``.
PC_RELATIVE = frozenset(
    {
        "R_X86_64_PC32",
        "R_X86_64_PLT32",
        "R_X86_64_PC16",
        "R_X86_64_PC8",
        "R_X86_64_PC64",
        "R_X86_64_GOTPCREL",
        "R_X86_64_GOTPCRELX",
        "R_X86_64_REX_GOTPCRELX",
    }
)

# Section name prefixes gcc uses for function sections (-ffunction-sections, plus the
# hot/cold partitioning and startup/exit placement of gcc's -freorder-functions).
TEXT_PREFIXES = (".text.unlikely.", ".text.hot.", ".text.startup.", ".text.exit.", ".text.")
# Constructor/destructor tables (ELF gABI .init_array/.fini_array/.preinit_array, and the
# older .ctors/.dtors), possibly with a priority suffix (".init_array.00101").
CTOR_PREFIXES = (".init_array", ".fini_array", ".preinit_array", ".ctors", ".dtors")
HOOK_SECTION_PREFIX = ".livesplice.hook."


class Status(enum.Enum):
    """What the diff decided for a section or symbol of the pre/post pair (kpatch's status)."""

    SAME = "same"
    CHANGED = "changed"
    NEW = "new"
    REMOVED = "removed"


@dataclass(eq=False)
class ObjReloc:
    """One relocation of a section, with its symbol resolved to the model's object."""

    offset: int
    type: str
    symbol: ObjSymbol
    addend: int

    @property
    def size(self) -> int:
        """Bytes the relocation writes: those bytes differ between builds without the code
        differing, so comparisons mask them."""
        return field_size(self.type)


@dataclass(eq=False)
class ObjSymbol:
    """One symbol of the object, pointing at its section (None when undefined)."""

    index: int
    name: str
    bind: str  # "local" / "global" / "weak"
    type: str  # "func" / "object" / "tls" / "section" / "notype" / "file"
    section: ObjSection | None  # None: undefined (or absolute/common)
    value: int
    size: int
    twin: ObjSymbol | None = None
    status: Status | None = None

    @property
    def defined(self) -> bool:
        """Defined in this object (an undefined symbol is resolved at apply time)."""
        return self.section is not None

    def __repr__(self) -> str:
        return f"<ObjSymbol {self.name} {self.bind} {self.type}>"


@dataclass(eq=False)
class ObjSection:
    """One allocated section of the object, with its bytes, relocations and the symbols in it."""

    index: int
    name: str
    type: str  # "SHT_PROGBITS", "SHT_NOBITS", ...
    flags: int
    align: int
    size: int
    entsize: int
    data: bytes  # b"" for NOBITS
    relocs: list[ObjReloc] = field(default_factory=list)
    symbols: list[ObjSymbol] = field(default_factory=list)  # symbols defined in it
    section_symbol: ObjSymbol | None = None
    twin: ObjSection | None = None
    status: Status | None = None

    def __repr__(self) -> str:
        return f"<ObjSection {self.name}>"

    @property
    def alloc(self) -> bool:
        """Loaded at run time (SHF_ALLOC): only these can matter to a running program."""
        return bool(self.flags & SHF_ALLOC)

    @property
    def is_code(self) -> bool:
        """Executable code: compared instruction by instruction and replaced by jumps."""
        return bool(self.flags & SHF_EXECINSTR) and self.alloc

    @property
    def is_tls(self) -> bool:
        """Thread-local storage: every thread has its own copy, made when the thread starts."""
        return bool(self.flags & SHF_TLS)

    @property
    def writable(self) -> bool:
        """Writable at run time: a change here is a change of data, which an update cannot
        replace."""
        return bool(self.flags & SHF_WRITE)

    @property
    def is_merge_strings(self) -> bool:
        """``.rodata.str1.1``-like: NUL-terminated strings the linker may merge."""
        return bool(self.flags & SHF_MERGE) and bool(self.flags & SHF_STRINGS)

    @property
    def is_merge_constants(self) -> bool:
        """``.rodata.cst8``-like: fixed-size constants the linker may merge."""
        return bool(self.flags & SHF_MERGE) and not self.flags & SHF_STRINGS

    @property
    def is_ctor_table(self) -> bool:
        """A constructor or destructor table: a change would need the code run at start-up, which
        already ran."""
        return self.name.startswith(CTOR_PREFIXES) or self.type in (
            "SHT_INIT_ARRAY",
            "SHT_FINI_ARRAY",
            "SHT_PREINIT_ARRAY",
        )

    @property
    def is_hook_table(self) -> bool:
        """The update's hook table (LIVESPLICE_* macros of include/livesplice.h)."""
        return self.name.startswith(HOOK_SECTION_PREFIX)

    @property
    def is_readonly_data(self) -> bool:
        """Read-only data: may be shipped with the update beside its new code."""
        return self.alloc and not self.is_code and not self.writable and not self.is_tls

    @property
    def is_writable_data(self) -> bool:
        """Data the program may write (including TLS): its current value lives in the running
        process."""
        return self.alloc and not self.is_code and (self.writable or self.is_tls)

    @property
    def primary(self) -> ObjSymbol | None:
        """The function or object this section holds (the one named by the section)."""
        named = [s for s in self.symbols if s.type in ("func", "object", "tls")]
        if not named:
            return None
        # -ffunction-sections names the section after the symbol: ".text.<sym>",
        # ".data.<sym>", ".rodata.<sym>"; prefer that one, then the biggest at offset 0.
        for s in named:
            if self.name.endswith("." + s.name):
                return s
        named.sort(key=lambda s: (s.value, -s.size, s.name))
        return named[0]

    def read_data(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``; zeros for a section without contents (.bss)."""
        if not self.data:
            return b"\0" * size
        return self.data[offset : offset + size]

    def string_at(self, offset: int) -> bytes:
        """The NUL-terminated string at ``offset`` of a string section (without the NUL)."""
        end = self.data.find(b"\0", offset)
        return self.data[offset : end if end >= 0 else len(self.data)]


@dataclass(eq=False)
class ElfObject:
    """A relocatable object: its allocated sections, symbols and relocations."""

    path: Path
    unit: str
    machine: str
    sections: list[ObjSection]
    symbols: list[ObjSymbol]
    comment: str = ""

    def __repr__(self) -> str:
        return f"<ElfObject {self.unit} {self.path}>"

    def section(self, name: str) -> ObjSection | None:
        """The section called ``name`` (None: the object has none)."""
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def symbol(self, name: str) -> ObjSymbol | None:
        """The symbol called ``name``, not a section symbol (None: the object has none)."""
        for s in self.symbols:
            if s.name == name and s.type != "section":
                return s
        return None

    @property
    def functions(self) -> list[ObjSymbol]:
        """The object's defined functions: the candidates for replacement."""
        return [s for s in self.symbols if s.type == "func" and s.section is not None]

    @property
    def data_objects(self) -> list[ObjSymbol]:
        """The object's defined data objects in loaded sections: what a patch may not change in
        place."""
        return [
            s
            for s in self.symbols
            if s.type in ("object", "tls") and s.section is not None and s.section.alloc
        ]


_BIND = {
    "STB_LOCAL": "local",
    "STB_GLOBAL": "global",
    "STB_WEAK": "weak",
    "STB_GNU_UNIQUE": "global",
}
_TYPE = {
    "STT_FUNC": "func",
    "STT_GNU_IFUNC": "func",
    "STT_OBJECT": "object",
    "STT_TLS": "tls",
    "STT_SECTION": "section",
    "STT_NOTYPE": "notype",
    "STT_FILE": "file",
    "STT_COMMON": "object",
}


def load_object(path: Path, unit: str) -> ElfObject:
    """Read ``path`` (an ELF relocatable object) into an :class:`ElfObject`."""
    from elftools.elf.descriptions import describe_reloc_type
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        if elf["e_type"] != "ET_REL":
            raise ValueError(f"{path}: not a relocatable object ({elf['e_type']})")
        machine = str(elf["e_machine"])
        by_index: dict[int, ObjSection] = {}
        raw_sections: list[tuple[int, Section]] = list(enumerate(elf.iter_sections()))
        for idx, sec in raw_sections:
            flags = int(sec["sh_flags"])
            if not flags & SHF_ALLOC:
                continue
            data = b"" if sec["sh_type"] == "SHT_NOBITS" else bytes(sec.data())
            by_index[idx] = ObjSection(
                index=idx,
                name=sec.name,
                type=str(sec["sh_type"]),
                flags=flags,
                align=max(1, int(sec["sh_addralign"])),
                size=int(sec["sh_size"]),
                entsize=int(sec["sh_entsize"]),
                data=data,
            )
        symbols: list[ObjSymbol] = []
        symtab = elf.get_section_by_name(".symtab")
        if isinstance(symtab, SymbolTableSection):
            for i, sym in enumerate(symtab.iter_symbols()):
                shndx = sym["st_shndx"]
                section = by_index.get(shndx) if isinstance(shndx, int) else None
                s = ObjSymbol(
                    index=i,
                    name=sym.name,
                    bind=_BIND.get(sym["st_info"]["bind"], "local"),
                    type=_TYPE.get(sym["st_info"]["type"], "notype"),
                    section=section,
                    value=int(sym["st_value"]),
                    size=int(sym["st_size"]),
                )
                if s.type == "section" and section is not None:
                    s.name = section.name
                    section.section_symbol = s
                elif section is not None:
                    section.symbols.append(s)
                symbols.append(s)
        for _idx, sec in raw_sections:
            if not isinstance(sec, RelocationSection):
                continue
            target = by_index.get(int(sec["sh_info"]))
            if target is None:
                continue  # relocations of debug info, not of code or data
            for rel in sec.iter_relocations():
                sym = symbols[rel["r_info_sym"]]
                target.relocs.append(
                    ObjReloc(
                        offset=int(rel["r_offset"]),
                        type=describe_reloc_type(rel["r_info_type"], elf),
                        symbol=sym,
                        addend=int(rel["r_addend"]) if rel.is_RELA() else 0,
                    )
                )
        comment = elf.get_section_by_name(".comment")
        comment_text = ""
        if comment is not None:
            comment_text = bytes(comment.data()).split(b"\0")[0].decode(errors="replace")
    for sec_obj in by_index.values():
        sec_obj.relocs.sort(key=lambda r: r.offset)
        sec_obj.symbols.sort(key=lambda s: (s.value, s.name))
    return ElfObject(
        path=path,
        unit=unit,
        machine=machine,
        sections=[by_index[i] for i in sorted(by_index)],
        symbols=symbols,
        comment=comment_text,
    )


def function_name_of_section(name: str) -> str | None:
    """``.text.unlikely.foo`` -> ``foo``; ``.text`` -> None."""
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


# gcc's clone and partition suffixes (gcc/ipa-*.cc, "Function Attributes"/-fipa-sra docs):
# ".isra.N" (interprocedural scalar replacement), ".constprop.N" (constant propagation),
# ".part.N" (partial inlining: the outlined tail), ".cold" (hot/cold splitting), and the
# ".lto_priv.N"/".localalias" forms. N is a per-unit counter that can change when the patch
# adds or removes an unrelated clone, so correlation ignores it.
CLONE_SUFFIX = re.compile(r"\.(isra|constprop|part|cold|lto_priv|localalias|str)(\.\d+)?")
# Static locals are numbered by gcc ("counter.0", "calls.1", "__func__.2", "CSWTCH.10").
NUMBER_SUFFIX = re.compile(r"\.\d+$")


def strip_clone_numbers(name: str) -> str:
    """``foo.isra.0.cold`` and ``foo.isra.3.cold`` -> ``foo.isra.cold``."""
    return CLONE_SUFFIX.sub(lambda m: "." + m.group(1), name)


def is_calling_convention_clone(name: str) -> bool:
    """A local clone gcc may have given a private calling convention (not ``.cold``)."""
    return bool(re.search(r"\.(isra|constprop|part)(\.\d+)?", name))
