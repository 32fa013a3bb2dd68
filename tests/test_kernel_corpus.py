"""The real kernel fixes of the corpus (corpus/kernel-public.csv), in the lab.

Each row is the diff of the listed files between linux-source-6.1 6.1.176-1 (the prepared
lab tree) and 6.1.187-1 (fetched once, only those files extracted; cached). Every row is
created on the 6.1.176-1 tree; the ones that apply are applied in two guest boots:

* boot 1: all updates applied with sctp and psample NOT loaded, then the modules are loaded
  (livepatch patches them as they load); the sctp fix and the verify_pefile code run;
* boot 2: sctp loaded and used before the update, used again after it, and after undo.

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost: five creates (~15-35 s each) + two boots (~15 s each) ~ 2-3 min.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_support import kernel_unavailable, prepared_lab
from livesplice.errors import PatchRefused
from livesplice.kernel.debian import LabUnavailable
from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "kernel-public.csv"
HERE = Path(__file__).parent / "kernel"
PY = "PY=$(ls /opt/livesplice/bin/python3* | head -1)"

# what each fix does on Debian's 6.1.176-1 cloud-amd64 kernel, and why
EXPECTED = {
    "CVE-2026-68320": "applied",  # net/sctp/auth.c, in sctp.ko
    "CVE-2026-64553": "applied",  # net/psample/psample.c, in psample.ko; __bug_table entries
    "CVE-2026-64544": "applied",  # verify_pefile.c (built in); __jump_table + __dyndbg
    "CVE-2026-64563": "applied",  # lib/rhashtable.c: no fentry: the Ksplice path
    "CVE-2026-64458": "not_built",  # DAMON: CONFIG_DAMON is not set in cloud-amd64
}


@pytest.fixture(scope="module")
def lab() -> LabKernel:
    if not CORPUS.exists():
        kernel_unavailable(f"the corpus {CORPUS} is missing")
    return prepared_lab()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def results(lab: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """cve -> the update's path, the PatchRefused, or the list of not-built notes."""
    from livesplice.eval.kernel_rows import read_kernel_csv
    from livesplice.kernel.corpus import make_patch, source_files
    from livesplice.kernel.target import create_kernel_update

    out = tmp_path_factory.mktemp("kcorpus")
    # the first five rows (this kernel); the rest of the corpus is the kernel evaluation's
    rows = [r for r in read_kernel_csv(CORPUS) if r.name in EXPECTED]
    res: dict[str, object] = {}
    for row in rows:
        assert row.pre_version == lab.packages.version, row
        try:
            post = source_files(row.post_version, list(row.files))
        except LabUnavailable as e:
            kernel_unavailable(e.render())
            raise
        patch = out / f"{row.name}.patch"
        patch.write_text(make_patch(lab.ksrc, post, list(row.files)))
        notes: list[str] = []
        try:
            manifest, path, _ = create_kernel_update(
                lab.ksrc,
                patch,
                update_id=row.update_id,
                output=out / f"{row.name}.update",
                notes=notes,
            )
        except PatchRefused as e:
            res[row.name] = e
            continue
        res[row.name] = path if manifest is not None else notes
    return res


def test_corpus_create_outcomes(results: dict[str, object]) -> None:
    from livesplice.update.archive import read_update

    got = {}
    for cve, r in results.items():
        got[cve] = (
            "applied"
            if isinstance(r, Path)
            else "refused"
            if isinstance(r, PatchRefused)
            else "not_built"
        )
    assert got == EXPECTED, results
    notes = results["CVE-2026-64458"]
    assert isinstance(notes, list)
    assert any("mm/damon/ops-common.c" in n and "is not set" in n for n in notes), notes
    sctp = read_update(results["CVE-2026-68320"])  # type: ignore[arg-type]
    assert [(t.name, t.kind, t.changed_functions) for t in sctp.manifest.targets] == [
        ("sctp", "kernel_module", ["sctp_auth_ep_add_chunkid"])
    ]
    psample = read_update(results["CVE-2026-64553"])  # type: ignore[arg-type]
    assert [t.name for t in psample.manifest.targets] == ["psample"]


def _guest(lab: LabKernel) -> Guest:
    from livesplice.kernel.modules import modules_initrd
    from livesplice.kernel.overlay import ensure_overlay

    mods = modules_initrd(lab, ["sctp", "psample"])
    return Guest(lab, timeout=240, extra_initrds=[ensure_overlay(lab.dir), mods])


