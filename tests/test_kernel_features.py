"""Kernel target features in the lab: hooks as livepatch callbacks, a shadow variable for a
data change, a static function whose name is duplicated (sympos > 1), a real wrong-source
update (built from another kernel version's source of the patched file).

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost: three creates (~12-20 s each) + one boot with 2 CPUs (~20 s).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kernel_support import kernel_unavailable, prepared_lab
from livesplice.kernel.debian import LabUnavailable
from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel

CASES = Path(__file__).parent / "kernel"
PEFILE = "crypto/asymmetric_keys/verify_pefile.c"


@pytest.fixture(scope="module")
def lab() -> LabKernel:
    return prepared_lab()  # type: ignore[no-any-return]


def _create(ksrc: Path, patch: Path, out: Path, uid: str) -> Path:
    from livesplice.kernel.target import create_kernel_update

    manifest, path, _ = create_kernel_update(
        ksrc, patch, update_id=uid, output=out / f"{uid}.update"
    )
    assert manifest is not None and path is not None
    return path


def wrong_source_update(lab: LabKernel, out: Path) -> Path:
    """An update made on a tree whose verify_pefile.c is 6.1.187-1's (it has the
    CVE-2026-64544 check): a real other-version source, not a tampered byte. The patch
    changes that check's error code; the running 6.1.176-1 code differs."""
    from livesplice.kernel.corpus import make_patch, source_files
    from livesplice.kernel.kbuild import break_link

    try:
        newer = source_files("6.1.187-1", [PEFILE])
    except LabUnavailable as e:
        kernel_unavailable(e.render())
        raise
    tree = out / "tree-6.1.187-pefile"
    subprocess.run(["cp", "-al", str(lab.ksrc), str(tree)], check=True)
    break_link(tree / PEFILE)
    (tree / PEFILE).write_bytes((newer / PEFILE).read_bytes())
    edited = out / "edited"
    (edited / PEFILE).parent.mkdir(parents=True)
    text = (newer / PEFILE).read_text()
    fix = "if (tmp <= hashed_bytes || pelen < tmp)\n\t\t\treturn -ELIBBAD;"
    assert fix in text
    (edited / PEFILE).write_text(text.replace(fix, fix.replace("ELIBBAD", "EKEYREJECTED")))
    patch = out / "wrongsrc.patch"
    patch.write_text(make_patch(tree, edited, [PEFILE]))
    return _create(tree, patch, out, "wrongsrc")


@pytest.fixture(scope="module")
def updates(lab: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kfeatures")
    return {
        "hooks": _create(lab.ksrc, CASES / "cmdline-hooks-shadow.patch", out, "hooks"),
        "cnext": _create(lab.ksrc, CASES / "crypto-c_next-sympos.patch", out, "cnext"),
        "wrongsrc": wrong_source_update(lab, out),
    }


def test_create_hooks_and_sympos(updates: dict[str, Path]) -> None:
    from livesplice.kernel.package import read_kernel_members
    from livesplice.update.archive import read_update

    hooks = read_update(updates["hooks"]).manifest.hooks
    assert [h.kind for h in hooks] == ["pre_apply", "post_apply", "pre_reverse", "post_reverse"]
    module, _ = read_kernel_members(updates["hooks"])
    assert b"klp_shadow_get_or_alloc" in module and b"klp_shadow_free_all" in module
    _, kernel = read_kernel_members(updates["cnext"])
    assert kernel["funcs"] == [{"object": "vmlinux", "name": "c_next"}]


def test_hooks_shadow_sympos_wrong_source_in_guest(
    lab: LabKernel, updates: dict[str, Path]
) -> None:
    from livesplice.kernel.overlay import ensure_overlay

    files = [GuestFile(p, f"u/{k}.update") for k, p in updates.items()]
    script = "\n".join(
        [
            # wrong source: refused by run-pre matching, nothing loaded
            "livesplice apply u/wrongsrc.update; echo wrongsrc-rc=$?",
            "ls /sys/kernel/livepatch | grep -c wrongsrc; echo wrongsrc-loaded",
            # sympos: c_next exists three times; only crypto/proc.c's is replaced
            "grep -c ' c_next$' /proc/kallsyms; echo c_next-count",
            "grep -c ^name /proc/crypto; echo crypto-before",
            "livesplice apply u/cnext.update || exit 10",
            "grep -c ^name /proc/crypto; echo crypto-after",
            "grep -c ^processor /proc/cpuinfo; echo cpus",  # x86 c_next still walks the CPUs
            "ls /sys/kernel/livepatch/livesplice_cnext/vmlinux/",
            # hooks (klp callbacks) and a shadow variable per inode
            "livesplice apply u/hooks.update || exit 11",
            "cat /proc/cmdline; cat /proc/cmdline",
            "livesplice undo hooks || exit 12",
            "cat /proc/cmdline",
            "livesplice undo cnext || exit 13",
            "grep -c ^name /proc/crypto; echo crypto-undone",
            "dmesg | grep -o 'livesplice-hook: .*'",
        ]
    )
    guest = Guest(lab, cpus=2, timeout=200, extra_initrds=[ensure_overlay(lab.dir)])
    r = guest.run(script, files)
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()

    def before(marker: str) -> str:
        return lines[lines.index(marker) - 1]

    assert "wrongsrc-rc=5" in lines and "NO_MATCH" in out, out
    assert "verify_pefile_signature+0x" in out, out
    assert before("wrongsrc-loaded") == "0", out
    assert int(before("c_next-count")) == 3, out
    n = int(before("crypto-before"))
    assert n > 2 and int(before("crypto-after")) == (n + 1) // 2, out
    assert before("cpus") == "2", out
    assert int(before("crypto-undone")) == n, out
    assert any(line.startswith("c_next,") and line != "c_next,0" for line in lines), out
    cmdlines = [line for line in lines if line.startswith("console=ttyS0")]
    assert [c.rsplit(" ", 1)[-1] for c in cmdlines] == [
        "reads=1",
        "reads=2",
        cmdlines[2].rsplit(" ", 1)[-1],
    ], out
    assert "reads=" not in cmdlines[2], out
    hooks = [line.split(": ", 1)[1] for line in lines if line.startswith("livesplice-hook: ")]
    assert hooks == ["pre_apply", "post_apply", "pre_reverse", "post_reverse"], out
