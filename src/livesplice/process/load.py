"""Load planning: lay out the update's code and data, resolve every symbol, make trampolines.

Everything slow happens here, before the stop window: the layout, the symbol resolution
(docs/ARCHITECTURE.md, Contract 2, in that order), the relocation of every shipped section
and the 5-byte jumps. The stop window then only writes bytes.

Layout of the code region (r-x; read-only data may share it):

    replacement / new_function / hook / copied_rodata sections (each aligned per Section.align)
    GOT slots: one 8-byte slot per key referenced through R_X86_64_GOTPCREL(X) (holding S) or
               R_X86_64_GOTTPOFF (holding the TP offset)
    veneers:   per function that may be out of rel32 reach: ``jmp *slot(%rip)`` + its slot

The data region (rw-) holds ``new_data``. Both regions must lie within ``near_range(image)``
so that rel32 references to the image (its functions, data, the trampolines) fit.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from livesplice.errors import NoMatch
from livesplice.process.image import MappedImage
from livesplice.process.match import MatchResult
from livesplice.process.procmaps import Mapping
from livesplice.process.relocate import (
    TLSGD_SLOT,
    TPOFF_SLOT,
    RelocationError,
    apply_relocs,
    fits,
)
from livesplice.process.resolve import ExternalResolver, executable_tpoff, global_in_image
from livesplice.update.format import Reloc, Section, SymbolInfo, Target

Read = Callable[[int, int], bytes]

CODE_ROLES = ("replacement", "new_function", "hook", "copied_rodata")
JMP_REL32 = 0xE9
JMP_REL32_SIZE = 5
# jmp *slot(%rip): ff 25 disp32 (Intel SDM, JMP FF /4), padded with int3 to 8 bytes
VENEER_SIZE = 8
REACH = 2**31  # rel32 reach from the end of an instruction
_MARGIN = 2**24  # keep room for the region itself inside the reach


def _align(n: int, a: int) -> int:
    a = max(a, 1)
    return (n + a - 1) // a * a


def near_range(image: MappedImage) -> tuple[int, int]:
    """Where the update's regions must be mapped: every address in [lo, hi) reaches every
    byte of ``image`` with a rel32 (and vice versa); pass it to remote_mmap(near=...)."""
    lo_img, hi_img = image.extent
    lo = max(_align(hi_img - REACH + _MARGIN, 0x1000), 0x10000)
    hi = (lo_img + REACH - _MARGIN) & ~0xFFF
    return lo, hi


@dataclass
class Trampoline:
    """The 5-byte jump written at a replaced function's entry."""

    function: str
    key: str  # pre section key
    address: int  # where the jump goes (the running function's entry)
    original: bytes  # the 5 bytes there now (written back by undo)
    jump: bytes  # e9 rel32
    target: int  # the replacement's address


@dataclass
class LoadImage:
    """The update laid out for one image: code and data bytes relocated for their new addresses,
    every key's address, the trampolines to write and the veneers for far calls."""

    code: bytes
    data: bytes
    addresses: dict[str, int]  # every shipped section key / symbol key -> its new address
    trampolines: list[Trampoline]
    veneers: dict[str, int] = field(default_factory=dict)  # key -> veneer used for far calls


