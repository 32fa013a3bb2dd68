"""The kernel target end to end: `create --kernel` on the lab's tree, apply/view/undo in the guest.

Needs the prepared lab (like test_kernel_lab.py: skips with the reason when it cannot run;
LIVESPLICE_KERNEL_TESTS=1 makes that a failure). Cost: ~8 s per created update, ~10 s per
guest boot (the livesplice overlay is built once per kernel and cached).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.cli_lab import update_script
from livesplice.errors import PatchRefused
from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel

CASES = Path(__file__).parent / "kernel"


@pytest.fixture(scope="module")
def lab() -> LabKernel:
    return prepared_lab()  # type: ignore[no-any-return]


def signing_key() -> Path:
    """The session's key (conftest.py): kernel updates are signed like any other, and the
    guest verifies them against its public half (TRUST below)."""
    return Path(os.environ["LIVESPLICE_SIGNING_KEY"])


def trust_files() -> list[GuestFile]:
    """The session's public key as the guest's trust directory, /payload/trust."""
    trust = Path(os.environ["LIVESPLICE_TRUST_DIR"])
    return [GuestFile(p, f"trust/{p.name}") for p in sorted(trust.glob("*.pub"))]


# the guest applies only updates signed by a key in this directory (kernel/overlay.py)
TRUST = "export LIVESPLICE_TRUST_DIR=/payload/trust"


def create(lab: LabKernel, case: str, out: Path, uid: str) -> Path:
    from livesplice.kernel.target import create_kernel_update

    manifest, path, _ = create_kernel_update(
        lab.ksrc,
        CASES / f"{case}.patch",
        update_id=uid,
        output=out / f"{uid}.update",
        signing_key=signing_key(),
    )
    assert manifest is not None and path is not None
    return path


@pytest.fixture(scope="module")
def updates(lab: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kupdates")
    body = create(lab, "cmdline-body", out, "body")
    newfn = create(lab, "cmdline-new-function", out, "newfn")
    return {
        "body": body,
        "newfn": newfn,
        "tampered": tamper_pre(body, out / "tampered.update"),
        "unsigned": unsigned_copy(body, out / "unsigned.update"),
    }


def unsigned_copy(update: Path, out: Path) -> Path:
    """The body update re-packed without a signature (as someone without the key could)."""
    from livesplice.kernel.package import read_kernel_members, write_kernel_update
    from livesplice.update.archive import read_update

    u = read_update(update)
    module, kernel = read_kernel_members(update)
    write_kernel_update(out, u.manifest, u.patch, module, kernel)
    return out


def tamper_pre(update: Path, out: Path) -> Path:
    """The body update with one byte of cmdline_proc_show's pre code changed: what an update
    built from a different source than the running kernel looks like to run-pre matching."""
    from livesplice.kernel.package import read_kernel_members, write_kernel_update
    from livesplice.update.archive import read_update

    u = read_update(update)
    module, kernel = read_kernel_members(update)
    pre = next(s for t in u.manifest.targets for s in t.sections if s.role == "pre")
    data = bytearray(pre.bytes)
    fields = {o for r in pre.relocs for o in range(r.offset, r.offset + 4)}
    victim = next(i for i in range(6, len(data)) if i not in fields)
    data[victim] ^= 0x01
    pre.data = data.hex()
    kernel = dict(kernel, module="livesplice_tampered")
    u.manifest.id = "tampered"
    write_kernel_update(out, u.manifest, u.patch, module, kernel, signing_key=signing_key())
    return out


def test_create_body_change_ships_one_replacement(updates: dict[str, Path]) -> None:
    from livesplice.kernel.package import read_kernel_members
    from livesplice.update.archive import read_update

    u = read_update(updates["body"])
    (t,) = u.manifest.targets
    assert (t.name, t.kind, t.changed_functions) == ("vmlinux", "kernel", ["cmdline_proc_show"])
    module, kernel = read_kernel_members(updates["body"])
    assert kernel["funcs"] == [{"object": "vmlinux", "name": "cmdline_proc_show"}]
    # saved_command_line is not exported: it must be a livepatch relocation
    assert b".klp.sym.vmlinux.saved_command_line,0" in module
    assert b".klp.rela.vmlinux..text.livesplice." in module


def test_create_new_function(updates: dict[str, Path]) -> None:
    from livesplice.update.archive import read_update

    (t,) = read_update(updates["newfn"]).manifest.targets
    assert t.new_functions == ["livesplice_marker"]
    assert t.changed_functions == ["cmdline_proc_show"]


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        ("cmdline-init-FAIL", "[rule: __init code]"),
        ("sysctl-data-FAIL", "[rule: changed initial value of existing data]"),
    ],
)
def test_create_refuses(lab: LabKernel, tmp_path: Path, case: str, rule: str) -> None:
    with pytest.raises(PatchRefused) as e:
        create(lab, case, tmp_path, "refused")
    assert any(rule in d for d in e.value.details), e.value.details
    assert not (tmp_path / "refused.update").exists()


def test_apply_view_undo_stacking_and_no_match(lab: LabKernel, updates: dict[str, Path]) -> None:
    """One boot: an unsigned update is refused (the guest verifies signatures); a wrong-source
    update is refused before loading anything; two updates of
    the same function stack; view lists them; undo peels them off in order."""
    from livesplice.kernel.overlay import ensure_overlay

    files = [GuestFile(p, f"u/{k}.update") for k, p in updates.items()]
    script = "\n".join(
        [
            TRUST,
            "livesplice apply u/unsigned.update; echo unsigned-rc=$?",
            "livesplice apply u/tampered.update; echo tampered-rc=$?",
            "ls /sys/kernel/livepatch | grep -c livesplice_tampered; echo after-tampered",
            update_script(["u/body.update"], "cat /proc/cmdline"),
            "livesplice apply u/newfn.update || exit 20",
            "cat /proc/cmdline",
            "livesplice view",
            "livesplice undo newfn || exit 21",
            "cat /proc/cmdline",
            "livesplice undo body || exit 22",
            "cat /proc/cmdline",
            "livesplice undo body; echo undo-again-rc=$?",
            "lsmod | grep -c livesplice; echo modules-left",
        ]
    )
    guest = Guest(lab, timeout=150, extra_initrds=[ensure_overlay(lab.dir)])
    r = guest.run(script, [*files, *trust_files()])
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()
    # the guest verified signatures: the unsigned copy is refused, the signed ones name a key
    assert "unsigned-rc=2" in lines and "BAD_SIGNATURE" in out, out
    assert "is NOT signed" not in out and "signed by key" in out, out
    assert "tampered-rc=5" in lines, out
    assert "NO_MATCH" in out and "cmdline_proc_show+0x" in out, out
    assert lines[lines.index("after-tampered") - 1] == "0", out
    cmdlines = [line for line in lines if line.startswith("console=ttyS0")]
    assert [c.endswith(" livesplice-patched") for c in cmdlines] == [True, False, True, False], out
    assert " new-function-42" in cmdlines[1], out
    assert "kernel update body (livesplice_body): enabled" in out, out
    assert "kernel update newfn (livesplice_newfn): enabled" in out, out
    assert "undo-again-rc=9" in lines, out
    assert lines[lines.index("modules-left") - 1] == "0", out


def test_undo_without_livepatch_support_is_not_applied(tmp_path: Path) -> None:
    from livesplice.errors import NotApplied
    from livesplice.kernel import target

    if (target.LIVEPATCH / "livesplice_nosuchid").exists():
        pytest.skip("unexpected livepatch named livesplice_nosuchid")
    with pytest.raises(NotApplied):
        target.undo_kernel("nosuchid")
