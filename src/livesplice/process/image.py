"""A target ELF file (executable or shared library) as it is mapped in a running process.

Everything here is read-only and happens before any process is stopped: the memory map comes
from ``/proc/PID/maps``, the ELF facts (symbols, PLT, GOT, build-id, compiler identity) from the
mapped file itself, read through ``/proc/PID/map_files`` so that a file replaced or deleted on
disk after the process started is still the one we describe.

Running address = link-time address + ``bias``. For a non-PIE executable (ET_EXEC) the bias is
0; for ET_DYN (PIE executables, shared libraries) it is where the kernel / ld.so placed the
first PT_LOAD segment minus its p_vaddr (System V gABI, "Program Loading").
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from livesplice.process.procmaps import Mapping, read_maps

if TYPE_CHECKING:
    from elftools.elf.sections import Section  # no type hints: Any to mypy

PAGE = 0x1000
COMMENT_MAX = 1 << 16  # a .comment larger than this is not a compiler's (read none of it)

# Symbol types we keep (gABI st_info low nibble). STT_GNU_IFUNC (10) is a GNU extension:
# the symbol's value is the address of a *resolver*, never of the function itself.
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_TLS, STT_GNU_IFUNC = 0, 1, 2, 3, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

# x86-64 dynamic relocation types (psABI, table "Relocation Types")
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_DTPMOD64 = 16
R_X86_64_TPOFF64 = 18
R_X86_64_IRELATIVE = 37


@dataclass(frozen=True)
class ElfSymbol:
    """One ELF symbol of the image file (.dynsym or .symtab), at its link-time address."""

    name: str
    value: int  # link-time address (st_value)
    size: int
    type: int  # STT_*
    bind: int  # STB_*
    defined: bool  # st_shndx != SHN_UNDEF
    dynamic: bool  # from .dynsym (else .symtab)
    default_version: bool = True  # .gnu.version: not a hidden (name@VER) version


@dataclass
class ElfFacts:
    """What livesplice needs from one ELF file, at link-time addresses."""

    etype: str
    loads: list[tuple[int, int, int, int, int]]  # (p_vaddr, p_memsz, p_offset, p_filesz, flags)
    tls: tuple[int, int, int] | None  # PT_TLS (p_vaddr, p_memsz, p_align)
    soname: str
    build_id: str
    comment: str
    symbols: dict[str, list[ElfSymbol]] = field(default_factory=dict)
    plt: dict[str, int] = field(default_factory=dict)  # name -> entry address
    plt_ranges: list[tuple[int, int]] = field(default_factory=list)
    got: dict[str, int] = field(default_factory=dict)  # name -> GLOB_DAT/JUMP_SLOT slot
    tpoff_slots: dict[str, int] = field(default_factory=dict)  # name -> TPOFF64 slot
    irelative: list[tuple[int, int]] = field(default_factory=list)  # (slot, resolver addend)


def _plt_slot_of_entry(code: bytes, pos: int, vaddr: int) -> int | None:
    """If ``code[pos:]`` is ``jmp *disp32(%rip)`` (optionally ``bnd``-prefixed), its slot."""
    for prefix in (b"\xff\x25", b"\xf2\xff\x25"):
        if code.startswith(prefix, pos):
            end = pos + len(prefix) + 4
            if end <= len(code):
                disp: int = struct.unpack_from("<i", code, pos + len(prefix))[0]
                return vaddr + end + disp
    return None


def _scan_plt(sec: Section, slot_names: dict[int, str], plt: dict[str, int]) -> None:
    """Map PLT entries to names through the GOT slot each entry jumps through.

    Works for the three layouts ld produces (ld.bfd 2.40): ``.plt`` (16-byte entries,
    ``jmp *slot(%rip)`` first, entry 0 is PLT0), ``.plt.sec`` with IBT (``endbr64; bnd jmp
    *slot(%rip)``; the ``.plt`` entries then only push and jump to PLT0), and ``.plt.got``
    (8 or 16-byte entries for functions whose address is also taken, GLOB_DAT slots).
    """
    code = sec.data()
    base = sec["sh_addr"]
    entsize = sec["sh_entsize"] or (8 if sec.name == ".plt.got" else 16)
    for start in range(0, len(code), entsize):
        for pos in range(start, min(start + entsize, len(code))):
            slot = _plt_slot_of_entry(code, pos, base)
            if slot is not None:
                name = slot_names.get(slot)
                if name is not None and name not in plt:
                    plt[name] = base + start
                break


@lru_cache(maxsize=64)
def _elf_facts_cached(path: str, _dev: int, _ino: int, _mtime: int) -> ElfFacts:
    from elftools.elf.constants import SH_FLAGS
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import NoteSection, SymbolTableSection

    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = []
        tls = None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                loads.append(
                    (
                        seg["p_vaddr"],
                        seg["p_memsz"],
                        seg["p_offset"],
                        seg["p_filesz"],
                        seg["p_flags"],
                    )
                )
            elif seg["p_type"] == "PT_TLS":
                tls = (seg["p_vaddr"], seg["p_memsz"], seg["p_align"])
        soname = ""
        build_id = ""
        comment = ""
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_SONAME":
                        soname = str(getattr(tag, "soname", ""))
            elif isinstance(sec, NoteSection):
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        build_id = note["n_desc"]
            elif sec.name == ".comment" and sec["sh_size"] <= COMMENT_MAX:
                comment = "\n".join(
                    s.decode(errors="replace") for s in sec.data().split(b"\0") if s
                )
        facts = ElfFacts(elf["e_type"], loads, tls, soname, build_id, comment)

        versym = elf.get_section_by_name(".gnu.version")
        vers = versym.data() if versym is not None else b""
        for secname in (".symtab", ".dynsym"):
            symtab = elf.get_section_by_name(secname)
            if not isinstance(symtab, SymbolTableSection):
                continue
            dynamic = secname == ".dynsym"
            for i, sym in enumerate(symtab.iter_symbols()):
                if not sym.name:
                    continue
                info = sym.entry["st_info"]
                stype = _STT.get(info["type"], -1)
                bind = _STB.get(info["bind"], -1)
                default = True
                if dynamic and 2 * i + 2 <= len(vers):
                    # bit 15 of a versym entry = hidden: only reachable as name@VER
                    # (gABI GNU extension, "Symbol Versioning")
                    default = not (struct.unpack_from("<H", vers, 2 * i)[0] & 0x8000)
                facts.symbols.setdefault(sym.name, []).append(
                    ElfSymbol(
                        sym.name,
                        sym["st_value"],
                        sym["st_size"],
                        stype,
                        bind,
                        sym["st_shndx"] != "SHN_UNDEF",
                        dynamic,
                        default,
                    )
                )

        slot_names: dict[int, str] = {}
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection) or not sec.is_RELA():
                continue
            if sec["sh_flags"] & SH_FLAGS.SHF_ALLOC == 0:  # .rela.text of an object etc.
                continue
            link = elf.get_section(sec["sh_link"]) if sec["sh_link"] else None
            symtab = link if isinstance(link, SymbolTableSection) else None
            for rel in sec.iter_relocations():
                rtype = rel["r_info_type"]
                if rtype == R_X86_64_IRELATIVE:
                    facts.irelative.append((rel["r_offset"], rel["r_addend"]))
                    continue
                if rtype not in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_TPOFF64):
                    continue
                if symtab is None or not rel["r_info_sym"]:
                    continue
                name = symtab.get_symbol(rel["r_info_sym"]).name
                if rtype == R_X86_64_TPOFF64:
                    facts.tpoff_slots.setdefault(name, rel["r_offset"])
                else:
                    facts.got.setdefault(name, rel["r_offset"])
                    slot_names.setdefault(rel["r_offset"], name)
        # .plt.sec before .plt: with IBT the .plt.sec entry is the one to call
        for name in (".plt.sec", ".plt", ".plt.got"):
            plt = elf.get_section_by_name(name)
            if plt is not None and plt["sh_size"]:
                facts.plt_ranges.append((plt["sh_addr"], plt["sh_addr"] + plt["sh_size"]))
                _scan_plt(plt, slot_names, facts.plt)
    return facts


_STT = {
    "STT_NOTYPE": STT_NOTYPE,
    "STT_OBJECT": STT_OBJECT,
    "STT_FUNC": STT_FUNC,
    "STT_SECTION": STT_SECTION,
    "STT_TLS": STT_TLS,
    "STT_GNU_IFUNC": STT_GNU_IFUNC,
    "STT_LOOS": STT_GNU_IFUNC,
}
_STB = {
    "STB_LOCAL": STB_LOCAL,
    "STB_GLOBAL": STB_GLOBAL,
    "STB_WEAK": STB_WEAK,
    "STB_GNU_UNIQUE": STB_GLOBAL,
    "STB_LOOS": STB_GLOBAL,
}


def elf_facts(path: str) -> ElfFacts:
    """Parse ``path`` once (cached on device, inode and mtime)."""
    st = os.stat(path)
    return _elf_facts_cached(path, st.st_dev, st.st_ino, st.st_mtime_ns)


def _clean_path(path: str) -> str:
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


def _is_file_path(path: str) -> bool:
    return path.startswith("/") and not path.startswith("/memfd:") and not path.startswith("/dev/")


class MappedImage:
    """One ELF file as mapped in a process: bias, text ranges, symbols, PLT and GOT."""

    def __init__(self, pid: int, path: str, mappings: list[Mapping]) -> None:
        self.pid = pid
        self.path = _clean_path(path)
        self.mappings = sorted(mappings, key=lambda m: m.start)
        first = self.mappings[0]
        # read the file that is actually mapped, even if replaced on disk since
        self.file_path = f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}"
        if not os.path.exists(self.file_path):
            self.file_path = self.path
        self.facts = elf_facts(self.file_path)
        self.bias = self._compute_bias()
        self.build_id = self.facts.build_id
        self.comment = self.facts.comment
        self.soname = self.facts.soname
        base = os.path.basename(self.path)
        self.name = base if not self.soname or self.soname == base else f"{base} {self.soname}"
        self.text = [(m.start, m.end) for m in self.mappings if m.executable]

    def _compute_bias(self) -> int:
        if self.facts.etype == "ET_EXEC":
            return 0
        for m in self.mappings:
            for vaddr, _memsz, off, _filesz, _flags in self.facts.loads:
                if off & ~(PAGE - 1) == m.offset:
                    return m.start - (vaddr & ~(PAGE - 1))
        return self.mappings[0].start - (self.facts.loads[0][0] & ~(PAGE - 1))

    def __repr__(self) -> str:
        return f"MappedImage({self.path!r}, bias={self.bias:#x})"

    @property
    def is_executable_file(self) -> bool:
        """True for the program itself (has PT_INTERP or is ET_EXEC), False for a library."""
        return self.facts.etype == "ET_EXEC" or not self.soname

    def matches_name(self, name: str) -> bool:
        """Target.name may be the file name or the soname ("libfoo.so.1")."""
        return name in (os.path.basename(self.path), self.soname)

    @property
    def extent(self) -> tuple[int, int]:
        """Lowest and highest running address of the image's mappings."""
        return self.mappings[0].start, max(m.end for m in self.mappings)

    def elf_symbols(self, name: str) -> list[ElfSymbol]:
        """Every symbol of the file called ``name`` (static functions may share a name), link-
        time values."""
        return self.facts.symbols.get(name, [])

    def symbols(self, name: str) -> list[int]:
        """Running addresses of the symbols called ``name`` defined in this image.

        Several for duplicate local names (``static int helper`` in two units). TLS symbols
        are left out: their value is an offset into the TLS block, not an address.
        """
        out: list[int] = []
        for s in self.elf_symbols(name):
            if s.defined and s.type != STT_TLS and s.value:
                addr = s.value + self.bias
                if addr not in out:
                    out.append(addr)
        return out

    def plt_entry(self, name: str) -> int | None:
        """Running address of the PLT entry for ``name`` (None: the image calls it otherwise or
        not at all)."""
        off = self.facts.plt.get(name)
        return None if off is None else off + self.bias

    def got_slot(self, name: str) -> int | None:
        """Running address of the GOT slot for ``name``: where the dynamic linker wrote its
        address."""
        off = self.facts.got.get(name)
        return None if off is None else off + self.bias

    def in_plt(self, addr: int) -> bool:
        """Whether ``addr`` is inside the image's PLT: a call there is a call to an external
        function."""
        return any(lo + self.bias <= addr < hi + self.bias for lo, hi in self.facts.plt_ranges)

    def in_text(self, addr: int) -> bool:
        """Whether ``addr`` is inside the image's executable mappings."""
        return any(lo <= addr < hi for lo, hi in self.text)