class LoadPlan:
    """The update's layout, with every existing symbol already resolved."""

    def __init__(
        self,
        target: Target,
        image: MappedImage,
        match: MatchResult,
        read: Read,
        values: dict[str, int],
        tpoffs: dict[str, int],
        tlsgd: dict[str, int],
    ) -> None:
        self.target = target
        self.image = image
        self.match = match
        self.read = read
        self.values = values  # existing keys -> running address (resolution steps 2-5)
        self.tpoffs = tpoffs
        self.tlsgd = tlsgd
        self.code_layout: list[tuple[Section, int]] = []
        self.data_layout: list[tuple[Section, int]] = []
        self.slots: dict[str, int] = {}  # slot key -> offset in the code region
        self.veneers: dict[str, int] = {}  # key -> offset of its veneer; slot at +VENEER_SIZE
        off = 0
        for s in target.sections:
            if s.role in CODE_ROLES:
                off = _align(off, max(s.align, 16 if s.executable else 1))
                self.code_layout.append((s, off))
                off += s.size
        off = _align(off, 8)
        for s, _ in self.code_layout:
            for r in s.relocs:
                if r.type in ("R_X86_64_GOTPCREL", "R_X86_64_GOTPCRELX", "R_X86_64_REX_GOTPCRELX"):
                    key = r.symbol
                elif r.type == "R_X86_64_GOTTPOFF":
                    key = TPOFF_SLOT + r.symbol
                else:
                    continue
                if key not in self.slots:
                    self.slots[key] = off
                    off += 8
        off = _align(off, 16)
        shipped = self.shipped_keys()
        for s, _ in self.code_layout:
            for r in s.relocs:
                if (
                    r.type in ("R_X86_64_PLT32", "R_X86_64_PC32")
                    and r.symbol not in shipped
                    and r.symbol not in self.veneers
                    and self._is_function(r.symbol)
                ):
                    self.veneers[r.symbol] = off
                    off += VENEER_SIZE + 8
        self.code_size = off
        doff = 0
        for s in target.sections:
            if s.role == "new_data":
                doff = _align(doff, s.align)
                self.data_layout.append((s, doff))
                doff += s.size
        self.data_size = doff

    def shipped_keys(self) -> set[str]:
        """Keys of everything the update ships (sections, their symbols, new data): references to
        these resolve to the new copy, the rest to the running program."""
        keys: set[str] = set()
        for s, _ in self.code_layout + self.data_layout:
            keys.add(s.key)
            keys.update(s.symbols)
        for s in self.target.sections:
            if s.role == "new_data":
                keys.add(s.key)
                keys.update(s.symbols)
        return keys

    def _is_function(self, key: str) -> bool:
        info = self.target.symbols.get(key)
        if info is None:
            return key in self.match.functions
        return info.kind in ("func", "notype") or key in self.match.functions

    def build(self, code_base: int, data_base: int) -> LoadImage:
        """Relocate everything for regions mapped at ``code_base`` and ``data_base``."""
        addresses: dict[str, int] = {}
        for s, off in self.code_layout:
            base = code_base + off
            addresses[s.key] = base
            for k, o in s.symbols.items():
                addresses[k] = base + o
        for s, off in self.data_layout:
            base = data_base + off
            addresses[s.key] = base
            for k, o in s.symbols.items():
                addresses[k] = base + o
        code_end = code_base + self.code_size

        # Post code that refers to a replaced function (a call, or its address stored in a
        # callback table) gets the ORIGINAL entry, which jumps to the replacement: a pointer
        # that escapes into the program's data stays valid after `undo` unmaps the update,
        # and stacked updates all enter through the one entry. Cost: one 5-byte jmp per
        # such call (1.003x per call, measured).
        via_entry: dict[str, int] = {}
        for s, _ in self.code_layout:
            entry = self.match.entries.get(s.replaces or s.key)
            if s.role != "replacement" or entry is None:
                continue
            via_entry[s.key] = entry
            via_entry.update({k: entry for k, o in s.symbols.items() if o == 0})

        def resolve(key: str) -> int:
            if key.startswith(ENTRY_PREFIX):
                return via_entry[key[len(ENTRY_PREFIX) :]]
            if key in addresses:
                return addresses[key]
            if key in self.values:
                return self.values[key]
            raise RelocationError(f"cannot find symbol {key}")

        def near(v: int) -> bool:
            return fits(v - code_base, 4, "signed") and fits(v - code_end, 4, "signed")

        used_veneers: dict[str, int] = {}

        def plt_stub(key: str) -> int:
            v = resolve(key)
            if near(v):
                return v
            if key in self.veneers:
                used_veneers[key] = code_base + self.veneers[key]
                return used_veneers[key]
            raise RelocationError(
                f"{key} at {v:#x} is out of rel32 reach of the code at {code_base:#x}",
                advice="map the update's code within near_range() of the image",
            )

        def got_slot(key: str) -> int:
            if key.startswith(TLSGD_SLOT):
                name = key[len(TLSGD_SLOT) :]
                if name not in self.tlsgd:
                    raise RelocationError(f"no __tls_get_addr GOT pair known for {name}")
                return self.tlsgd[name]
            return code_base + self.slots[key]

        def tpoff(key: str) -> int:
            return self.tpoffs[key]

        code = bytearray(self.code_size)
        for s, off in self.code_layout:
            out = apply_relocs(
                entry_references(s, via_entry), code_base + off, resolve, got_slot, plt_stub, tpoff
            )
            code[off : off + len(out)] = out
        for key, off in self.slots.items():
            v = tpoff(key[len(TPOFF_SLOT) :]) if key.startswith(TPOFF_SLOT) else resolve(key)
            struct.pack_into("<Q", code, off, v & (2**64 - 1))
        for key, off in self.veneers.items():
            # ff 25 <disp32>: disp is from the end of the 6-byte jmp to the slot after the veneer
            code[off : off + VENEER_SIZE] = (
                b"\xff\x25" + struct.pack("<i", VENEER_SIZE - 6) + b"\xcc\xcc"
            )
            struct.pack_into("<Q", code, off + VENEER_SIZE, resolve(key))
        data = bytearray(self.data_size)
        for s, off in self.data_layout:
            out = apply_relocs(
                entry_references(s, via_entry), data_base + off, resolve, got_slot, plt_stub, tpoff
            )
            data[off : off + len(out)] = out
        return LoadImage(
            bytes(code), bytes(data), addresses, self.trampolines(addresses), used_veneers
        )

    def trampolines(self, addresses: dict[str, int]) -> list[Trampoline]:
        """The jumps to write: one per replaced function, from its matched running entry to its
        replacement's new address, with the bytes it overwrites (undo writes them back)."""
        out = []
        for s, _ in self.code_layout:
            if s.role != "replacement":
                continue
            key = s.replaces or s.key
            entry = self.match.entries[key]
            new = addresses[s.key]
            rel = new - (entry + JMP_REL32_SIZE)
            if not fits(rel, 4, "signed"):
                raise RelocationError(
                    f"replacement of {s.name} at {new:#x} is out of jmp rel32 reach of its "
                    f"entry {entry:#x}",
                    advice="map the code within near_range() of the image",
                )
            out.append(
                Trampoline(
                    s.name,
                    key,
                    entry,
                    self.read(entry, JMP_REL32_SIZE),
                    bytes([JMP_REL32]) + struct.pack("<i", rel),
                    new,
                )
            )
        return out


