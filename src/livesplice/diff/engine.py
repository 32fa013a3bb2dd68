"""The diff stage of ``livesplice create``: BuildPair -> DiffResult (Contract 2).

:func:`diff_build` reads like a table of contents; :func:`diff_objects` does one unit::

    load_object(pre), load_object(post)      one ElfObject per side   (elfmodel)
    correlate(pre, post)                     twins                     (correlate)
    classify_sections                        SAME/CHANGED/NEW/REMOVED  (compare)
    tie_cold_parts, ship_clone_callers       the calling-convention rules
    find_hooks                               .livesplice.hook.<kind> tables
    check_patchability                       collect refusals (data, TLS, ctors, layouts)
    select_sections                          what ships, with which role; every key resolvable

Refusals are collected for every unit, and :func:`diff_build` raises ``PatchRefused`` once
with all of them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from livesplice.build.records import BuildPair, LinkRecord
from livesplice.diff.compare import LineMap, MeaningContext, Verdict, compare_sections
from livesplice.diff.correlate import correlate
from livesplice.diff.elfmodel import (
    HOOK_SECTION_PREFIX,
    ElfObject,
    ObjReloc,
    ObjSection,
    ObjSymbol,
    Status,
    is_calling_convention_clone,
    load_object,
    strip_clone_numbers,
)
from livesplice.diff.layout import LayoutChange
from livesplice.errors import PatchRefused
from livesplice.update.format import HOOK_KINDS, Hook, Reloc, Section, SymbolInfo, Target

# Allocated sections that are not code or data of the program's logic; never compared.
# .eh_frame/.gcc_except_table: unwind tables (see check for C++ landing pads below);
# __patchable_function_entries/__mcount_loc: tracing tables (gcc -fpatchable-function-entry,
# -pg -mrecord-mcount); .note.*: ELF notes.
IGNORED_SECTION_PREFIXES = (
    ".eh_frame",
    ".note",
    ".gcc_except_table",
    "__patchable_function_entries",
    "__mcount_loc",
    ".stack_sizes",
    ".comment",
)

_BINDING: dict[str, Literal["local", "global", "weak"]] = {
    "local": "local",
    "global": "global",
    "weak": "weak",
}
_ROLE_ORDER = {
    "pre": 0,
    "replacement": 1,
    "new_function": 2,
    "hook": 3,
    "new_data": 4,
    "copied_rodata": 5,
}


@dataclass
class DiffResult:
    """What the diff stage hands the package stage: one Target per changed output, the hooks and
    the warnings (refusals were raised instead)."""

    targets: list[Target]
    hooks: list[Hook]
    warnings: list[str]


@dataclass
class UnitHook:
    """A LIVESPLICE_* hook the unit declares: its kind, its function and that function's section
    key."""

    kind: str
    function: str
    key: str


@dataclass
class UnitDiff:
    """The diff of one compiled unit (pre object vs post object)."""

    unit: str
    functions: dict[str, Status] = field(default_factory=dict)  # pre name (post if new)
    data: dict[str, Status] = field(default_factory=dict)
    changed_functions: list[str] = field(default_factory=list)
    new_functions: list[str] = field(default_factory=list)
    new_data: list[str] = field(default_factory=list)
    line_only: list[str] = field(default_factory=list)  # treated as unchanged
    sections: list[Section] = field(default_factory=list)
    symbols: dict[str, SymbolInfo] = field(default_factory=dict)
    hooks: list[UnitHook] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    # the layout refusals of ``refusals`` as data, to be said once per type over all units
    layout_changes: list[LayoutChange] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the unit contributes anything to the update."""
        return bool(self.changed_functions or self.new_functions or self.new_data or self.hooks)

    def section(self, key: str) -> Section | None:
        """The unit's section with ``key`` (None: not shipped)."""
        for s in self.sections:
            if s.key == key:
                return s
        return None

    def role_of(self, name: str) -> list[str]:
        """Roles of the shipped sections named ``name`` (for tests and ``inspect``)."""
        return sorted(s.role for s in self.sections if s.name == name)


# ---------------------------------------------------------------------------------------
# diff_build: the whole tree
# ---------------------------------------------------------------------------------------


def diff_build(pair: BuildPair, *, on_unit: Callable[[int, int], None] | None = None) -> DiffResult:
    """Diff every recompiled unit of ``pair`` and group the result by link output.

    ``on_unit(done, total)`` is told as units finish (create's progress display)."""
    refusals: list[str] = []
    warnings: list[str] = []
    refuse_changed_asm(pair, refusals)
    line_map = LineMap.from_patch(pair.patch_text)
    unit_diffs: list[tuple[list[str], UnitDiff]] = []
    units = [
        u
        for u in sorted(pair.units, key=lambda u: u.source)
        if u.post is not None and u.pre.language != "asm"
    ]
    new_units = [r for r in sorted(pair.new_units, key=lambda r: r.source) if r.language != "asm"]
    diffs = diff_many(
        [DiffJob(u.pre.object, u.post.object, u.source) for u in units if u.post is not None]
        + [DiffJob(None, r.object, r.source) for r in new_units],
        line_map=line_map,
        on_done=on_unit,
    )
    for unit, ud in zip(units, diffs, strict=False):
        refusals.extend(ud.refusals)
        warnings.extend(ud.warnings)
        unit_diffs.append((list(unit.targets), ud))
    for rec, ud in zip(new_units, diffs[len(units) :], strict=True):
        refusals.extend(ud.refusals)
        new_targets = targets_of_new_unit(ud, unit_diffs)
        if not new_targets:
            warnings.append(
                f"{rec.source}: new unit not referenced by any changed code; not shipped"
            )
            continue
        warnings.extend(ud.warnings)
        unit_diffs.append((new_targets, ud))
    for removed in sorted(pair.removed_units):
        warnings.append(f"{removed}: unit removed by the patch; its running code stays as is")
    refusals = refusals_once_per_type(refusals, diffs)
    if refusals:
        raise PatchRefused(
            f"the patch has {len(refusals)} change(s) that cannot be applied live",
            details=refusals,
            advice="see each item; rewrite the patch (shadow variables, hooks: see "
            "include/livesplice.h) or apply it with a restart",
        )
    targets = assign_targets(pair, unit_diffs)
    for t in targets:
        warnings.extend(ship_internal_references(pair, t))
        refusals.extend(unresolvable_keys(t))
    if refusals:
        raise PatchRefused(
            "the update would reference symbols apply cannot find",
            details=refusals,
            advice="this is a livesplice limitation; please report it with the patch",
        )
    hooks = sorted(
        (
            Hook(kind=h.kind, function=h.function, target=t.name, key=h.key)
            for t in targets
            for _, ud in unit_diffs
            if ud.unit in t.units
            for h in ud.hooks
        ),
        key=lambda h: (h.target, HOOK_KINDS.index(h.kind), h.key),
    )
    return DiffResult(targets=targets, hooks=hooks, warnings=sorted(set(warnings)))