def images_by_path(pid: int, maps: list[Mapping]) -> dict[str, list[Mapping]]:
    """The process's file-backed mappings grouped by file: each group is one candidate image."""
    out: dict[str, list[Mapping]] = {}
    for m in maps:
        if _is_file_path(m.path):
            out.setdefault(m.path, []).append(m)
    return out


def looks_like_elf(path: str) -> bool:
    """Whether ``path`` starts with the ELF magic (cheap, before any parsing)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


_ELF_ERRORS: tuple[type[BaseException], ...] | None = None


def elf_errors() -> tuple[type[BaseException], ...]:
    """What parsing a malformed ELF file can raise (any local user can map one)."""
    global _ELF_ERRORS
    if _ELF_ERRORS is None:
        import struct

        from elftools.common.exceptions import ELFError, ELFParseError
        from elftools.construct import ConstructError

        # pyelftools' construct errors are not ELFErrors; a size field of 2^45 is a
        # MemoryError or an OverflowError; a name that is not text, a UnicodeError
        _ELF_ERRORS = (
            OSError,
            ValueError,
            ELFError,
            ELFParseError,
            ConstructError,
            struct.error,
            IndexError,
            KeyError,
            AssertionError,
            MemoryError,
            OverflowError,
            UnicodeError,
            TypeError,
            RecursionError,
        )
    return _ELF_ERRORS


def _read_build_id(path: str) -> str:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return ""
        f.seek(0)
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():  # type: ignore[attr-defined]
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    return ""


# build-id by file identity (device, inode, ctime, size), whatever path reached the file
# (/proc/PID/map_files/... differs for every process): the agent looks at every exec on the
# machine, mostly the same few programs. ctime, not mtime: a user can set mtime, not ctime.
_BUILD_IDS: dict[tuple[int, int, int, int], str] = {}


def gnu_build_id(path: str) -> str:
    """The GNU build-id (hex) of an ELF file; "" when it has none or is not a valid ELF."""
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
        if key not in _BUILD_IDS:
            if len(_BUILD_IDS) >= 4096:
                _BUILD_IDS.clear()
            _BUILD_IDS[key] = _read_build_id(path)
        return _BUILD_IDS[key]
    except elf_errors():
        return ""


def find_images(
    pid: int,
    name: str,
    maps: list[Mapping] | None = None,
    build_ids: Collection[str] = (),
    skipped: list[str] | None = None,
) -> list[MappedImage]:
    """Every ELF file mapped in ``pid`` that is the target ``name``.

    A file is the target when its GNU build-id is one of ``build_ids`` -- whatever its path or name
    (symlinked names such as Debian's redis-server -> redis-check-rdb, renames, files deleted
    by an upgrade, other mount namespaces: the file is read through /proc/PID/map_files) --
    or when its file name or soname is ``name`` (run-pre matching then decides: a stripped
    archive binary has another build-id than the pre build). Files with the name that are
    not valid ELF files are left out, with a note in ``skipped``.
    """
    maps = read_maps(pid) if maps is None else maps
    out: list[MappedImage] = []
    for path, ms in images_by_path(pid, maps).items():
        via = f"/proc/{pid}/map_files/{ms[0].start:x}-{ms[0].end:x}"
        readable = via if os.path.exists(via) else _clean_path(path)
        base = os.path.basename(_clean_path(path))
        by_id = bool(build_ids) and gnu_build_id(readable) in build_ids
        # cheap pre-filter: libfoo.so.1 is usually a symlink to libfoo.so.1.2.3
        if not by_id and base != name and not base.startswith(name.split(".so")[0]):
            continue
        if not by_id and not looks_like_elf(readable):
            continue
        try:
            img = MappedImage(pid, path, ms)
        except elf_errors() as e:
            if skipped is not None and (by_id or base == name):
                skipped.append(
                    f"{_clean_path(path)} in process {pid}: not a valid ELF "
                    f"file ({type(e).__name__})"
                )
            continue
        if by_id or img.matches_name(name):
            out.append(img)
    return out


def main_executable(pid: int, maps: list[Mapping]) -> MappedImage | None:
    """The program file ``pid`` runs (what /proc/PID/exe names), as mapped; None if it is
    not a readable ELF file."""
    try:
        exe = _clean_path(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None
    for path, ms in images_by_path(pid, maps).items():
        if _clean_path(path) == exe:
            try:
                return MappedImage(pid, path, ms)
            except elf_errors():
                return None
    return None


def processes_running(name: str, build_ids: Collection[str] = ()) -> list[int]:
    """Pids whose executable or one of whose mapped libraries is ``name`` (file or soname)
    or has one of the GNU build-ids ``build_ids``."""
    pids: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            exe = _clean_path(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            continue  # kernel thread, gone, or not ours to see
        if os.path.basename(exe) == name:
            pids.append(pid)
            continue
        try:
            maps = read_maps(pid)
            if any(_quick_candidate(pid, m, name, build_ids) for m in maps):
                pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def _quick_candidate(pid: int, m: Mapping, name: str, build_ids: Collection[str]) -> bool:
    """Could this mapping be the target? (by name, or by build-id read through map_files)"""
    if not _is_file_path(m.path):
        return False
    base = os.path.basename(_clean_path(m.path))
    if base == name or base.startswith(name.split(".so")[0]):
        return True
    if not build_ids or m.offset != 0:
        return False
    return gnu_build_id(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}") in build_ids


# Where a file image is placed when it is not loaded (ET_DYN): any page-aligned base works,
# as run-pre matching compares code and learns addresses relative to it.
FILE_IMAGE_BASE = 0x555555554000
_PF_X, _PF_W, _PF_R = 1, 2, 4


def file_image(path: str) -> tuple[MappedImage, list[Mapping], Callable[[int, int], bytes]]:
    """An ELF file on disk as the loader would map it, for run-pre matching without a process
    (``create --verify-against``): the image, its mappings, and a memory reader.

    Memory is the file's bytes at each PT_LOAD's place (zeros past p_filesz, as for .bss).
    Nothing is relocated, so GOT slots hold what the file holds, not what ld.so writes:
    the matcher is told not to learn from them (``offline``).
    """
    with open(path, "rb") as f:
        data = f.read()
    facts = elf_facts(path)
    base = 0 if facts.etype == "ET_EXEC" else FILE_IMAGE_BASE
    # what mmap maps for each PT_LOAD: whole pages of the file from p_offset's page, up to
    # the end of its file part (the rest of the segment: zeros, as for .bss); a segment need
    # not start on a page boundary (lld's layouts)
    maps: list[Mapping] = []
    pieces = []  # (lo, hi, file_lo, file_hi) of each mapping
    for vaddr, memsz, off, filesz, flags in facts.loads:
        lo = base + (vaddr & ~(PAGE - 1))
        hi = base + ((vaddr + memsz + PAGE - 1) & ~(PAGE - 1))
        perms = (
            ("r" if flags & _PF_R else "-")
            + ("w" if flags & _PF_W else "-")
            + ("x" if flags & _PF_X else "-")
            + "p"
        )
        maps.append(Mapping(lo, hi, perms, off & ~(PAGE - 1), path))
        pieces.append((lo, hi, off & ~(PAGE - 1), off + filesz))
    if not maps:
        raise ValueError(f"{path} has no loadable segment")

    def read(addr: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            for lo, hi, file_lo, file_hi in pieces:
                if lo <= addr < hi:
                    take = min(n, hi - addr)
                    pos = file_lo + (addr - lo)
                    chunk = data[pos : min(pos + take, file_hi)] if pos < file_hi else b""
                    out += chunk + b"\0" * (take - len(chunk))
                    addr, n = addr + take, n - take
                    break
            else:
                if not out:
                    raise OSError(f"address {addr:#x} is not in {path}")
                break
        return bytes(out)

    return MappedImage(0, path, maps), maps, read