ENTRY_PREFIX = "entry:"
_PC_RELATIVE = ("R_X86_64_PC32", "R_X86_64_PLT32")
_ABSOLUTE = ("R_X86_64_64", "R_X86_64_32", "R_X86_64_32S")


def entry_references(sec: Section, via_entry: dict[str, int]) -> Section:
    """``sec`` with the references to a replaced function's START redirected to its original
    entry (see ``via_entry`` in LoadPlan.build); references INTO its body stay on the new
    code: a switch's jump table names case labels as section + offset, and those offsets
    are only right in the new code (found on curl's do_SOCKS5, CVE-2023-38545).

    The start is: a PC-relative field at the end of its instruction with addend -4 (a call,
    a jmp, a lea of the function), or an absolute address with addend 0 (a function pointer
    in data). Anything else is a reference into the body.
    """
    if not via_entry:
        return sec
    relocs = []
    changed = False
    for r in sec.relocs:
        start = (r.type in _PC_RELATIVE and r.addend == -4 and sec.executable) or (
            r.type in _ABSOLUTE and r.addend == 0
        )
        if start and r.symbol in via_entry:
            relocs.append(Reloc(r.offset, r.type, ENTRY_PREFIX + r.symbol, r.addend))
            changed = True
        else:
            relocs.append(r)
    return dataclasses.replace(sec, relocs=relocs) if changed else sec


