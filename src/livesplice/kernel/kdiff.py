"""Diff of kernel units: the shared engine per unit, then the kernel's own rules.

``diff_objects`` (livesplice.diff.engine) does the correlation and comparison; this module
groups the result by patched object (``vmlinux`` or a module) and adds what only the kernel
needs, collected into ONE :class:`PatchRefused`:

* ``__init``/``__exit`` code (``.init.text``, ``.exit.text``): already freed or never run again;
* ``noinstr`` code (``.noinstr.text``, ``.entry.text``): entry/NMI code, never redirected;
* (a replaced function without the ``call __fentry__`` at its entry -- ``notrace``, all of
  ``lib/`` -- is not refused here: livepatch cannot reach it, so create switches it with
  Ksplice's own mechanism, :mod:`livesplice.kernel.ksplice`)
* patch sites: every ``pre`` section carries the ``.parainstructions`` and
  ``.altinstructions`` sites of the pre object inside it (:func:`attach_patch_sites`), so
  run-pre matching accepts the kernel's boot-time rewrites there and nowhere else;
* special sections, entry by entry: the kernel's tables are never compared as data (the
  engine ignores them); instead every entry of ``__bug_table``, ``__jump_table`` and
  ``__ex_table`` whose code address lies in shipped code is copied into the livepatch module
  (:class:`Special`), so WARN/BUG, static keys and user-memory fixups work in the new code.
  So are the ``.parainstructions`` and ``.altinstructions`` entries of shipped code, each
  alternative with its replacement bytes (``.altinstr_replacement``): the module loader's
  ``module_finalize`` patches the new code for this CPU exactly as the boot patched the old.
  A relocation inside such a site or replacement must be resolved before that, so it may
  only point into the module or at an exported symbol (livepatch writes the others later).
  ``.static_call_sites`` entries are not needed: without one the call stays a
  call of the ``__SCT__`` trampoline, which jumps to the current target.
  ``.return_sites``/``.retpoline_sites``/``.call_sites`` (the code still goes through the
  thunks, which is correct, only not rewritten), ``__mcount_loc`` (the fentry call becomes a
  nop), ``.printk_index`` and ``.orc_unwind*`` (see the warning) are not needed for
  correctness;
* dynamic debug descriptors (``__dyndbg``, one section for all ``pr_debug`` sites of a
  unit): a descriptor whose line number moved is the same site; shipped code keeps using
  the running kernel's descriptor, found by its symbol name. A new site is refused.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.diff.elfmodel import Status
from livesplice.diff.engine import (
    DiffJob,
    UnitDiff,
    diff_many,
    merge_units,
    refusals_once_per_type,
)
from livesplice.errors import PatchRefused
from livesplice.kernel.kbuild import KernelBuild
from livesplice.kernel.klp import load_exports
from livesplice.kernel.patchsites import ALT_INSTR_SIZE, PARAVIRT_SITE_SIZE
from livesplice.update.format import HOOK_KINDS, Hook, Reloc, Section, SymbolInfo, Target

if TYPE_CHECKING:
    from livesplice.diff.elfmodel import ElfObject, ObjSection

# tables whose entries are copied for shipped code: entry size in bytes (x86-64, 6.1):
# struct bug_entry with GENERIC_BUG_RELATIVE_POINTERS {s32 addr, s32 file, u16 line, u16
# flags}; struct jump_entry with JUMP_LABEL_RELATIVE {s32 code, s32 target, long key};
# struct exception_table_entry {int insn, fixup, data} (arch/x86/include/asm/extable.h).
# struct paravirt_patch_site and struct alt_instr: see kernel/patchsites.py
COPIED_TABLES = {
    "__bug_table": 12,
    "__jump_table": 16,
    "__ex_table": 12,
    ".parainstructions": PARAVIRT_SITE_SIZE,
    ".altinstructions": ALT_INSTR_SIZE,
}
REFUSED_SPECIAL: tuple[str, ...] = ()
# tables not needed for correctness (module docstring), never compared
UNNEEDED_TABLES = (
    ".static_call_sites",
    ".return_sites",
    ".retpoline_sites",
    ".call_sites",
    ".ibt_endbr_seal",
    ".orc_unwind",
    ".orc_unwind_ip",
    ".printk_index",
    "__dyndbg",
    ".altinstr_replacement",
    ".altinstr_aux",
    "__tracepoints_ptrs",
    "__tracepoints_strings",
)
# sections with one object per pr_debug site: referenced by symbol, not by section
MULTI_OBJECT_SECTIONS = ("__dyndbg",)


@dataclass
class KernelDiff:
    """What the kernel diff hands the module builder: targets (vmlinux and modules), warnings,
    hooks, the special tables to put in the module and where matching learns symbols."""

    targets: list[Target]
    warnings: list[str]
    hooks: list[Hook]
    # target name -> special table contents to put in the module (never in the manifest:
    # the process target has no use for them); sections named like the table, relocations
    # by symbol key like shipped code, strings as copied_rodata sections of their own
    specials: dict[str, list[Section]] = field(default_factory=dict)
    # klp symbol key -> (key of a section whose running address matching learns, offset)
    learn: dict[str, tuple[str, int]] = field(default_factory=dict)


def kernel_ignored(obj: Path) -> list[str]:
    """Names of the special sections of ``obj`` the engine must not compare."""
    from elftools.elf.elffile import ELFFile

    with obj.open("rb") as f:
        names = [s.name for s in ELFFile(f).iter_sections()]
    return [
        n
        for n in names
        if n in COPIED_TABLES
        or n in REFUSED_SPECIAL
        or n in UNNEEDED_TABLES
        or n.startswith(".discard.")
    ]


def diff_kernel_build(build: KernelBuild, patch_text: str) -> KernelDiff:
    """Diff every changed kernel unit with the shared engine, then apply the kernel's own rules;
    every refusal of every unit is raised once, together."""
    from livesplice.diff.compare import LineMap
    from livesplice.diff.elfmodel import load_object

    line_map = LineMap.from_patch(patch_text)
    refusals: list[str] = []
    warnings: list[str] = []
    per_obj: dict[str, list[UnitDiff]] = {}
    specials: dict[str, list[Section]] = {}
    learn: dict[str, tuple[str, int]] = {}
    exports = load_exports(build.tree)
    units = [u for u in build.units if u.post is not None]
    jobs = [
        DiffJob(
            u.pre,
            u.post,
            u.source,
            tuple(sorted(set(kernel_ignored(u.pre)) | set(kernel_ignored(u.post)))),
        )
        for u in units
        if u.post is not None
    ]
    diffs = diff_many(jobs, line_map=line_map)
    for unit, ud in zip(units, diffs, strict=True):
        assert unit.post is not None
        refusals.extend(ud.refusals)
        warnings.extend(ud.warnings)
        obj = unit.module or "vmlinux"
        if ud.refusals:  # the engine stopped before selecting sections: name __init too
            refusals.extend(init_changes_of_refused(ud, load_object(unit.post, unit.source)))
        else:
            refusals.extend(kernel_refusals(ud, unit.post))
            pre_obj = load_object(unit.pre, unit.source) if unit.pre != unit.post else None
            post_obj = load_object(unit.post, unit.source)
            attach_patch_sites(ud, pre_obj or post_obj)
            refusals.extend(symbolize_multi_object_refs(ud, pre_obj, post_obj, learn))
            aux, problems = ship_aux_fragments(ud, pre_obj, post_obj, obj)
            refusals.extend(problems)
            tables, problems = copy_special_entries(ud, pre_obj, post_obj, obj, exports, aux)
            refusals.extend(problems)
            specials.setdefault(obj, []).extend([*aux, *tables])
        if ud.changed:
            per_obj.setdefault(obj, []).append(ud)
    # one item per distinct reason: several table entries of one function say the same
    refusals = sorted(set(refusals_once_per_type(refusals, diffs)))
    if refusals:
        raise PatchRefused(
            f"the patch has {len(refusals)} change(s) that cannot be applied to a live kernel",
            details=refusals,
            advice="see each item; rewrite the patch (shadow variables: <livesplice/shadow.h>, "
            "hooks: <livesplice/livesplice.h>) or ship the fix with a reboot",
        )
    targets = [make_target(obj, uds) for obj, uds in sorted(per_obj.items())]
    if any(targets):
        warnings.append(
            "no ORC unwind entries are shipped for the new code: a task sleeping inside it "
            "has an unreliable stack, which can delay a later transition (undo, next patch)"
        )
    hooks = sorted(
        (
            Hook(kind=h.kind, function=h.function, target=obj, key=h.key)
            for obj, uds in per_obj.items()
            for ud in uds
            for h in ud.hooks
        ),
        key=lambda h: (h.target, HOOK_KINDS.index(h.kind), h.key),
    )
    return KernelDiff(
        targets,
        sorted(set(warnings)),
        hooks,
        {k: v for k, v in specials.items() if k in per_obj},
        learn,
    )


def attach_patch_sites(ud: UnitDiff, pre: ElfObject) -> None:
    """Give every ``pre`` code section of the unit the paravirt and alternative sites the
    pre object's tables list inside it: the running kernel rewrote those bytes at boot, and
    run-pre matching accepts there exactly what it may have written (kernel/kmatch.py)."""
    from livesplice.kernel.patchsites import read_sites

    by_section = read_sites(pre)
    for s in ud.sections:
        if s.role == "pre" and s.executable:
            name = s.key.split(":", 1)[1]
            s.sites = [
                x
                for x in by_section.get(name, ())
                if x.offset >= 0 and x.offset + x.length <= s.size
            ]


def kernel_refusals(ud: UnitDiff, post: Path) -> list[str]:
    """What a kernel update cannot carry in one unit (``__init``/``__exit`` code, special
    sections livesplice does not generate, ...), each with its rule and what to do."""
    out: list[str] = []
    shipped = {s.key.split(":", 1)[1]: s for s in ud.sections if s.role != "pre"}
    for s in ud.sections:
        sec = s.key.split(":", 1)[1].removesuffix("#post")
        if sec.startswith((".init.", ".exit.")) and s.role != "pre":
            fns = ", ".join(changed_functions(s, ud)) or s.name
            out.append(
                f"{s.unit}: {fns}: __init/__exit code changed [rule: __init code]: init "
                "code has run and been freed; the change cannot take effect live"
            )
        if sec.startswith((".noinstr.", ".entry.text")) and s.role != "pre":
            # every noinstr function of a unit shares one section (like __init code): the
            # engine would replace the section under its first symbol's name
            fns = ", ".join(changed_functions(s, ud) or _callers_of_changed(s, ud)) or sec
            out.append(
                f"{s.unit}: {fns}: noinstr code changed or calls changed code [rule: "
                "noinstr code]: entry and NMI code runs where nothing may be traced or "
                "redirected (before RCU and context tracking are set up): it cannot be "
                "switched live"
            )
        # a replaced function without an ftrace entry is not refused here: create sends
        # it through Ksplice's own mechanism (livesplice.kernel.ksplice), which refuses
        # what it cannot switch
    names = set(shipped) | {k.removesuffix("#post") for k in shipped}
    for special, users in special_entries(post).items():
        if special not in REFUSED_SPECIAL:
            continue
        for user in sorted(users & names):
            if user.startswith((".init.", ".exit.")):
                continue  # refused as __init code already; its tables are beside the point
            hit = shipped.get(user) or shipped.get(user + "#post")
            fn = hit.name if hit is not None else user
            out.append(
                f"{ud.unit}: {fn}: shipped code has {special} entries [rule: special "
                f"sections]: livesplice does not generate {special} entries for the "
                "livepatch module; keep the change out of code using "
                f"{_what(special)}"
            )
    return out


def _callers_of_changed(s: Section, ud: UnitDiff) -> list[str]:
    """The functions of a multi-function section whose calls reach replaced code (the
    section is shipped only because a clone it calls changed)."""
    replaced = {
        x.key.rsplit(":", 1)[-1].removesuffix("#post")
        for x in ud.sections
        if x.role == "replacement" and x is not s
    }
    return sorted(
        name
        for name, (_data, relocs) in _symbol_ranges(s).items()
        if any(target in replaced for _o, _t, target, _a in relocs)
    )


def _symbol_ranges(s: Section) -> dict[str, tuple[bytes, list[tuple[int, str, str, int]]]]:
    """Function name -> its bytes and relocations (offsets relative to the function) within
    a section holding several functions, split at the symbol offsets."""
    syms = sorted(
        (off, key.rsplit(":", 1)[-1])
        for key, off in s.symbols.items()
        if not key.rsplit(":", 1)[-1].startswith(".")
    )
    data = s.bytes
    out: dict[str, tuple[bytes, list[tuple[int, str, str, int]]]] = {}
    for i, (start, name) in enumerate(syms):
        end = next((o for o, _n in syms[i + 1 :] if o > start), s.size)
        # by symbol name: pre and post spell the keys of the same target differently
        # (the post copy of a section is "<name>#post")
        relocs = [
            (r.offset - start, r.type, r.symbol.rsplit(":", 1)[-1].removesuffix("#post"), r.addend)
            for r in s.relocs
            if start <= r.offset < end
        ]
        out[name] = (data[start:end], relocs)
    return out


def init_changes_of_refused(ud: UnitDiff, post: ElfObject) -> list[str]:
    """The ``__init``/``__exit`` refusal of a unit the shared engine already refused.

    The engine stops before selecting the unit's sections, and :func:`kernel_refusals`
    reads those: without this, a fix that adds a variable and sets it in an ``__init``
    function was refused for the variable alone, and the init code that has already run
    (the reason the fix cannot work live even with the variable elsewhere) went unsaid.
    """
    init = {
        sym.name
        for sym in post.symbols
        if sym.type == "func"
        and sym.section is not None
        and sym.section.name.startswith((".init.", ".exit."))
    }
    fns = sorted(
        n for n, st in ud.functions.items() if n in init and st in (Status.CHANGED, Status.NEW)
    )
    if not fns:
        return []
    return [
        f"{ud.unit}: {', '.join(fns)}: __init/__exit code changed [rule: __init code]: init "
        "code has run and been freed; the change cannot take effect live"
    ]


def changed_functions(s: Section, ud: UnitDiff) -> list[str]:
    """The functions of a changed multi-function section (gcc puts every ``__init`` function
    of a unit in one ``.init.text``, whatever -ffunction-sections says) whose bytes or
    relocations differ from the pre object's, or that are new: the refusal names them, not
    the section. Empty when the pre section is unknown (the caller names the section)."""
    base = s.key.removesuffix("#post")
    pre = next((p for p in ud.sections if p.role == "pre" and p.key in (base, s.replaces)), None)
    if pre is None:
        return []
    before = _symbol_ranges(pre)
    return sorted(n for n, v in _symbol_ranges(s).items() if before.get(n) != v)


def _what(special: str) -> str:
    return {
        "__jump_table": "static keys (static_branch_*, tracepoints)",
        "__ex_table": "user-memory accessors (get_user, copy_from_user ...)",
        "__bug_table": "WARN*/BUG* macros",
        ".altinstructions": "CPU-feature alternatives (alternative(), static_cpu_has)",
        ".altinstr_replacement": "CPU-feature alternatives (alternative(), static_cpu_has)",
    }.get(special, special)


def is_cold(name: str) -> bool:
    """A gcc ``.cold`` part: reached only by jumps from its parent, never called, so
    never a livepatch function of its own; the new parent jumps to the new part."""
    return name.endswith(".cold") or ".cold." in name


def has_fentry(s: Section, ud: UnitDiff) -> bool:
    """Whether the replaced function starts with a ``call __fentry__`` (ftrace's hook, which
    livepatch needs); without one the Ksplice path is taken."""
    pre = next((p for p in ud.sections if p.role == "pre" and p.key == s.replaces), None)
    code = pre or s
    return any(r.symbol == "__fentry__" and r.offset in (1, 5) for r in code.relocs)


def special_entries(obj: Path) -> dict[str, set[str]]:
    """Special section name -> names of the sections its relocations point into."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    wanted = set(REFUSED_SPECIAL) | set(COPIED_TABLES) | {".altinstr_replacement"}
    out: dict[str, set[str]] = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection):
                continue
            target = elf.get_section(sec["sh_info"]).name
            if target not in wanted:
                continue
            users = out.setdefault(target, set())
            for rel in sec.iter_relocations():
                sym = symtab.get_symbol(rel["r_info_sym"])  # type: ignore[union-attr]
                shndx = sym["st_shndx"]
                if isinstance(shndx, int):
                    users.add(elf.get_section(shndx).name)
    return out


