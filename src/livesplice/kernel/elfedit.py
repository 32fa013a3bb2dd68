"""A small ELF64 little-endian relocatable-object editor, for the livepatch module.

Used for the livepatch module after kbuild linked it: klp relocations and symbols must be
marked in ways neither ``ld -r`` nor modpost know (``SHF_RELA_LIVEPATCH`` sections,
``SHN_LIVEPATCH`` symbols; Documentation/livepatch/module-elf-format.rst), and apply renames
``.klp.sym`` symbols once run-pre matching has decided their ``sympos``. It runs in the lab
guest too (the overlay carries pyelftools there).

The file is parsed into section headers + contents and written back from scratch (an ET_REL
file has no program headers, so nothing else refers to file offsets).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.constants import SH_FLAGS
from elftools.elf.enums import ENUM_SH_TYPE_BASE

SHT_NOBITS = ENUM_SH_TYPE_BASE["SHT_NOBITS"]
SHT_RELA = ENUM_SH_TYPE_BASE["SHT_RELA"]
SHT_SYMTAB = ENUM_SH_TYPE_BASE["SHT_SYMTAB"]
SHF_ALLOC = SH_FLAGS.SHF_ALLOC
SHF_INFO_LINK = SH_FLAGS.SHF_INFO_LINK
# the kernel's own, which pyelftools does not know (include/uapi/linux/elf.h)
SHF_RELA_LIVEPATCH = 0x00100000
SHN_LIVEPATCH = 0xFF20

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")


@dataclass
class ElfSection:
    """One section of the edited object: header fields and contents, written back as they are
    here."""

    name: str
    type: int
    flags: int
    addr: int
    link: int
    info: int
    align: int
    entsize: int
    data: bytes  # for NOBITS: b"" and size in nobits_size
    nobits_size: int = 0

    @property
    def size(self) -> int:
        """The section's size: its contents' length, or the header's size for NOBITS (.bss has
        none)."""
        return self.nobits_size if self.type == SHT_NOBITS else len(self.data)


class ElfRel:
    """An ELF64 ET_REL file as a list of sections (index 0 is the null section)."""

    def __init__(self, raw: bytes) -> None:
        if raw[:4] != b"\x7fELF" or raw[4] != 2 or raw[5] != 1:
            raise ValueError("not an ELF64 little-endian file")
        f = _EHDR.unpack_from(raw, 0)
        self.ident, self.e_type, self.machine, self.version = f[0], f[1], f[2], f[3]
        self.flags = f[7]
        shoff, shnum, shstrndx = f[6], f[12], f[13]
        heads = [_SHDR.unpack_from(raw, shoff + i * _SHDR.size) for i in range(shnum)]
        shstr = heads[shstrndx]
        strtab = raw[shstr[4] : shstr[4] + shstr[5]]
        self.sections: list[ElfSection] = []
        for h in heads:
            name = strtab[h[0] : strtab.index(b"\0", h[0])].decode()
            data = b"" if h[1] == SHT_NOBITS else raw[h[4] : h[4] + h[5]]
            self.sections.append(
                ElfSection(
                    name,
                    h[1],
                    h[2],
                    h[3],
                    h[6],
                    h[7],
                    h[8],
                    h[9],
                    data,
                    h[5] if h[1] == SHT_NOBITS else 0,
                )
            )
        self.shstrndx = shstrndx

    def index(self, name: str) -> int:
        """Index of the section called ``name`` (KeyError: none)."""
        for i, s in enumerate(self.sections):
            if s.name == name:
                return i
        raise KeyError(name)

    def symtab_index(self) -> int:
        """Index of the symbol table (a relocatable object has exactly one)."""
        return next(i for i, s in enumerate(self.sections) if s.type == SHT_SYMTAB)

    def symbols(self) -> list[tuple[str, int, int, int, int, int]]:
        """(name, info, other, shndx, value, size) for every symbol, in table order."""
        st = self.sections[self.symtab_index()]
        strs = self.sections[st.link].data
        out = []
        for off in range(0, len(st.data), SYM.size):
            n, info, other, shndx, value, size = SYM.unpack_from(st.data, off)
            out.append((strs[n : strs.index(b"\0", n)].decode(), info, other, shndx, value, size))
        return out

    def set_symbols(self, syms: list[tuple[str, int, int, int, int, int]]) -> None:
        """Rewrite symtab + its strtab (same order and count: relocations stay valid)."""
        sti = self.symtab_index()
        st = self.sections[sti]
        strs = bytearray(b"\0")
        where: dict[str, int] = {"": 0}
        body = bytearray()
        for name, info, other, shndx, value, size in syms:
            if name not in where:
                where[name] = len(strs)
                strs += name.encode() + b"\0"
            body += SYM.pack(where[name], info, other, shndx, value, size)
        st.data = bytes(body)
        self.sections[st.link].data = bytes(strs)

    def to_bytes(self) -> bytes:
        """The object as a file again: sections laid out anew with a fresh section-name table
        (nothing in an ET_REL file refers to file offsets)."""
        names = bytearray(b"\0")
        name_off: list[int] = []
        for s in self.sections:
            if s.name:
                name_off.append(len(names))
                names += s.name.encode() + b"\0"
            else:
                name_off.append(0)
        self.sections[self.shstrndx].data = bytes(names)
        out = bytearray(_EHDR.size)
        offsets: list[int] = []
        for s in self.sections:
            align = max(s.align, 1)
            if s.type != SHT_NOBITS and s.data:
                out += b"\0" * ((-len(out)) % align)
            offsets.append(len(out))
            out += s.data
        out += b"\0" * ((-len(out)) % 8)
        shoff = len(out)
        for s, off, n in zip(self.sections, offsets, name_off, strict=True):
            out += _SHDR.pack(
                n,
                s.type,
                s.flags,
                s.addr,
                off if s.type else 0,
                s.size,
                s.link,
                s.info,
                s.align,
                s.entsize,
            )
        _EHDR.pack_into(
            out,
            0,
            self.ident,
            self.e_type,
            self.machine,
            self.version,
            0,
            0,
            shoff,
            self.flags,
            _EHDR.size,
            0,
            0,
            _SHDR.size,
            len(self.sections),
            self.shstrndx,
        )
        return bytes(out)


def klp_sym_objname(name: str) -> str | None:
    """``.klp.sym.<obj>.<name>,<sympos>`` -> obj, else None."""
    if not name.startswith(".klp.sym."):
        return None
    return name[len(".klp.sym.") :].split(".", 1)[0]


def make_klp_relocations(raw: bytes) -> bytes:
    """Turn relocations against ``.klp.sym.*`` symbols into livepatch relocations.

    ``ld -r`` leaves them as ordinary undefined symbols in ``.rela<sec>``; the module loader
    must skip them and livepatch must apply them when the patched object is present, so each
    moves to ``.klp.rela.<obj>.<sec>`` (flags ``SHF_ALLOC | SHF_RELA_LIVEPATCH``: the section
    must stay in memory until the object loads) and each symbol gets ``SHN_LIVEPATCH``
    (module-elf-format.rst, sections 3 and 4).
    """
    elf = ElfRel(raw)
    syms = elf.symbols()
    klp_obj = {i: klp_sym_objname(s[0]) for i, s in enumerate(syms)}
    syms = [
        (n, info, other, SHN_LIVEPATCH if klp_obj[i] else shndx, 0 if klp_obj[i] else v, sz)
        for i, (n, info, other, shndx, v, sz) in enumerate(syms)
    ]
    elf.set_symbols(syms)
    new_sections: list[ElfSection] = []
    for sec in list(elf.sections):
        if sec.type != SHT_RELA or sec.flags & SHF_RELA_LIVEPATCH:
            continue
        keep = bytearray()
        moved: dict[str, bytearray] = {}
        for off in range(0, len(sec.data), RELA.size):
            entry = sec.data[off : off + RELA.size]
            _, info, _ = RELA.unpack(entry)
            obj = klp_obj.get(info >> 32)
            if obj is None:
                keep += entry
            else:
                moved.setdefault(obj, bytearray()).extend(entry)
        if not moved:
            continue
        sec.data = bytes(keep)
        target = elf.sections[sec.info].name
        for obj, data in sorted(moved.items()):
            new_sections.append(
                ElfSection(
                    f".klp.rela.{obj}.{target}",
                    SHT_RELA,
                    SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH,
                    0,
                    sec.link,
                    sec.info,
                    8,
                    RELA.size,
                    bytes(data),
                )
            )
    elf.sections.extend(new_sections)
    return elf.to_bytes()


def set_klp_sympos(raw: bytes, sympos: dict[str, int]) -> bytes:
    """Rename ``.klp.sym.<obj>.<name>,<old>`` symbols: ``sympos`` maps ``<obj>.<name>`` to
    the position run-pre matching decided (1-based among same-named symbols, 0 = unique)."""
    elf = ElfRel(raw)
    syms = []
    for name, *rest in elf.symbols():
        if name.startswith(".klp.sym."):
            base = name[len(".klp.sym.") :].rsplit(",", 1)[0]
            if base in sympos:
                name = f".klp.sym.{base},{sympos[base]}"
        syms.append((name, *rest))
    elf.set_symbols(syms)  # type: ignore[arg-type]
    return elf.to_bytes()