def refuse_changed_asm(pair: BuildPair, refusals: list[str]) -> None:
    """A changed assembly source is refused: livesplice correlates what the compiler made from
    C (function sections, debug info), not hand-written assembly."""
    for path in sorted(pair.changed_asm):
        refusals.append(
            f"{path}: assembly source changed [rule: changed assembly sources]: livesplice "
            "correlates compiler output only; move the change into C code"
        )


LAYOUT_ADVICE = (
    "objects in the running program keep the old layout; add a shadow variable for the new "
    "field (see livesplice.h) instead of changing the type"
)


def unit_layout_refusal(unit: str, change: LayoutChange) -> str:
    """The layout refusal of one unit, as :func:`diff_objects` reports it."""
    return (
        f"{unit}: {change.type_key}: memory layout changed [rule: changed struct "
        f"layouts] ({change.what}); used by {_some(change.users, 6)}: {LAYOUT_ADVICE}"
    )


def refusals_once_per_type(refusals: list[str], diffs: Iterable[UnitDiff]) -> list[str]:
    """``refusals`` with the units' layout items replaced by one item per changed type.

    A grown struct in a header is seen by every unit that includes it (nghttp2: 5 items for
    2 structs; libwebp: 10 for 2 types), each with the whole layout inline; the author needs
    it once: what changed, in which units, used by which functions and data.
    """
    diffs = list(diffs)
    per_unit = {unit_layout_refusal(ud.unit, c) for ud in diffs for c in ud.layout_changes}
    if not per_unit:
        return refusals
    return [r for r in refusals if r not in per_unit] + layout_refusals(diffs)


def layout_refusals(diffs: Iterable[UnitDiff]) -> list[str]:
    """One refusal per changed type (and per distinct change of it) over all ``diffs``."""
    groups: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for ud in diffs:
        for c in ud.layout_changes:
            units, users = groups.setdefault((c.type_key, c.what), (set(), set()))
            units.add(ud.unit)
            users.update(c.users)
    out = []
    for (type_key, what), (units, users) in sorted(groups.items()):
        functions = sorted(u.removeprefix("function ") for u in users if u.startswith("function "))
        data = sorted(u.removeprefix("data ") for u in users if u.startswith("data "))
        used = [
            f"{label} {_some(names, 8)}"
            for label, names in (("functions", functions), ("data", data))
            if names
        ]
        out.append(
            f"{type_key}: memory layout changed [rule: changed struct layouts]: {what}; "
            f"used in {len(units)} unit(s) ({_some(sorted(units), 10)})"
            + (f" by {' and '.join(used)}" if used else "")
            + f": {LAYOUT_ADVICE}"
        )
    return out