# ---------------------------------------------------------------------------------------
# special entries and multi-object sections
# ---------------------------------------------------------------------------------------


def _shipped_code(ud: UnitDiff) -> dict[str, Section]:
    """Post code section name -> the shipped section carrying it."""
    out: dict[str, Section] = {}
    for s in ud.sections:
        if s.role == "pre" or not s.executable:
            continue
        name = s.key.split(":", 1)[1].removesuffix("#post")
        out.setdefault(name, s)
    return out


def _c_string(sec: ObjSection, offset: int) -> bytes:
    end = sec.data.find(b"\0", offset)
    return sec.data[offset : end if end >= 0 else len(sec.data)]


def copy_special_entries(
    ud: UnitDiff,
    pre: ElfObject | None,
    post: ElfObject,
    obj: str,
    exports: Collection[str] = (),
    aux: list[Section] | None = None,
) -> tuple[list[Section], list[str]]:
    """The entries of the copied tables that belong to shipped code, as module sections.

    ``exports``: the symbols Module.symvers lists (normal relocations of the module, written
    before module_finalize patches the paravirt and alternative sites); ``aux``: the
    ``.altinstr_aux`` fragments the module carries (:func:`ship_aux_fragments`)."""
    code = _shipped_code(ud)
    extra = aux or []
    out: list[Section] = []
    problems: list[str] = []
    strings: dict[bytes, Section] = {}
    for table, size in COPIED_TABLES.items():
        sec = post.section(table)
        if sec is None or not sec.relocs:
            continue
        keep: list[int] = []
        for rel in sorted(sec.relocs, key=lambda r: r.offset):
            start = rel.offset - rel.offset % size
            target = rel.symbol.section
            # the entry's code address (its first field) decides whether it is ours
            if rel.offset == start and target is not None and target.name in code:
                keep.append(start)
        for start in keep:
            relocs: list[Reloc] = []
            for rel in sec.relocs:
                if not start <= rel.offset < start + size:
                    continue
                if table == ".altinstructions" and rel.offset == start + 4:
                    key, addend, why = _alt_replacement(
                        ud,
                        pre,
                        post,
                        rel,
                        sec.data[start + 11],
                        code,
                        strings,
                        obj,
                        exports,
                        out,
                        extra,
                    )
                else:
                    key, addend, why = _entry_reloc(ud, pre, rel, code, strings, obj, table)
                if why:
                    owner = next((r for r in sec.relocs if r.offset == start), rel)
                    fn = owner.symbol.section.name if owner.symbol.section else "?"
                    problems.append(
                        f"{ud.unit}: {fn.removeprefix('.text.')}: {table} entry: "
                        f"{why} [rule: special sections]"
                    )
                    continue
                relocs.append(Reloc(rel.offset - start, rel.type, key, addend))
            data = sec.data[start : start + size]
            if table in (".parainstructions", ".altinstructions"):
                problems.extend(_late_relocations(ud, sec, start, table, code, exports, extra))
            out.append(
                Section(
                    key=f"{ud.unit}:{table}@{start}",
                    role="copied_rodata",
                    name=table,
                    unit=ud.unit,
                    align=max(sec.align, 1),
                    size=size,
                    data=data.hex(),
                    relocs=relocs,
                    readonly=False,
                    executable=False,
                )
            )
    return [*strings.values(), *out], problems


