"""The livepatch module clears its relocations against a module when that module goes.

Linux 6.1 writes them when the module loads (klp_module_coming) but never clears them:
x86's apply_relocate_add then refuses the module's next load ("existing value is nonzero")
and the module cannot be loaded again while the update is applied. The generated module
lists the fields (code.S) and zeroes them from the module object's post_unpatch callback
(glue.c). Text only here; tests/test_kernel_corpus.py reloads psample under its update.
"""

from __future__ import annotations

from livesplice.kernel.klp import (
    KlpSymbol,
    ModulePlan,
    modules_with_klp_relocations,
    write_code_asm,
    write_glue_c,
)
from livesplice.update.format import Hook, Reloc, Section, Target


def _target(name: str, kind: str, relocs: list[Reloc]) -> Target:
    code = Section(
        key=f"{name}.c:.text.work",
        role="replacement",
        name="work",
        unit=f"{name}.c",
        align=16,
        size=16,
        data="90" * 16,
        relocs=relocs,
        executable=True,
        replaces=f"{name}.c:.text.work",
    )
    return Target(name, kind, "", ["work"], [], [], [code], {})  # type: ignore[arg-type]


def _plan(funcs: list[tuple[str, str, str]]) -> ModulePlan:
    return ModulePlan(
        name="livesplice_t",
        klp_symbols={
            "psample.psample_nl_family": KlpSymbol("psample", "psample_nl_family", 1, "k1"),
            "vmlinux.init_net": KlpSymbol("vmlinux", "init_net", 1, "k2"),
        },
        funcs=funcs,
    )


def test_fields_against_a_module_are_listed_and_cleared() -> None:
    t = _target(
        "psample",
        "kernel_module",
        [Reloc(3, "R_X86_64_PC32", "k1", -4), Reloc(9, "R_X86_64_64", "k2", 0)],
    )
    plan = _plan([("psample", "work", "lsp_psample_0")])
    code = write_code_asm(plan, [t], {"psample.psample_nl_family": 0, "vmlinux.init_net": 0})
    # the field against psample, not the one against vmlinux (never unloaded)
    assert "lsp_klp_clear_psample:\n.quad lsp_psample_0+3, 4\n.quad 0, 0" in code
    assert modules_with_klp_relocations(code) == ["psample"]
    glue = write_glue_c(plan, [t], [], "t", "test", modules_with_klp_relocations(code))
    assert "lsp_clear_text_poke" in glue and "text_mutex" in glue
    assert '{ .name = "psample", .funcs = lsp_funcs_0, .callbacks = {' in glue
    assert ".post_unpatch = lsp_klp_clear_cb_0," in glue
    # RCU callbacks the new code queued (act_tunnel_key's fix queues one of its own) must
    # have run before rmmod frees the module after undo
    assert "static void __exit lsp_exit(void)\n{\n\trcu_barrier();\n}" in glue


def test_user_post_reverse_hook_still_runs_before_clearing() -> None:
    t = _target("psample", "kernel_module", [Reloc(3, "R_X86_64_PC32", "k1", -4)])
    hook = Section(
        key="psample.c:.text.after",
        role="hook",
        name="after",
        unit="psample.c",
        align=16,
        size=1,
        data="c3",
        executable=True,
        hook="post_reverse",
    )
    t.sections.append(hook)
    plan = _plan([("psample", "work", "lsp_psample_0")])
    code = write_code_asm(plan, [t], {"psample.psample_nl_family": 0})
    hooks = [Hook("post_reverse", "after", "psample", "psample.c:.text.after")]
    glue = write_glue_c(plan, [t], hooks, "t", "test", modules_with_klp_relocations(code))
    assert "{ lsp_cb_post_unpatch(obj); lsp_klp_clear(lsp_klp_clear_psample); }" in glue
    assert glue.count(".post_unpatch =") == 1


def test_vmlinux_only_update_has_no_clearing() -> None:
    t = _target("vmlinux", "kernel", [Reloc(9, "R_X86_64_64", "k2", 0)])
    plan = _plan([("vmlinux", "work", "lsp_vmlinux_0")])
    code = write_code_asm(plan, [t], {"vmlinux.init_net": 0})
    assert modules_with_klp_relocations(code) == []
    assert "lsp_klp_clear" not in write_glue_c(plan, [t], [], "t", "test", [])
