"""Diff of kernel units: the shared engine per unit, then the kernel's own rules.

``diff_objects`` (livesplice.diff.engine) does the correlation and comparison; this module
groups the result by patched object (``vmlinux`` or a module) and adds what only the kernel
needs, collected into ONE :class:`PatchRefused`:

* ``__init``/``__exit`` code (``.init.text``, ``.exit.text``): already freed or never run again;
* a replaced function without the ``call __fentry__`` at its entry (``notrace``, lib-y
  code): livepatch redirects through ftrace and cannot reach it;
* special sections: entries of ``__jump_table``, ``__ex_table``, ``__bug_table``,
  ``.altinstructions`` and ``.static_call_sites`` that point into shipped code would need
  entries of their own in the module; until those are generated such changes are refused.
  ``.return_sites``/``.retpoline_sites`` (the shipped code jumps to the thunks, which is
  correct, only not rewritten), ``__mcount_loc`` (the fentry call becomes a nop),
  ``.printk_index`` and ``.orc_unwind*`` (see the warning) are not needed for correctness.
"""

from __future__ import annotations

from pathlib import Path

from livesplice.diff.engine import UnitDiff, diff_objects
from livesplice.errors import PatchRefused
from livesplice.kernel.kbuild import KernelBuild
from livesplice.update.format import Section, SymbolInfo, Target

REFUSED_SPECIAL = ("__jump_table", "__ex_table", "__bug_table", ".altinstructions",
                   ".static_call_sites")  # fmt: skip


def diff_kernel_build(build: KernelBuild, patch_text: str) -> tuple[list[Target], list[str]]:
    from livesplice.diff.compare import LineMap

    line_map = LineMap.from_patch(patch_text)
    refusals: list[str] = []
    warnings: list[str] = []
    per_obj: dict[str, list[UnitDiff]] = {}
    for unit in build.units:
        if unit.post is None:
            continue
        ud = diff_objects(unit.pre, unit.post, unit.source, line_map=line_map)
        refusals.extend(ud.refusals)
        warnings.extend(ud.warnings)
        if not ud.refusals:
            refusals.extend(kernel_refusals(ud, unit.post))
        if ud.changed:
            per_obj.setdefault(unit.module or "vmlinux", []).append(ud)
    if refusals:
        raise PatchRefused(
            f"the patch has {len(refusals)} change(s) that cannot be applied to a live kernel",
            details=sorted(set(refusals)),
            advice="see each item; rewrite the patch (shadow variables: klp_shadow_*, hooks: "
            "livesplice.h) or ship the fix with a reboot",
        )
    targets = [make_target(obj, uds) for obj, uds in sorted(per_obj.items())]
    if any(targets):
        warnings.append(
            "no ORC unwind entries are shipped for the new code: a task sleeping inside it "
            "has an unreliable stack, which can delay a later transition (undo, next patch)"
        )
    return targets, sorted(set(warnings))


def kernel_refusals(ud: UnitDiff, post: Path) -> list[str]:
    out: list[str] = []
    shipped = {s.key.split(":", 1)[1]: s for s in ud.sections if s.role != "pre"}
    for s in ud.sections:
        sec = s.key.split(":", 1)[1].removesuffix("#post")
        if sec.startswith((".init.", ".exit.")) and s.role != "pre":
            out.append(
                f"{s.unit}: {s.name}: __init/__exit code changed [rule: __init code]: init "
                "code has run and been freed; the change cannot take effect live"
            )
        if s.role == "replacement" and not has_fentry(s, ud):
            out.append(
                f"{s.unit}: {s.name}: no ftrace entry (call __fentry__) [rule: functions "
                "without fentry]: notrace or lib-y code cannot be redirected by livepatch; "
                "patch its callers instead"
            )
    names = set(shipped) | {k.removesuffix("#post") for k in shipped}
    for special, users in special_entries(post).items():
        if special not in REFUSED_SPECIAL:
            continue
        for user in sorted(users & names):
            hit = shipped.get(user) or shipped.get(user + "#post")
            fn = hit.name if hit is not None else user
            out.append(
                f"{ud.unit}: {fn}: shipped code has {special} entries [rule: special "
                f"sections]: livesplice does not yet generate {special} entries for the "
                "livepatch module; keep the change out of code using "
                f"{_what(special)}"
            )
    return out


def _what(special: str) -> str:
    return {
        "__jump_table": "static keys (static_branch_*, tracepoints)",
        "__ex_table": "user-memory accessors (get_user, copy_from_user ...)",
        "__bug_table": "WARN*/BUG* macros",
        ".altinstructions": "CPU-feature alternatives",
        ".static_call_sites": "static calls",
    }.get(special, special)


def has_fentry(s: Section, ud: UnitDiff) -> bool:
    pre = next((p for p in ud.sections if p.role == "pre" and p.key == s.replaces), None)
    code = pre or s
    return any(r.symbol == "__fentry__" and r.offset in (1, 5) for r in code.relocs)


def special_entries(obj: Path) -> dict[str, set[str]]:
    """Special section name -> names of the sections its relocations point into."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    out: dict[str, set[str]] = {}
    with obj.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection):
                continue
            target = elf.get_section(sec["sh_info"]).name
            if target not in REFUSED_SPECIAL and target != ".altinstr_replacement":
                continue
            users = out.setdefault(target, set())
            for rel in sec.iter_relocations():
                sym = symtab.get_symbol(rel["r_info_sym"])  # type: ignore[union-attr]
                shndx = sym["st_shndx"]
                if isinstance(shndx, int):
                    users.add(elf.get_section(shndx).name)
    return out


def make_target(obj: str, uds: list[UnitDiff]) -> Target:
    sections: dict[tuple[str, str], Section] = {}
    symbols: dict[str, SymbolInfo] = {}
    for ud in uds:
        for s in ud.sections:
            sections.setdefault((s.key, s.role), s)
        for k, info in ud.symbols.items():
            symbols.setdefault(k, info)
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