def ship_aux_fragments(
    ud: UnitDiff, pre: ElfObject | None, post: ElfObject, obj: str
) -> tuple[list[Section], list[str]]:
    """``static_cpu_has()`` code in shipped functions: its original ``jmp 6f`` leads into
    the unit's ``.altinstr_aux`` (``testb $bit, boot_cpu_data+N(%rip); jnz t_yes; jmp t_no``,
    arch/x86/include/asm/cpufeature.h _static_cpu_has). The module carries the fragment
    each such jump reaches, up to its closing ``jmp``, and the jump is re-pointed at it:
    the whole section would drag in the labels of every other function of the unit. (The
    loader's apply_alternatives replaces the jump before the code runs: X86_FEATURE_ALWAYS.)
    """
    from livesplice.arch.x86_64 import decode_one

    aux = post.section(".altinstr_aux")
    if aux is None:
        return [], []
    code = _shipped_code(ud)
    key_of_aux = f"{ud.unit}:.altinstr_aux"
    frags: dict[int, Section] = {}
    problems: list[str] = []
    strings: dict[bytes, Section] = {}
    for s in ud.sections:
        if s.role == "pre":
            continue
        for i, r in enumerate(s.relocs):
            if r.symbol != key_of_aux:
                continue
            data = s.bytes
            if (
                r.type not in ("R_X86_64_PC32", "R_X86_64_PLT32")
                or r.offset < 1
                or data[r.offset - 1] != 0xE9
            ):
                problems.append(
                    f"{ud.unit}: {s.name}: refers to .altinstr_aux other than by a "
                    "jmp [rule: special sections]"
                )
                continue
            start = r.addend + 4  # jmp rel32: the field + 4 is where it lands
            frag = frags.get(start)
            if frag is None:
                end = start
                while end < aux.size:
                    insn = decode_one(aux.data[end:], end)
                    if insn is None:
                        break
                    end += insn.size
                    if insn.mnemonic == "jmp":
                        break
                relocs: list[Reloc] = []
                for ar in aux.relocs:
                    if start <= ar.offset < end:
                        k, a, why = _entry_reloc(ud, pre, ar, code, strings, obj, ".altinstr_aux")
                        if why:
                            problems.append(
                                f"{ud.unit}: {s.name}: static_cpu_has() code: "
                                f"{why} [rule: special sections]"
                            )
                            continue
                        relocs.append(Reloc(ar.offset - start, ar.type, k, a))
                frag = Section(
                    key=f"{key_of_aux}@{start}",
                    role="copied_rodata",
                    name=".altinstr_aux",
                    unit=ud.unit,
                    align=1,
                    size=end - start,
                    data=aux.data[start:end].hex(),
                    relocs=relocs,
                    readonly=True,
                    executable=True,
                )
                frags[start] = frag
            s.relocs[i] = Reloc(r.offset, r.type, frag.key, -4)
    if frags and not any(
        r.symbol == key_of_aux for s in ud.sections if s.role != "pre" for r in s.relocs
    ):
        # nothing shipped reaches the section itself any more: no run-pre match of it
        ud.sections[:] = [s for s in ud.sections if not (s.role == "pre" and s.key == key_of_aux)]
    return [*strings.values(), *frags.values()], problems