def _name_of(key: str, info: SymbolInfo | None) -> str:
    if info is not None:
        return info.name
    return key.rsplit(":", 1)[-1]


def plan_load(
    target: Target,
    image: MappedImage,
    match: MatchResult,
    read: Read,
    pid: int,
    maps: list[Mapping],
) -> LoadPlan:
    """Lay out the update and resolve every existing symbol; NoMatch lists every missing one."""
    pre = {s.key: s for s in target.sections if s.role == "pre"}
    problems: list[str] = []
    for s in target.sections:
        if s.role != "replacement":
            continue
        key = s.replaces or s.key
        if key not in match.entries:
            problems.append(f"{s.name}: its pre code {key} was not matched")
            continue
        lo, hi = match.extents.get(key, (0, pre[key].size if key in pre else 0))
        size = min(pre[key].size if key in pre else hi - lo, hi - lo if hi > lo else 1 << 62)
        if size < JMP_REL32_SIZE:
            problems.append(f"{s.name} is {size} bytes long: too short for a 5-byte jmp")
    if problems:
        raise NoMatch(
            problems[0],
            details=problems,
            advice="a function shorter than 5 bytes cannot be patched in place: "
            "change its callers instead",
        )

    shipped: set[str] = set()
    for s in target.sections:
        if s.role in (*CODE_ROLES, "new_data"):
            shipped.add(s.key)
            shipped.update(s.symbols)
    resolver = ExternalResolver(pid, maps, image, read)
    values: dict[str, int] = {}
    tpoffs: dict[str, int] = {}
    tlsgd: dict[str, int] = {}
    missing: list[str] = []
    for s in target.sections:
        if s.role not in (*CODE_ROLES, "new_data"):
            continue
        for r in s.relocs:
            key = r.symbol
            info = target.symbols.get(key)
            name = _name_of(key, info)
            if r.type in ("R_X86_64_TPOFF32", "R_X86_64_TPOFF64", "R_X86_64_GOTTPOFF"):
                if key in tpoffs:
                    continue
                t = match.tpoff.get(key)
                if t is None:
                    t = executable_tpoff(image, name)
                if t is None:
                    missing.append(f"cannot find thread-local variable {key} ({r.type})")
                else:
                    tpoffs[key] = t
                continue
            if r.type == "R_X86_64_TLSGD":
                if key in match.tlsgd:
                    tlsgd[key] = match.tlsgd[key]
                else:
                    missing.append(f"cannot find the TLS GOT pair of {key} ({r.type})")
                continue
            if key in shipped or key in values:
                continue
            v = _resolve_existing(key, name, info, match, image, resolver, missing)
            if v is not None:
                values[key] = v
    if missing:
        raise NoMatch(
            missing[0],
            details=sorted(set(missing)),
            advice="the running process does not contain what the new code needs",
        )
    return LoadPlan(target, image, match, read, values, tpoffs, tlsgd)


def _resolve_existing(
    key: str,
    name: str,
    info: SymbolInfo | None,
    match: MatchResult,
    image: MappedImage,
    resolver: ExternalResolver,
    missing: list[str],
) -> int | None:
    # 2. a matched pre section: callers go through its entry (the trampoline, if stacked)
    if key in match.entries:
        return match.entries[key]
    # 3. learned from a relocation field of matched pre code
    if key in match.learned:
        return match.learned[key]
    # 4. external: the target's PLT/GOT, else the loaded libraries' dynamic symbols
    if info is not None and not info.defined:
        try:
            return resolver.resolve(name)
        except NoMatch as e:
            missing.append(e.reason)
            return None
    # 5. a global defined in the target: its symbol table
    if info is None or info.binding != "local":
        v = global_in_image(image, name)
        if v is not None:
            return v
    # 6. refuse
    missing.append(f"cannot find symbol {key}")
    return None