def _some(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` names, and how many more there are."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def targets_of_new_unit(new: UnitDiff, unit_diffs: list[tuple[list[str], UnitDiff]]) -> list[str]:
    """A unit the patch adds goes where changed code calls into it.

    The build records the pre links only, so a new object's link outputs are not known; its
    globals are: every target whose changed code references one of them (an undefined
    symbol in that unit's post object) gets the new unit too.
    """
    provided = {k for s in new.sections for k in s.symbols if ":" not in k}
    targets: set[str] = set()
    for names, ud in unit_diffs:
        if any(not info.defined and k in provided for k, info in ud.symbols.items()):
            targets.update(names)
    return sorted(targets)


def assign_targets(pair: BuildPair, unit_diffs: list[tuple[list[str], UnitDiff]]) -> list[Target]:
    """A unit's changes belong to every link output its object went into."""
    links = {link.name: link for link in pair.links}
    by_target: dict[str, list[UnitDiff]] = {}
    for names, ud in unit_diffs:
        if not ud.changed:
            continue
        for name in names:
            by_target.setdefault(name, []).append(ud)
    targets: list[Target] = []
    for name in sorted(by_target):
        uds = by_target[name]
        link = links.get(name)
        sections, symbols = merge_units(uds)
        defined_elsewhere = _globals_defined_in_target(pair, name)
        for ud in uds:  # globals the update itself defines (new units, new functions)
            for s in ud.sections:
                if s.role != "pre":
                    for k in s.symbols:
                        defined_elsewhere.setdefault(k, ud.unit)
        for k, info in symbols.items():
            if not info.defined and k in defined_elsewhere:
                symbols[k] = SymbolInfo(
                    key=info.key,
                    name=info.name,
                    binding=info.binding,
                    kind=info.kind,
                    defined=True,
                    unit=defined_elsewhere[k],
                )
        targets.append(
            Target(
                name=name,
                kind=_link_kind(link),
                build_id=_build_id(link.output) if link is not None else "",
                changed_functions=sorted({f for ud in uds for f in ud.changed_functions}),
                new_functions=sorted({f for ud in uds for f in ud.new_functions}),
                new_data=sorted({d for ud in uds for d in ud.new_data}),
                sections=sorted(sections.values(), key=lambda s: (_ROLE_ORDER[s.role], s.key)),
                symbols=dict(sorted(symbols.items())),
                units=sorted(ud.unit for ud in uds),
            )
        )
    return targets


@dataclass
class _Reach:
    """Which symbol keys of a target apply finds without its symbol table."""

    shipped: set[str] = field(default_factory=set)  # code or data the update loads (rule 1)
    matched: set[str] = field(default_factory=set)  # a pre section or its symbols (rule 2)
    learned: set[str] = field(default_factory=set)  # a relocation field of pre code (rule 3)

    @classmethod
    def of(cls, target: Target) -> _Reach:
        r = cls()
        for s in target.sections:
            names = {s.key, *s.symbols}
            if s.role == "pre":
                r.matched.update(names)
                r.learned.update(x.symbol for x in s.relocs)
            else:
                r.shipped.update(names)
        return r

    def __contains__(self, key: object) -> bool:
        return key in self.shipped or key in self.matched or key in self.learned


def ship_internal_references(pair: BuildPair, target: Target) -> list[str]:
    """Ship the pre code that locates every internal symbol the new code references.

    New code may call a function of another unit, or read a global, that no pre function of
    the update references: ``Curl_auth_allowed_to_host`` in a libcurl fix. Rule 5 (the
    target's symbol table) cannot find it in a stripped image, nor -- even unstripped -- a
    hidden-visibility global, which the linker turns into a local symbol. As Ksplice did, the
    update carries the pre code of such a function (from the pre object of the unit that
    defines it), and for data the smallest pre function that references it; apply finds that
    code by run-pre matching like a replaced function (the symbol table only proposes
    candidates) and learns the address from it. Symbols the linked target exports in its
    dynamic symbol table keep rule 5: stripping does not remove them.

    Returns warnings for the symbols only a symbol table can locate (no code reveals them).
    """
    reach = _Reach.of(target)
    wanted: dict[str, SymbolInfo] = {}
    for s in target.sections:
        if s.role == "pre":
            continue
        for r in s.relocs:
            info = target.symbols.get(r.symbol)
            if r.symbol in reach or info is None or not info.defined or info.unit is None:
                continue
            if info.binding != "local" and info.kind != "tls":
                wanted[r.symbol] = info
    link = next((lk for lk in pair.links if lk.name == target.name), None)
    if link is not None:
        exported = _dynamic_exports(link.output)
        wanted = {k: v for k, v in wanted.items() if k not in exported}
    if not wanted:
        return []
    objects = _PreObjects(pair, target.name)
    present = {(x.key, x.role) for x in target.sections}
    added: list[Section] = []
    warnings: list[str] = []
    # functions first: a helper's own code often reveals the data it uses
    for key, info in sorted(wanted.items(), key=lambda kv: (kv[1].kind != "func", kv[0])):
        if key in reach:
            continue
        found = objects.defining_code(key, info.unit or "")
        if found is None:
            found = objects.smallest_user(key, info.unit or "")
        if found is None:
            warnings.append(
                f"{target.name}: {key} is located by the symbol table only (no pre code "
                "reveals it): the update cannot be applied to a stripped build"
            )
            continue
        unit, obj, sec = found
        for shipped in _ship_pre(obj, sec, unit, target.symbols):
            if (shipped.key, "pre") not in present:
                present.add((shipped.key, "pre"))
                target.sections.append(shipped)
                added.append(shipped)
                reach.matched.update({shipped.key, *shipped.symbols})
                reach.learned.update(x.symbol for x in shipped.relocs)
    if added:
        target.sections.sort(key=lambda s: (_ROLE_ORDER[s.role], s.key))
    return warnings


class _PreObjects:
    """The pre objects of a target's units, loaded once each."""

    def __init__(self, pair: BuildPair, target: str) -> None:
        self.paths = {
            u.source: u.pre.object
            for u in pair.units
            if target in u.targets and u.pre.language != "asm"
        }
        self._loaded: dict[str, ElfObject] = {}
        self._definitions = _global_definitions(pair, target)

    def load(self, unit: str) -> ElfObject | None:
        if unit not in self._loaded:
            path = self.paths.get(unit)
            if path is None:
                return None
            self._loaded[unit] = load_object(path, unit)
        return self._loaded[unit]

    def defining_code(self, name: str, unit: str) -> tuple[str, ElfObject, ObjSection] | None:
        """The code section of ``unit``'s pre object that defines function ``name`` -- only
        when that is the one strong definition in the target. A weak definition may have
        been overridden at link time (its code is still in the file: matching would find
        the dead copy), and with several definitions which one the linker kept is not known
        here; a caller's relocation tells (:meth:`smallest_user`)."""
        definitions = self._definitions.get(name, [])
        if len(definitions) != 1 or definitions[0] != (unit, "global"):
            return None
        obj = self.load(unit)
        sym = obj.symbol(name) if obj is not None else None
        if obj is None or sym is None or sym.section is None or not sym.section.is_code:
            return None
        return unit, obj, sym.section

    def smallest_user(self, name: str, unit: str) -> tuple[str, ElfObject, ObjSection] | None:
        """The smallest pre function (its own unit's first) with a relocation to ``name``."""
        for u in [unit, *sorted(self.paths)]:
            obj = self.load(u)
            if obj is None:
                continue
            users = [
                s
                for s in obj.sections
                if s.is_code
                and s.primary is not None
                and any(r.symbol.name == name and r.symbol.bind != "local" for r in s.relocs)
            ]
            if users:
                return u, obj, min(users, key=lambda s: (s.size, s.name))
        return None


def _ship_pre(
    obj: ElfObject, sec: ObjSection, unit: str, symbols: dict[str, SymbolInfo]
) -> list[Section]:
    """``sec`` of ``obj`` as a ``pre`` section, its relocations keyed as the diff keys them
    (what they reveal is learned at apply; the keys they name are noted in ``symbols``)."""
    ud = UnitDiff(unit=unit)
    ctx = _UnitContext(obj, ElfObject(obj.path, unit, obj.machine, [], []), ud, None)
    ctx.ship(sec, "pre")
    while ctx.queue:
        s, role = ctx.queue.pop(0)
        ctx.resolve_relocs(s, role)
    for k, info in ud.symbols.items():
        symbols.setdefault(k, info)
    return ud.sections


def _dynamic_exports(path: Path) -> set[str]:
    """Names the linked file defines in ``.dynsym`` (kept by strip, bound by ld.so)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            dynsym = ELFFile(f).get_section_by_name(".dynsym")
            if not isinstance(dynsym, SymbolTableSection):
                return set()
            return {
                s.name for s in dynsym.iter_symbols() if s["st_shndx"] != "SHN_UNDEF" and s.name
            }
    except OSError:
        return set()


def merge_units(
    uds: Sequence[UnitDiff],
) -> tuple[dict[tuple[str, str], Section], dict[str, SymbolInfo]]:
    """The sections and symbol facts of several units' diffs, for one target (user space and
    kernel alike). A section is identified by (key, role): a replacement has the key of the
    pre section it replaces, and both ship. A symbol one unit defines and another only
    references keeps the defining unit's facts, whatever order the units come in."""
    sections: dict[tuple[str, str], Section] = {}
    symbols: dict[str, SymbolInfo] = {}
    for ud in uds:
        for s in ud.sections:
            sections.setdefault((s.key, s.role), s)
        for k, info in ud.symbols.items():
            if k not in symbols or (info.defined and not symbols[k].defined):
                symbols[k] = info
    return sections, symbols


def unresolvable_keys(target: Target) -> list[str]:
    """Check Contract 2's resolution order for every relocation of shipped post code."""
    reach = _Reach.of(target)
    shipped, matched, learned = reach.shipped, reach.matched, reach.learned
    problems: list[str] = []
    for s in target.sections:
        if s.role == "pre":
            continue
        for r in s.relocs:
            key = r.symbol
            if key in shipped or key in matched or key in learned:
                continue
            info = target.symbols.get(key)
            if info is not None and (not info.defined or info.binding != "local"):
                continue  # rule 4 (external) or rule 5 (a global of the target)
            problems.append(
                f"{target.name}: {s.name} references {key}, which no rule can resolve "
                "[rule: every key resolvable]"
            )
    return sorted(set(problems))


def _globals_defined_in_target(pair: BuildPair, target: str) -> dict[str, str]:
    """Global symbol name -> unit (the first in source order), over the pre objects of every
    unit linked into target."""
    return {name: defs[0][0] for name, defs in _global_definitions(pair, target).items()}


def _global_definitions(pair: BuildPair, target: str) -> dict[str, list[tuple[str, str]]]:
    """Every non-local definition in the pre objects of ``target``'s units: name ->
    [(unit, "global" | "weak")] in source order; a COMMON symbol counts as weak (the linker
    merges it). Read once per set of objects (the caller must not change the result)."""
    units = tuple(
        sorted(
            (u.source, str(u.pre.object), _identity(u.pre.object))
            for u in pair.units
            if target in u.targets
        )
    )
    return _definitions_in(units)


def _identity(path: Path) -> tuple[int, int, int]:
    """What tells a file apart from another one at the same path (a cache key)."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _definitions_in(
    units: tuple[tuple[str, str, tuple[int, int, int]], ...],
) -> dict[str, list[tuple[str, str]]]:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    out: dict[str, list[tuple[str, str]]] = {}
    for source, obj, _identity_key in units:
        try:
            with open(obj, "rb") as f:
                symtab = ELFFile(f).get_section_by_name(".symtab")
                if not isinstance(symtab, SymbolTableSection):
                    continue
                for sym in symtab.iter_symbols():
                    bind, shndx = sym["st_info"]["bind"], sym["st_shndx"]
                    if bind in ("STB_GLOBAL", "STB_WEAK") and shndx != "SHN_UNDEF":
                        weak = bind == "STB_WEAK" or shndx == "SHN_COMMON"
                        out.setdefault(sym.name, []).append((source, "weak" if weak else "global"))
        except OSError:
            continue
    return out


def _link_kind(link: LinkRecord | None) -> Literal["executable", "shared_library"]:
    """From the ELF header: ET_EXEC, or ET_DYN with an interpreter (PIE), is an executable."""
    if link is None:
        return "executable"
    from elftools.elf.elffile import ELFFile

    try:
        with open(link.output, "rb") as f:
            elf = ELFFile(f)
            if elf["e_type"] == "ET_EXEC":
                return "executable"
            if any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()):
                return "executable"
            return "shared_library"
    except OSError:
        return link.kind


def _build_id(path: Path) -> str:
    """GNU build-id (NT_GNU_BUILD_ID in .note.gnu.build-id) as hex, "" if none."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import NoteSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if not isinstance(sec, NoteSection):
                    continue
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    except OSError:
        return ""
    return ""


# ---------------------------------------------------------------------------------------
# diff_objects: one unit
# ---------------------------------------------------------------------------------------


class DiffJob(NamedTuple):
    """One unit for :func:`diff_many`: the arguments of :func:`diff_objects`."""

    pre: Path | None
    post: Path
    unit: str
    ignore_sections: tuple[str, ...] = ()


def diff_many(
    jobs: Sequence[DiffJob | tuple[Path | None, Path, str]],
    *,
    line_map: LineMap | None = None,
    workers: int | None = None,
    on_done: Callable[[int, int], None] | None = None,
) -> list[UnitDiff]:
    """:func:`diff_objects` of every job, in order, on all cores.

    A header change recompiles tens of units and each diff is pure Python on its own pair of
    files, sharing nothing: worker processes (not threads: the GIL) turn a 40-unit diff into
    cores-times less wall time. The results are plain data and come back pickled; an
    exception in a worker is re-raised here, as the serial loop would. ``workers`` defaults
    to the cores this process may run on; one job or one core runs in this process.
    ``on_done(done, total)`` is called in this process as results arrive (in job order).
    """
    norm = [DiffJob(*job) for job in jobs]
    if workers is None:
        workers = len(os.sched_getaffinity(0))
    workers = max(1, min(workers, len(norm)))
    if workers == 1:
        return _counted((_diff_job(job, line_map) for job in norm), len(norm), on_done)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_diff_job, norm, [line_map] * len(norm))
        return _counted(results, len(norm), on_done)


def _counted(
    results: Iterable[UnitDiff], total: int, on_done: Callable[[int, int], None] | None
) -> list[UnitDiff]:
    out: list[UnitDiff] = []
    for ud in results:
        out.append(ud)
        if on_done is not None:
            on_done(len(out), total)
    return out


def _diff_job(job: DiffJob, line_map: LineMap | None) -> UnitDiff:
    return diff_objects(
        job.pre, job.post, job.unit, line_map=line_map, ignore_sections=job.ignore_sections
    )


def diff_objects(
    pre: Path | None,
    post: Path,
    unit: str,
    *,
    line_map: LineMap | None = None,
    ignore_sections: Collection[str] = (),
) -> UnitDiff:
    """Diff the pre and post objects of one unit. Refusals land in ``UnitDiff.refusals``.

    ``pre`` is None for a unit the patch adds: everything in it is new.
    ``ignore_sections``: more section names never compared nor shipped, for a caller that
    handles them itself (the kernel target's special tables, entry by entry).
    """
    pre_obj = load_object(pre, unit) if pre is not None else ElfObject(post, unit, "", [], [])
    post_obj = load_object(post, unit)
    correlate(pre_obj, post_obj)
    ud = UnitDiff(unit=unit)
    ctx = _UnitContext(pre_obj, post_obj, ud, line_map)
    ctx.extra_ignored = frozenset(ignore_sections)
    ctx.classify_sections()
    ctx.tie_cold_parts()
    ctx.ship_clone_callers()
    ctx.find_hooks()
    ctx.check_patchability()
    if pre is not None:
        ctx.check_layouts()
    if not ud.refusals:
        ctx.select_sections()
    ctx.summarize()
    return ud


class _UnitContext:
    def __init__(
        self, pre: ElfObject, post: ElfObject, ud: UnitDiff, line_map: LineMap | None
    ) -> None:
        self.pre = pre
        self.post = post
        self.ud = ud
        self.unit = ud.unit
        self.line_map = line_map
        self.pre_ctx = MeaningContext("pre")
        self.post_ctx = MeaningContext("post")
        self.hook_functions: dict[int, str] = {}  # id(post code section) -> hook kind
        self._pre_lines: dict[str, dict[str, tuple[int, int]]] | None = None
        # selection state
        self.shipped: dict[int, Section] = {}  # id(ObjSection) -> Section
        self.queue: list[tuple[ObjSection, str]] = []
        self.pre_names = {s.name for s in pre.sections}
        self.extra_ignored: frozenset[str] = frozenset()

    def ignored(self, sec: ObjSection) -> bool:
        return _ignored(sec) or sec.name in self.extra_ignored

    # -- classification -------------------------------------------------------------------
    def classify_sections(self) -> None:
        for sec in self.pre.sections:
            if self.ignored(sec):
                continue
            if sec.twin is None:
                sec.status = Status.REMOVED
        for sec in self.post.sections:
            if self.ignored(sec) or sec.is_hook_table or sec.is_ctor_table:
                continue
            if sec.twin is None:
                sec.status = Status.NEW
                continue
            verdict = compare_sections(
                sec.twin,
                sec,
                self.pre_ctx,
                self.post_ctx,
                line_map=self.line_map,
                function_lines=self.function_lines(sec.twin) if sec.is_code else None,
            )
            if verdict is Verdict.LINE_ONLY:
                self.ud.line_only.append(self.display(sec))
            status = Status.CHANGED if verdict is Verdict.CHANGED else Status.SAME
            sec.status = sec.twin.status = status

    def function_lines(self, pre_sec: ObjSection) -> dict[str, tuple[int, int]]:
        if self._pre_lines is None:
            from livesplice.diff.dwarf import line_rows_by_section

            try:
                self._pre_lines = line_rows_by_section(self.pre.path)
            except Exception as e:  # malformed DWARF must not hide a real change
                self.ud.warnings.append(f"{self.unit}: cannot read line table: {e}")
                self._pre_lines = {}
        return self._pre_lines.get(pre_sec.name, {})

    def tie_cold_parts(self) -> None:
        """``foo.cold`` travels with ``foo``: the two jump into each other at fixed offsets,
        so shipping one without the other would mix old and new code of one function."""
        for sec in self.post.sections:
            p = sec.primary
            if not sec.is_code or p is None or not strip_clone_numbers(p.name).endswith(".cold"):
                continue
            parent = self.post.symbol(p.name[: p.name.rindex(".cold")])
            if parent is None or parent.section is None:
                continue
            group = [sec, parent.section]
            if any(s.status in (Status.CHANGED, Status.NEW) for s in group):
                for s in group:
                    if s.status is Status.SAME:
                        s.status = Status.CHANGED
                        if s.twin is not None:
                            s.twin.status = Status.CHANGED

    def ship_clone_callers(self) -> None:
        """A changed ``.isra``/``.constprop``/``.part`` clone may have a new private calling
        convention (gcc changes the parameters of clones freely, see -fipa-sra): every pre
        function that calls it is shipped as changed too, until nothing more changes."""
        progress = True
        while progress:
            progress = False
            for pre_sec in self.pre.sections:
                p = pre_sec.primary
                if (
                    not pre_sec.is_code
                    or p is None
                    or pre_sec.status is not Status.CHANGED
                    or not is_calling_convention_clone(p.name)
                ):
                    continue
                for caller in self.pre.sections:
                    if not caller.is_code or caller.status is not Status.SAME:
                        continue
                    if any(r.symbol.section is pre_sec for r in caller.relocs):
                        caller.status = Status.CHANGED
                        if caller.twin is not None:
                            caller.twin.status = Status.CHANGED
                        self.ud.warnings.append(
                            f"{self.unit}: {self.display(caller)} shipped as changed: it calls "
                            f"the changed clone {p.name}"
                        )
                        progress = True

    def find_hooks(self) -> None:
        """``.livesplice.hook.<kind>`` tables (include/livesplice.h): pointers to hooks."""
        for sec in self.post.sections:
            if not sec.is_hook_table:
                continue
            kind = sec.name[len(HOOK_SECTION_PREFIX) :]
            if kind not in HOOK_KINDS:
                self.ud.refusals.append(
                    f"{sec.name}: unknown hook kind {kind!r} [rule: hooks]: use the "
                    "LIVESPLICE_* macros of include/livesplice.h"
                )
                continue
            for rel in sec.relocs:
                target = rel.symbol.section
                if target is None or not target.is_code:
                    self.ud.refusals.append(
                        f"{sec.name}: hook entry does not point at a function in this unit "
                        "[rule: hooks]: pass a function defined in the patched file"
                    )
                    continue
                self.hook_functions[id(target)] = kind

    # -- refusals -------------------------------------------------------------------------
    def check_patchability(self) -> None:
        refuse = self.ud.refusals.append
        for sec in self.post.sections:
            if self.ignored(sec) or sec.is_hook_table or not sec.alloc:
                continue
            name = self.display(sec)
            if sec.is_ctor_table:
                self.check_ctor_table(sec)
                continue
            if sec.is_code:
                self.check_landing_pads(sec)
                continue
            if sec.is_tls and sec.status in (Status.CHANGED, Status.NEW):
                what = "new" if sec.status is Status.NEW else "changed"
                refuse(
                    f"{name}: {what} thread-local variable [rule: changed/new TLS]: running "
                    "threads' TLS blocks cannot grow or be rewritten; keep the state in a "
                    "heap object reached from existing data, or restart"
                )
                continue
            if sec.status is not Status.CHANGED:
                continue
            if sec.is_readonly_data and not _has_global(sec):
                continue  # local read-only data ships as a private copy with its users
            pre = sec.twin
            assert pre is not None
            objects = [s for s in sec.symbols if s.type in ("object", "tls")]
            added = sorted(s.name for s in objects if s.twin is None)
            grown = [s for s in objects if s.twin is not None and s.twin.size != s.size]
            if pre.size != sec.size and added and not grown:
                # The section grew, not a variable: name what was added where (issue 12).
                refuse(
                    f"section {sec.name} grew ({pre.size} -> {sec.size} bytes) by new "
                    f"variable(s) {', '.join(added)} placed among existing data; every existing "
                    "variable keeps its size [rule: changed size/layout of existing data]: the "
                    "running section cannot grow; move the new variable out of this section "
                    "(or use a shadow, see livesplice.h)"
                )
            elif pre.size != sec.size:
                refuse(
                    f"{name}: size of existing data changed ({pre.size} -> {sec.size} bytes) "
                    "[rule: changed size/layout of existing data]: the running object keeps "
                    "its old size; add a new variable (a shadow, see livesplice.h) instead"
                )
            else:
                refuse(
                    f"{name}: initial value of existing data changed [rule: changed initial "
                    "value of existing data]: the running program already has (and may have "
                    "modified) this data; set the value from a LIVESPLICE_APPLY hook instead"
                )

    def check_ctor_table(self, sec: ObjSection) -> None:
        pre_entries = {
            self.pre_ctx.reloc_meaning(s, r)
            for s in self.pre.sections
            if s.is_ctor_table and s.name == sec.name
            for r in s.relocs
        }
        for rel in sec.relocs:
            meaning = self.post_ctx.reloc_meaning(sec, rel)
            if meaning not in pre_entries:
                target = rel.symbol.section
                who = self.display(target) if target is not None else rel.symbol.name
                self.ud.refusals.append(
                    f"{who}: new constructor/destructor in {sec.name} [rule: new "
                    "constructors/destructors]: the running program has already run its "
                    "constructors; do the work in a LIVESPLICE_APPLY hook instead"
                )

    def check_landing_pads(self, sec: ObjSection) -> None:
        """C++ functions with exception tables: we ship code, not unwind tables."""
        p = sec.primary
        if sec.status is not Status.CHANGED or p is None:
            return
        if self.post.section(".gcc_except_table." + p.name) is not None:
            self.ud.refusals.append(
                f"{p.name}: changed function has exception-handling tables "
                "(.gcc_except_table) [rule: C++ exceptions]: livesplice ships code without "
                "unwind tables, so a throw through the new code would terminate the program; "
                "move the change into a function without try/catch or destructors of locals"
            )

    def check_layouts(self) -> None:
        from livesplice.diff.layout import compare_layouts, read_unit_types

        try:
            pre_types = read_unit_types(self.pre.path)
            post_types = read_unit_types(self.post.path)
        except Exception as e:  # unreadable DWARF: say so, do not guess
            self.ud.warnings.append(f"{self.unit}: type layout check skipped: {e}")
            return
        if pre_types is None or post_types is None:
            self.ud.warnings.append(
                f"{self.unit}: no DWARF, type layout check skipped (build with -g)"
            )
            return
        for change in compare_layouts(pre_types, post_types):
            variable = change.type_key.removeprefix("variable ")
            if variable != change.type_key and any(
                r.startswith(f"{variable}: size of existing data changed") for r in self.ud.refusals
            ):
                continue  # the data rule already said it, with the sizes
            # the unit's own item (a caller diffing one unit needs it); diff_build says it
            # once per type over every unit (refusals_once_per_type)
            self.ud.layout_changes.append(change)
            self.ud.refusals.append(unit_layout_refusal(self.unit, change))

    # -- selection ------------------------------------------------------------------------
    def select_sections(self) -> None:
        for sec in self.post.sections:
            if self.ignored(sec) or sec.is_hook_table or sec.is_ctor_table or not sec.alloc:
                continue
            if id(sec) in self.hook_functions:
                self.ship(sec, "hook")
            elif sec.is_code and sec.status is Status.CHANGED:
                self.ship(sec, "replacement")
            elif sec.is_code and sec.status is Status.NEW and sec.size:
                self.ship(sec, "new_function")
            elif sec.status is Status.NEW and (sec.is_writable_data or _has_global(sec)):
                self.ship(sec, "new_data")  # may be used by other units: ship it anyway
        while self.queue:
            sec, role = self.queue.pop(0)
            self.resolve_relocs(sec, role)

    def ship(self, sec: ObjSection, role: str) -> Section:
        done = self.shipped.get(id(sec))
        if done is not None:
            return done
        side_pre = role == "pre"
        if role == "replacement":
            assert sec.twin is not None
            key = self.pre_key(sec.twin)
        elif side_pre:
            key = self.pre_key(sec)
        else:
            key = self.post_key(sec)
        primary = sec.primary
        if primary is not None:
            name = primary.twin.name if role == "replacement" and primary.twin else primary.name
        else:
            name = sec.name
        symbols: dict[str, int] = {}
        for s in sec.symbols:
            if s.type not in ("func", "object", "tls") or not s.name:
                continue
            if role == "replacement" and s.twin is not None:
                symbols[self.symbol_key(s.twin)] = s.value
            elif role in ("pre", "replacement"):
                symbols[self.symbol_key(s)] = s.value
            else:
                symbols[self.new_symbol_key(s)] = s.value
        out = Section(
            key=key,
            role=role,  # type: ignore[arg-type]
            name=name,
            unit=self.unit,
            align=sec.align,
            size=sec.size,
            data=sec.data.hex(),
            relocs=[],
            readonly=not sec.writable,
            executable=sec.is_code,
            symbols=dict(sorted(symbols.items())),
            replaces=self.pre_key(sec.twin) if role == "replacement" and sec.twin else None,
            hook=self.hook_functions.get(id(sec)) if role == "hook" else None,
        )
        self.shipped[id(sec)] = out
        self.ud.sections.append(out)
        self.queue.append((sec, role))
        if role == "replacement" and sec.twin is not None:
            self.ship(sec.twin, "pre")  # run-pre matching of the code being replaced
        return out

    def resolve_relocs(self, sec: ObjSection, role: str) -> None:
        """Give every relocation a symbol key that apply can resolve; ship what it needs."""
        out = self.shipped[id(sec)]
        relocs: list[Reloc] = []
        for rel in sec.relocs:
            if role == "pre":
                key, addend = self.pre_reloc_key(rel)
            else:
                key, addend = self.post_reloc_key(sec, rel)
            if key is None:
                continue
            relocs.append(Reloc(offset=rel.offset, type=rel.type, symbol=key, addend=addend))
        out.relocs = relocs

    def pre_reloc_key(self, rel: ObjReloc) -> tuple[str | None, int]:
        sym = rel.symbol
        if sym.section is None or (sym.bind != "local" and sym.type != "section"):
            self.note_symbol(sym.name, sym, defined=sym.section is not None)
            return sym.name, rel.addend
        addend = rel.addend + (sym.value if sym.type != "section" else 0)
        key = self.pre_key(sym.section)
        self.note_section(key, sym.section)
        return key, addend

    def post_reloc_key(self, sec: ObjSection, rel: ObjReloc) -> tuple[str | None, int]:
        sym = rel.symbol
        target = sym.section
        if target is None:  # external: the target's PLT/GOT or a loaded library
            self.note_symbol(sym.name, sym, defined=False)
            return sym.name, rel.addend
        if sym.bind != "local" and sym.type != "section":
            # a global defined in this unit: by name (rule 1 if shipped, else rule 2/5)
            if target.is_code or target.status is Status.NEW or target.twin is None:
                self.need(target, sec)
            name = sym.twin.name if sym.twin is not None else sym.name
            if target.status is Status.NEW and sym.twin is None:
                name = self.new_symbol_key(sym)
            self.note_symbol(name, sym, defined=True)
            return name, rel.addend
        addend = rel.addend + (sym.value if sym.type != "section" else 0)
        return self.need(target, sec), addend

    def need(self, target: ObjSection, user: ObjSection) -> str:
        """Make the post section ``target`` resolvable for shipped code; return its key."""
        if target.is_code:
            if target.status in (Status.CHANGED,) and target.twin is not None:
                self.ship(target, "hook" if id(target) in self.hook_functions else "replacement")
                key = self.pre_key(target.twin)
            elif target.status is Status.NEW or target.twin is None:
                role = "hook" if id(target) in self.hook_functions else "new_function"
                key = self.ship(target, role).key
            else:  # unchanged: run-pre match its pre code to find it (rule 2)
                self.ship(target.twin, "pre")
                key = self.pre_key(target.twin)
            self.note_section(key, target)
            return key
        if target.is_readonly_data and not _has_global(target):
            key = self.ship(target, "copied_rodata").key
            self.note_section(key, target)
            return key
        if target.status is Status.NEW or target.twin is None:
            key = self.ship(target, "new_data").key
            self.note_section(key, target)
            return key
        pre = target.twin
        key = self.pre_key(pre)
        self.note_section(key, pre)
        if _has_global(pre):
            return key  # a global: its name is also in the target's symbol table (rule 5)
        if not self.make_learnable(pre):
            self.ud.refusals.append(
                f"{self.display(target)}: used by the patched {self.display(user)} but no "
                "unchanged function of the unit references it, so its running address cannot "
                "be learned [rule: every key resolvable]: make it a global, or reference it "
                "from a small existing function"
            )
        return key

    def make_learnable(self, pre_target: ObjSection) -> bool:
        """Ship the smallest pre function whose relocations reveal ``pre_target`` (rule 3)."""
        for sec_id, shipped in self.shipped.items():
            if shipped.role == "pre":
                pre_sec = self._by_id(sec_id)
                if pre_sec is not None and any(
                    r.symbol.section is pre_target for r in pre_sec.relocs
                ):
                    return True
        candidates = [
            s
            for s in self.pre.sections
            if s.is_code
            and s.primary is not None
            and any(r.symbol.section is pre_target for r in s.relocs)
        ]
        if not candidates:
            return False
        best = min(candidates, key=lambda s: (s.size, s.name))
        self.ship(best, "pre")
        return True

    def _by_id(self, sec_id: int) -> ObjSection | None:
        for s in self.pre.sections:
            if id(s) == sec_id:
                return s
        return None

    # -- keys -----------------------------------------------------------------------------
    def pre_key(self, pre_sec: ObjSection) -> str:
        return f"{self.unit}:{pre_sec.name}"

    def post_key(self, post_sec: ObjSection) -> str:
        """Key of a post-only thing; marked when a pre section of the same name exists
        (``counter.0`` may be a different variable in pre and post)."""
        key = f"{self.unit}:{post_sec.name}"
        return key + "#post" if post_sec.name in self.pre_names else key

    def symbol_key(self, sym: ObjSymbol) -> str:
        return sym.name if sym.bind != "local" else f"{self.unit}:{sym.name}"

    def new_symbol_key(self, sym: ObjSymbol) -> str:
        if sym.bind != "local":
            return sym.name
        pre_has = self.pre.symbol(sym.name) is not None
        return f"{self.unit}:{sym.name}" + ("#post" if pre_has else "")

    def note_symbol(self, key: str, sym: ObjSymbol, *, defined: bool) -> None:
        if key in self.ud.symbols:
            return
        self.ud.symbols[key] = SymbolInfo(
            key=key,
            name=sym.name,
            binding=_BINDING.get(sym.bind, "global"),
            kind=sym.type if sym.type in ("func", "object", "tls", "section") else "notype",
            defined=defined,
            unit=self.unit if defined else None,
        )

    def note_section(self, key: str, sec: ObjSection) -> None:
        if key in self.ud.symbols:
            return
        p = sec.primary
        self.ud.symbols[key] = SymbolInfo(
            key=key,
            name=p.name if p is not None else sec.name,
            binding="local",
            kind="section",
            defined=True,
            unit=self.unit,
        )

    # -- summary --------------------------------------------------------------------------
    def display(self, sec: ObjSection) -> str:
        p = sec.primary
        return p.name if p is not None else sec.name

    def summarize(self) -> None:
        ud = self.ud
        for sec in self.post.sections:
            if self.ignored(sec) or sec.is_hook_table or sec.is_ctor_table or sec.status is None:
                continue
            name = self.display(sec.twin) if sec.twin is not None else self.display(sec)
            if sec.is_code and sec.size:
                ud.functions[name] = sec.status
            elif sec.is_writable_data or (sec.primary is not None and not sec.is_code):
                ud.data[name] = sec.status
        for sec in self.pre.sections:
            if sec.status is Status.REMOVED and sec.primary is not None:
                (ud.functions if sec.is_code else ud.data)[self.display(sec)] = Status.REMOVED
        hook_names = {s.name for s in ud.sections if s.role == "hook"}
        for s in ud.sections:
            if s.role == "replacement" and not strip_clone_numbers(s.name).endswith(".cold"):
                ud.changed_functions.append(s.name)
            elif s.role == "new_function" and s.name not in hook_names:
                ud.new_functions.append(s.name)
            elif s.role == "new_data":
                ud.new_data.append(s.name)
            elif s.role == "hook" and s.hook is not None:
                ud.hooks.append(UnitHook(kind=s.hook, function=s.name, key=s.key))
        ud.changed_functions.sort()
        ud.new_functions.sort()
        ud.new_data.sort()
        ud.line_only.sort()
        ud.sections.sort(key=lambda s: (_ROLE_ORDER[s.role], s.key))
        ud.symbols = dict(sorted(ud.symbols.items()))
        ud.hooks.sort(key=lambda h: (HOOK_KINDS.index(h.kind), h.key))
        for name in ud.line_only:
            ud.warnings.append(
                f"{self.unit}: {name}: only line numbers changed (__LINE__); treated as unchanged"
            )


def _ignored(sec: ObjSection) -> bool:
    return (
        (not sec.alloc)
        or sec.name.startswith(IGNORED_SECTION_PREFIXES)
        or (sec.size == 0 and sec.name in (".text", ".data", ".bss"))
    )


def _has_global(sec: ObjSection) -> bool:
    return any(s.bind != "local" for s in sec.symbols)