SITE_LENGTH_AT = {".parainstructions": 9, ".altinstructions": 10}  # the u8 length fields


def _module_defined(key: str, ud: UnitDiff, extra: list[Section]) -> bool:
    """Whether the livepatch module itself defines ``key`` (shipped, not matched pre code)."""
    return any(key == c.key or key in c.symbols for c in [*ud.sections, *extra] if c.role != "pre")


def _late_relocations(
    ud: UnitDiff,
    table_sec: ObjSection,
    start: int,
    table: str,
    code: dict[str, Section],
    exports: Collection[str],
    extra: list[Section],
) -> list[str]:
    """Relocations of shipped code inside the site an entry names that livepatch would
    write after the loader patched the site (a klp symbol): they would corrupt it."""
    from livesplice.diff.elfmodel import ObjReloc

    rel = next(r for r in table_sec.relocs if r.offset == start)
    assert isinstance(rel, ObjReloc) and rel.symbol.section is not None
    shipped = code[rel.symbol.section.name]
    off = rel.addend + (rel.symbol.value if rel.symbol.type != "section" else 0)
    length = table_sec.data[start + SITE_LENGTH_AT[table]]
    out = []
    for r in shipped.relocs:
        if (
            off <= r.offset < off + length
            and not _module_defined(r.symbol, ud, extra)
            and r.symbol not in exports
        ):
            out.append(
                f"{ud.unit}: {shipped.name}: the {table} site at +{off:#x} refers to "
                f"{r.symbol.rsplit(':', 1)[-1]}, which livepatch resolves only after the "
                "module loader patched the site [rule: special sections]"
            )
    return out