def _files(lab: LabKernel, results: dict[str, object]) -> list[GuestFile]:
    files = [
        GuestFile(HERE / "sctp_auth_chunks.py", "sctp.py"),
        GuestFile(HERE / "kexec_pefile.py", "kexec.py"),
        GuestFile(lab.vmlinuz, "vmlinuz"),
    ]
    for cve, r in results.items():
        if isinstance(r, Path):
            files.append(GuestFile(r, f"u/{cve}.update"))
    return files


def test_corpus_apply_then_load_modules(lab: LabKernel, results: dict[str, object]) -> None:
    """Apply the three fixes with sctp/psample not loaded; load them; exercise; undo all."""
    if not all(isinstance(results[c], Path) for c in EXPECTED if EXPECTED[c] == "applied"):
        pytest.fail(f"some fixes were not created: {results}")
    lp = "/sys/kernel/livepatch"
    script = "\n".join(
        [
            PY,
            "lsmod | grep -c -E '^(sctp|psample) '; echo loaded-before",
            "for u in CVE-2026-68320 CVE-2026-64553 CVE-2026-64544; do",
            "  livesplice apply u/$u.update || exit 10",
            "done",
            "modprobe sctp || exit 11",
            "modprobe psample || exit 12",
            f"echo sctp-patched=$(cat {lp}/livesplice_cve202668320/sctp/patched)",
            f"echo psample-patched=$(cat {lp}/livesplice_cve202664553/psample/patched)",
            # reloaded under the update: its relocations against psample were cleared when
            # it went (Linux 6.1 refuses the load otherwise: "existing value is nonzero")
            "rmmod psample && modprobe psample || exit 17",
            f"echo psample-reloaded=$(cat {lp}/livesplice_cve202664553/psample/patched)",
            "$PY sctp.py || exit 13",
            "dmesg -c > /dev/null",
            "$PY kexec.py vmlinuz || exit 14",
            "dmesg | grep -c 'PEFILE: header size'; echo pefile-debug-lines",
            "livesplice view",
            "for u in cve202664544 cve202664553 cve202668320; do livesplice undo $u || exit 15; done",  # noqa: E501
            "$PY sctp.py || exit 16",
            "lsmod | grep -c livesplice; echo livepatches-left",
            "cat /proc/sys/kernel/tainted",
        ]
    )
    r = _guest(lab).run(script, _files(lab, results))
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()
    assert lines[lines.index("loaded-before") - 1] == "0", out
    assert "sctp-patched=1" in lines and "psample-patched=1" in lines, out
    assert "psample-reloaded=1" in lines, out
    # the fixed code refuses the 17th chunk type; after undo the old code takes 20 again
    accepted = [line for line in lines if line.startswith("accepted ")]
    assert accepted == ["accepted 16", "accepted 20"], out
    # pr_debug in the new verify_pefile_signature: its own __jump_table entries follow the
    # dynamic debug key, and its descriptors are the kernel's (two keyrings: two passes)
    assert int(lines[lines.index("pefile-debug-lines") - 1]) >= 1, out
    for uid in ("cve202668320", "cve202664553", "cve202664544"):
        assert f"kernel update {uid} (livesplice_{uid}): enabled" in out, out
    assert lines[lines.index("livepatches-left") - 1] == "0", out


def test_corpus_sctp_loaded_before(lab: LabKernel, results: dict[str, object]) -> None:
    """sctp in use before the update: old behaviour, fixed behaviour, old again after undo."""
    if not isinstance(results["CVE-2026-68320"], Path):
        pytest.fail(f"the sctp fix was not created: {results['CVE-2026-68320']}")
    script = "\n".join(
        [
            PY,
            "modprobe sctp || exit 11",
            "$PY sctp.py || exit 12",
            "livesplice apply u/CVE-2026-68320.update || exit 13",
            "$PY sctp.py || exit 14",
            "livesplice undo cve202668320 || exit 15",
            "$PY sctp.py || exit 16",
        ]
    )
    files = [f for f in _files(lab, results) if f.guest_path != "vmlinuz"]
    r = _guest(lab).run(script, files)
    assert r.status == 0, r.output
    accepted = [line for line in r.output.splitlines() if line.startswith("accepted ")]
    assert accepted == ["accepted 20", "accepted 16", "accepted 20"], r.output
