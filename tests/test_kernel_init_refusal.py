"""A refused kernel unit still names its changed ``__init`` code (issue 12 item 5).

The BPF LSM fix (CVE-2026-64192) adds ``bool bpf_lsm_initialized __ro_after_init`` and sets
it in the ``__init`` function ``bpf_lsm_init``. The engine refuses the grown
``.data..ro_after_init``; the deeper reason -- the init code that sets the variable ran at
boot and never runs again, so even a variable placed elsewhere would stay false -- must be
listed too. Real gcc, the kernel's section names.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from livesplice.diff.elfmodel import load_object
from livesplice.diff.engine import diff_objects
from livesplice.kernel.kdiff import init_changes_of_refused

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

PRE = """
#define __init __attribute__((section(".init.text")))
#define __ro_after_init __attribute__((section(".data..ro_after_init")))
int other_ro __ro_after_init = 3;
int register_hooks(void);
static int __init lsm_init(void) { other_ro = 4; return register_hooks(); }
int (*initcall)(void) __attribute__((used)) = lsm_init;
int storage_alloc(void) { return other_ro; }
"""
POST = (
    PRE.replace(
        "int other_ro __ro_after_init = 3;",
        "int other_ro __ro_after_init = 3;\n_Bool lsm_initialized __ro_after_init;",
    )
    .replace("other_ro = 4; return", "other_ro = 4; lsm_initialized = 1; return")
    .replace("return other_ro;", "if (!lsm_initialized) return -95; return other_ro;")
)


def _objects(tmp: Path) -> tuple[Path, Path]:
    out = []
    for side, text in (("pre", PRE), ("post", POST)):
        d = tmp / side
        d.mkdir()
        (d / "hooks.c").write_text(text)
        cmd = ["gcc", "-O2", "-ffunction-sections", "-fdata-sections", "-c", "hooks.c"]
        subprocess.run([*cmd, "-o", "hooks.o"], cwd=d, check=True)
        out.append(d / "hooks.o")
    return out[0], out[1]


def test_refused_unit_lists_changed_init_function(tmp_path: Path) -> None:
    pre, post = _objects(tmp_path)
    ud = diff_objects(pre, post, "security/bpf/hooks.c")
    assert len(ud.refusals) == 1 and "grew" in ud.refusals[0]  # the new variable
    extra = init_changes_of_refused(ud, load_object(post, "security/bpf/hooks.c"))
    assert extra == [
        "security/bpf/hooks.c: lsm_init: __init/__exit code changed [rule: __init code]: "
        "init code has run and been freed; the change cannot take effect live"
    ]


def test_refused_unit_without_init_change_adds_nothing(tmp_path: Path) -> None:
    pre, post = _objects(tmp_path)
    ud = diff_objects(pre, post, "security/bpf/hooks.c")
    ud.functions = {n: s for n, s in ud.functions.items() if n != "lsm_init"}
    assert init_changes_of_refused(ud, load_object(post, "security/bpf/hooks.c")) == []


NOINSTR_PRE = """
#define noinstr __attribute__((section(".noinstr.text"), noinline))
long trace_enter(long x);
noinstr long nmi_enter(long x) { return x * 3; }
noinstr long enter_from_user(long x) { return trace_enter(x); }
"""


def test_noinstr_code_is_refused(tmp_path: Path) -> None:
    """Every noinstr function of a unit shares ``.noinstr.text``: the seccomp fix
    (CVE-2026-89603, kernel/entry/common.c) changed what syscall_enter_from_user_mode
    calls, and the engine shipped the whole section as "irqentry_nmi_enter", its first
    symbol. Entry code is refused, naming the rule."""
    from livesplice.kernel.kdiff import kernel_refusals

    post = NOINSTR_PRE.replace("return trace_enter(x);", "return trace_enter(x) + 1;")
    out = []
    for side, text in (("pre", NOINSTR_PRE), ("post", post)):
        d = tmp_path / side
        d.mkdir()
        (d / "common.c").write_text(text)
        cmd = ["gcc", "-O2", "-ffunction-sections", "-fdata-sections", "-c", "common.c"]
        subprocess.run([*cmd, "-o", "common.o"], cwd=d, check=True)
        out.append(d / "common.o")
    ud = diff_objects(out[0], out[1], "kernel/entry/common.c")
    assert ud.refusals == []
    refusals = kernel_refusals(ud, out[1])
    assert len(refusals) == 1, refusals
    assert refusals[0].startswith("kernel/entry/common.c: enter_from_user: noinstr code")
    assert "[rule: noinstr code]" in refusals[0]