def _alt_replacement(
    ud: UnitDiff,
    pre: ElfObject | None,
    post: ElfObject,
    rel: object,
    length: int,
    code: dict[str, Section],
    strings: dict[bytes, Section],
    obj: str,
    exports: Collection[str],
    out: list[Section],
    extra: list[Section],
) -> tuple[str, int, str]:
    """An alternative's replacement bytes as a module section of their own (appended to
    ``out``); (its key, 0, refusal reason or "")."""
    from livesplice.diff.elfmodel import ObjReloc

    assert isinstance(rel, ObjReloc)
    sec = rel.symbol.section
    if sec is None or sec.name != ".altinstr_replacement":
        return "", 0, "the replacement is not in .altinstr_replacement"
    off = rel.addend + (rel.symbol.value if rel.symbol.type != "section" else 0)
    relocs: list[Reloc] = []
    for r in sec.relocs:
        if not off <= r.offset < off + length:
            continue
        key, addend, why = _entry_reloc(ud, pre, r, code, strings, obj, ".altinstructions")
        if not why and not _module_defined(key, ud, extra) and key not in exports:
            why = (
                f"its replacement refers to {key.rsplit(':', 1)[-1]}, which livepatch "
                "resolves only after the module loader copied the replacement"
            )
        if why:
            return "", 0, why
        relocs.append(Reloc(r.offset - off, r.type, key, addend))
    # by offset AND length: an empty replacement (static_cpu_has) shares its offset with
    # the next one
    key = f"{ud.unit}:.altinstr_replacement@{off}+{length}"
    if not any(s.key == key for s in out):
        out.append(
            Section(
                key=key,
                role="copied_rodata",
                name=".altinstr_replacement",
                unit=ud.unit,
                align=1,
                size=length,
                data=sec.data[off : off + length].hex(),
                relocs=relocs,
                readonly=False,
                executable=False,
            )
        )
    return key, 0, ""


