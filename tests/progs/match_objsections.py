"""Test helper: build update sections from real object files, and run real child processes.

Until the diff engine produces them, tests make ``format.Section`` objects straight from an
object compiled with ``-ffunction-sections -fdata-sections`` (symbol keys as format.py's
docstring says: globals by name, locals and section symbols as ``unit:name``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from livesplice.update.format import Reloc, Section, SymbolInfo, Target

TargetKind = Literal["executable", "shared_library", "kernel", "kernel_module"]

PROGS = Path(__file__).resolve().parent
SPLIT = ["-ffunction-sections", "-fdata-sections"]

_KIND = {
    "STT_FUNC": "func",
    "STT_OBJECT": "object",
    "STT_TLS": "tls",
    "STT_SECTION": "section",
    "STT_NOTYPE": "notype",
    "STT_GNU_IFUNC": "func",
}
_BIND = {"STB_LOCAL": "local", "STB_GLOBAL": "global", "STB_WEAK": "weak"}


def gcc(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run(["gcc", *map(str, args)], check=True, cwd=cwd)


@dataclass
class ObjectFile:
    """The allocatable sections of one relocatable object, as update sections."""

    unit: str
    sections: dict[str, Section] = field(default_factory=dict)  # key -> Section
    symbols: dict[str, SymbolInfo] = field(default_factory=dict)

    def function(self, name: str) -> Section:
        for s in self.sections.values():
            if s.executable and s.name == name:
                return s
        raise KeyError(name)

    def by_section(self, secname: str) -> Section:
        return self.sections[f"{self.unit}:{secname}"]


def read_object(path: Path, unit: str) -> ObjectFile:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import Symbol, SymbolTableSection

    out = ObjectFile(unit)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        syms = list(symtab.iter_symbols())

        def key_of(s: Symbol) -> str:
            if s["st_info"]["type"] == "STT_SECTION":
                return f"{unit}:{elf.get_section(s['st_shndx']).name}"
            if s["st_info"]["bind"] == "STB_LOCAL":
                return f"{unit}:{s.name}"
            return str(s.name)

        for sym in syms:
            t = sym["st_info"]["type"]
            if t == "STT_FILE" or (not sym.name and t != "STT_SECTION"):
                continue
            if t == "STT_SECTION" and sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS"):
                continue
            key = key_of(sym)
            out.symbols[key] = SymbolInfo(
                key=key,
                name=sym.name or elf.get_section(sym["st_shndx"]).name,
                binding=_BIND.get(sym["st_info"]["bind"], "global"),  # type: ignore[arg-type]
                kind=_KIND.get(t, "notype"),
                defined=sym["st_shndx"] != "SHN_UNDEF",
                unit=unit,
            )
        relocs: dict[str, list[Reloc]] = {}
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection) and sec.name.startswith(".rela"):
                target = sec.name[len(".rela") :]
                relocs[target] = [
                    Reloc(
                        r["r_offset"],
                        _rtype(r["r_info_type"]),
                        key_of(syms[r["r_info_sym"]]),
                        r["r_addend"],
                    )
                    for r in sec.iter_relocations()
                ]
        for idx, sec in enumerate(elf.iter_sections()):
            flags = sec["sh_flags"]
            if (
                not flags & 0x2
                or sec["sh_type"] in ("SHT_GROUP", "SHT_NOTE")
                or sec.name.startswith(".eh_frame")
                or sec["sh_type"] == "SHT_X86_64_UNWIND"
            ):
                continue
            defined = {
                key_of(s): s["st_value"]
                for s in syms
                if s["st_shndx"] == idx
                and s["st_info"]["type"] not in ("STT_FILE", "STT_SECTION")
                and s.name
            }
            name = next(
                (
                    s.name
                    for s in syms
                    if s["st_shndx"] == idx
                    and s["st_value"] == 0
                    and s["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_TLS")
                ),
                sec.name,
            )
            key = f"{unit}:{sec.name}"
            out.sections[key] = Section(
                key=key,
                role="pre",
                name=name,
                unit=unit,
                align=sec["sh_addralign"],
                size=sec["sh_size"],
                data="" if sec["sh_type"] == "SHT_NOBITS" else sec.data().hex(),
                relocs=relocs.get(sec.name, []),
                readonly=not flags & 0x1,
                executable=bool(flags & 0x4),
                symbols=defined,
            )
    return out


_RTYPES: dict[int, str] = {}


def _rtype(n: int) -> str:
    if not _RTYPES:
        from elftools.elf.enums import ENUM_RELOC_TYPE_x64

        _RTYPES.update({v: k for k, v in ENUM_RELOC_TYPE_x64.items() if isinstance(v, int)})
        # newer than pyelftools' table (psABI: 41, 42)
        _RTYPES.update({41: "R_X86_64_GOTPCRELX", 42: "R_X86_64_REX_GOTPCRELX"})
    return _RTYPES[n]


def pre_target(
    name: str, objs: Iterable[ObjectFile], functions: Iterable[str], kind: TargetKind = "executable"
) -> Target:
    """A target whose only sections are the pre code of ``functions`` ("unit:name" picks a
    static function of one unit)."""
    objs = list(objs)
    sections: list[Section] = []
    symbols: dict[str, SymbolInfo] = {}
    for fn in functions:
        unit, _, bare = fn.rpartition(":")
        for o in objs:
            if unit and o.unit != unit:
                continue
            try:
                sections.append(o.function(bare))
                break
            except KeyError:
                continue
        else:
            raise KeyError(fn)
    for o in objs:
        symbols.update(o.symbols)
    return Target(
        name=name,
        kind=kind,
        build_id="",
        changed_functions=[],
        new_functions=[],
        new_data=[],
        sections=sections,
        symbols=symbols,
    )


def update_target(
    name: str,
    pre: ObjectFile,
    post: ObjectFile,
    changed: list[str],
    new: Iterable[str] = (),
    kind: TargetKind = "executable",
) -> Target:
    """A simple diff stand-in: pre + replacement for ``changed``, new functions, and the post
    object's read-only data and new writable data that the shipped code references."""
    sections: list[Section] = []
    for fn in changed:
        p = pre.function(fn)
        sections.append(p)
        q = post.function(fn)
        sections.append(Section(**{**q.__dict__, "role": "replacement", "replaces": p.key}))
    for fn in new:
        q = post.function(fn)
        sections.append(Section(**{**q.__dict__, "role": "new_function"}))
    shipped = {s.key for s in sections if s.role != "pre"}
    todo = [s for s in sections if s.role != "pre"]
    while todo:
        s = todo.pop()
        for r in s.relocs:
            d = post.sections.get(r.symbol) or next(
                (x for x in post.sections.values() if r.symbol in x.symbols), None
            )
            if d is None or d.key in shipped or d.executable:
                continue
            if d.readonly:
                role = "copied_rodata"
            elif d.key not in pre.sections:
                role = "new_data"
            else:
                continue  # existing data: learned from pre code
            sec = Section(**{**d.__dict__, "role": role})
            sections.append(sec)
            shipped.add(d.key)
            todo.append(sec)
    symbols = {**pre.symbols, **post.symbols}
    return Target(
        name=name,
        kind=kind,
        build_id="",
        changed_functions=list(changed),
        new_functions=list(new),
        new_data=[],
        sections=sections,
        symbols=symbols,
    )


