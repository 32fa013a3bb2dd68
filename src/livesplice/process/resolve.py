"""External symbols of a running process: PLT/GOT of the image, then the loaded libraries.

Used for symbols the update's new code references that matching could not learn (step 4 and
5 of the resolution order in docs/ARCHITECTURE.md, Contract 2). The lookup follows ld.so's
global scope: the executable first, then the libraries in load order (so a copy relocation
in the executable wins over the library's original, as it does for the program itself), and
only a symbol's default version (``name@@VER``; hidden ``name@VER`` entries are skipped).

IFUNC symbols (``STT_GNU_IFUNC``: memcpy, strlen, ... in glibc) have the address of a
*resolver* as their value; calling it would return a pointer instead of copying. The resolved
implementation is read from a GOT slot that ld.so already filled: the image's own slot for
the symbol, any loaded object's slot for it, or the libc's own ``R_X86_64_IRELATIVE`` slot
whose addend is that resolver (glibc calls its own IFUNCs through such slots).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable

from livesplice.errors import NoMatch
from livesplice.process.image import (
    STB_LOCAL,
    STT_GNU_IFUNC,
    STT_TLS,
    ElfSymbol,
    MappedImage,
    images_by_path,
)
from livesplice.process.procmaps import Mapping

Read = Callable[[int, int], bytes]


class ExternalResolver:
    """Addresses of symbols in process ``pid`` as the dynamic linker would bind them."""

    def __init__(self, pid: int, maps: list[Mapping], image: MappedImage, read: Read) -> None:
        self.pid = pid
        self.maps = maps
        self.image = image
        self.read = read
        self._scope: list[MappedImage] | None = None

    def _u64(self, addr: int) -> int | None:
        try:
            data = self.read(addr, 8)
        except OSError:
            return None
        return struct.unpack("<Q", data)[0] if len(data) == 8 else None

    def scope(self) -> list[MappedImage]:
        """Loaded ELF objects, the executable first, then in mapping order."""
        if self._scope is None:
            exe = ""
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{self.pid}/exe").removesuffix(" (deleted)")
            objs: list[MappedImage] = []
            for path, ms in images_by_path(self.pid, self.maps).items():
                if path.removesuffix(" (deleted)") == self.image.path:
                    objs.append(self.image)
                    continue
                try:
                    objs.append(MappedImage(self.pid, path, ms))
                except Exception:  # not an ELF file (a font, a locale archive): not in scope
                    continue
            objs.sort(key=lambda o: (o.path != exe, o.mappings[0].start))
            self._scope = objs
        return self._scope

    def resolved_slot(self, obj: MappedImage, name: str) -> int | None:
        """The value of ``obj``'s GOT slot for ``name``, if ld.so has bound it already."""
        slot = obj.got_slot(name)
        if slot is None:
            return None
        v = self._u64(slot)
        # an unbound lazy JUMP_SLOT still points back into the object's own .plt
        if not v or obj.in_plt(v):
            return None
        return v

    def resolve(self, name: str) -> int:
        """Running address of function or object ``name``; raises NoMatch if none."""
        v = self.resolved_slot(self.image, name)
        if v is not None:
            return v
        plt = self.image.plt_entry(name)
        if plt is not None:
            return plt  # ld.so binds it (IFUNC included) on the first call
        for obj in self.scope():
            sym = default_definition(obj, name)
            if sym is None:
                continue
            if sym.type == STT_GNU_IFUNC:
                return self.resolve_ifunc(obj, sym)
            return sym.value + obj.bias
        raise NoMatch(
            f"cannot find symbol {name} in process {self.pid}",
            details=[f"searched: {', '.join(o.path for o in self.scope())}"],
            advice="the new code needs a library the running program has not loaded",
        )

    def resolve_ifunc(self, obj: MappedImage, sym: ElfSymbol) -> int:
        """The implementation an IFUNC symbol resolved to in the running process, read from a
        slot the dynamic linker already filled (a GOT slot of some image, or the image's
        IRELATIVE slot): the resolver itself is never called."""
        for other in self.scope():
            v = self.resolved_slot(other, sym.name)
            if v is not None and v != sym.value + obj.bias:
                return v
        for slot, addend in obj.facts.irelative:
            if addend == sym.value:
                v = self._u64(slot + obj.bias)
                if v and v != sym.value + obj.bias:
                    return v
        raise NoMatch(
            f"cannot resolve IFUNC {sym.name} in process {self.pid}: no bound GOT slot",
            details=[f"{sym.name} is an IFUNC of {obj.path}; its value is the resolver"],
            advice="call the function once in the running program (or reference it from "
            "existing code) before applying",
        )


def default_definition(obj: MappedImage, name: str) -> ElfSymbol | None:
    """The dynamic definition of ``name`` that ld.so would bind to (default version)."""
    for sym in obj.elf_symbols(name):
        if (
            sym.dynamic
            and sym.defined
            and sym.default_version
            and sym.bind != STB_LOCAL
            and sym.type != STT_TLS
        ):
            return sym
    return None


def global_in_image(image: MappedImage, name: str) -> int | None:
    """A global (non-TLS) symbol defined in ``image`` (.symtab or .dynsym), or None."""
    addrs = {
        s.value + image.bias
        for s in image.elf_symbols(name)
        if s.defined and s.bind != STB_LOCAL and s.type != STT_TLS
    }
    return addrs.pop() if len(addrs) == 1 else None


def executable_tpoff(image: MappedImage, name: str) -> int | None:
    """Offset from the thread pointer of TLS variable ``name`` of the executable.

    x86-64 uses TLS variant II (Drepper, "ELF Handling For Thread-Local Storage", 3.4.6): the
    executable's block ends at the thread pointer, so the variable lives at
    TP - round_up(p_memsz, p_align) + st_value.
    """
    if image.facts.tls is None or not image.is_executable_file:
        return None
    _vaddr, memsz, align = image.facts.tls
    align = max(align, 1)
    block = (memsz + align - 1) // align * align
    values = {s.value for s in image.elf_symbols(name) if s.type == STT_TLS and s.defined}
    return values.pop() - block if len(values) == 1 else None