def _entry_reloc(
    ud: UnitDiff,
    pre: ElfObject | None,
    rel: object,
    code: dict[str, Section],
    strings: dict[bytes, Section],
    obj: str,
    table: str,
) -> tuple[str, int, str]:
    """(symbol key, addend, refusal reason or "") of one relocation of a copied entry."""
    from livesplice.diff.elfmodel import ObjReloc

    assert isinstance(rel, ObjReloc)
    sym = rel.symbol
    target = sym.section
    off = rel.addend + (sym.value if sym.type != "section" else 0)
    if target is None or (sym.bind != "local" and sym.type != "section"):
        if target is not None and target.is_code and target.name in code:
            return code[target.name].key, off, ""
        name = sym.name
        ud.symbols.setdefault(
            name, SymbolInfo(name, name, "global", sym.type, defined=target is not None)
        )
        if obj != "vmlinux" and table == "__jump_table" and target is not None:
            return (
                "",
                0,
                (
                    f"static key {name} lives in module {obj}: livepatch applies "
                    "relocations against a module after its jump labels are set up"
                ),
            )
        return name, rel.addend, ""
    if target.is_code:
        if target.name in code:
            return code[target.name].key, off, ""
        return "", 0, f"points into {target.name}, which is not shipped"
    if target.is_merge_strings or target.name.startswith((".rodata.str", ".LC")):
        text = _c_string(target, off)
        s = strings.get(text)
        if s is None:
            s = Section(
                key=f"{ud.unit}:lsp-string-{len(strings)}",
                role="copied_rodata",
                name=".rodata.livesplice.str",
                unit=ud.unit,
                align=1,
                size=len(text) + 1,
                data=(text + b"\0").hex(),
                relocs=[],
                readonly=True,
                executable=False,
            )
            strings[text] = s
        return s.key, 0, ""
    # a static object (a static key, a dynamic debug descriptor): by its symbol name in pre
    if obj != "vmlinux" and table == "__jump_table":
        return (
            "",
            0,
            (
                f"static key in {target.name} lives in module {obj}: livepatch applies "
                "relocations against a module after its jump labels are set up"
            ),
        )
    inner = next(
        (
            s
            for s in target.symbols
            if s.type == "object" and s.value <= off < s.value + max(s.size, 1)
        ),
        None,
    )
    if inner is None or pre is None or pre.symbol(inner.name) is None:
        return "", 0, f"refers to {target.name}+{off:#x}, which the running kernel lacks"
    key = f"{ud.unit}:{inner.name}"
    ud.symbols.setdefault(key, SymbolInfo(key, inner.name, "local", "object", True, ud.unit))
    return key, off - inner.value, ""