class Child:
    """A test program reading commands on stdin and answering one line each."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid
        self.hello = self.ask("hello")

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(n)

    def write(self, addr: int, data: bytes) -> None:
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as f:
            f.seek(addr)
            f.write(data)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    # compile flags, link flags
    "pie": (["-fPIE"], ["-pie"]),
    "nopie": (["-fno-pie"], ["-no-pie"]),
    # -fPIC -fno-plt objects in an executable: ld relaxes GOTPCRELX (psABI B.2)
    "pic_pie": (["-fPIC", "-fno-plt"], ["-pie"]),
    "pic_nopie": (["-fPIC", "-fno-plt"], ["-no-pie"]),
}


def build_program(
    outdir: Path,
    variant: str,
    sources: list[str],
    cflags: list[str] | None = None,
    pre_sources: dict[str, Path] | None = None,
) -> tuple[Path, dict[str, ObjectFile]]:
    """Link the running program as a normal build would (no -ffunction-sections), and compile
    each unit again as livesplice's pre build does. ``pre_sources`` swaps a unit's source in
    the pre build (a "wrong source" update)."""
    cf, lf = VARIANTS[variant]
    outdir.mkdir(parents=True, exist_ok=True)
    flags = ["-O2", "-g", *cf, *(cflags or [])]
    srcs = [PROGS / s for s in sources]
    exe = outdir / "prog"
    gcc(*flags, *lf, "-o", exe, *srcs)
    objs: dict[str, ObjectFile] = {}
    for s in srcs:
        src = (pre_sources or {}).get(s.name, s)
        o = outdir / (s.stem + ".o")
        gcc(*flags, *SPLIT, "-c", src, "-o", o)
        objs[s.name] = read_object(o, s.name)
    return exe, objs


def build_post(
    outdir: Path, variant: str, source: Path, unit: str, cflags: list[str] | None = None
) -> ObjectFile:
    cf, _ = VARIANTS[variant]
    o = outdir / (Path(unit).stem + ".post.o")
    gcc("-O2", "-g", *cf, *(cflags or []), *SPLIT, "-c", source, "-o", o)
    return read_object(o, unit)