def symbolize_multi_object_refs(
    ud: UnitDiff, pre: ElfObject | None, post: ElfObject, learn: dict[str, tuple[str, int]]
) -> list[str]:
    """Shipped relocations into ``__dyndbg`` -> the descriptor's own symbol key.

    The engine names local data by section (``unit:__dyndbg`` + offset), right for
    ``-fdata-sections`` objects but not for a section holding every pr_debug descriptor of
    the unit: the module resolves the descriptor by name (``.klp.sym``), and apply decides
    its sympos from the address matching learns for the section plus the symbol's offset.
    """
    problems: list[str] = []
    for s in ud.sections:
        if s.role == "pre":
            continue
        for i, r in enumerate(s.relocs):
            unit, _, secname = r.symbol.partition(":")
            if secname not in MULTI_OBJECT_SECTIONS:
                continue
            psec = post.section(secname)
            inner = None
            if psec is not None:
                inner = next(
                    (
                        x
                        for x in psec.symbols
                        if x.type == "object" and x.value <= r.addend < x.value + max(x.size, 1)
                    ),
                    None,
                )
            twin = pre.symbol(inner.name) if (inner is not None and pre is not None) else None
            if inner is None or twin is None or twin.section is None:
                problems.append(
                    f"{ud.unit}: {s.name}: new dynamic debug site (pr_debug/dev_dbg) [rule: "
                    "special sections]: its descriptor would have to be registered with "
                    "dynamic debug; use pr_info or drop the message"
                )
                continue
            key = f"{unit}:{inner.name}"
            ud.symbols.setdefault(key, SymbolInfo(key, inner.name, "local", "object", True, unit))
            learn[key] = (r.symbol, twin.value)
            s.relocs[i] = Reloc(r.offset, r.type, key, r.addend - inner.value)
    return problems


def make_target(obj: str, uds: list[UnitDiff]) -> Target:
    """The update's target for one kernel object (vmlinux or a module), from its units' diffs
    merged once."""
    sections, symbols = merge_units(uds)
    return Target(
        name=obj,
        kind="kernel" if obj == "vmlinux" else "kernel_module",
        build_id="",
        changed_functions=sorted({f for ud in uds for f in ud.changed_functions}),
        new_functions=sorted({f for ud in uds for f in ud.new_functions}),
        new_data=sorted({d for ud in uds for d in ud.new_data}),
        sections=sorted(sections.values(), key=lambda s: (s.role != "pre", s.role, s.key)),
        symbols=dict(sorted(symbols.items())),
        units=sorted(ud.unit for ud in uds),
    )
