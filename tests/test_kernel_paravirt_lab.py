"""A fix to a function with paravirt call sites, created, run-pre matched, applied and undone
in the booted Debian kernel (issue 12 item 3).

tests/kernel/smaps-pte-paravirt.patch changes smaps_pte_range (fs/proc/task_mmu.c): its
pte_offset_map/pte_val/... are ``call *pv_ops+N(%rip)`` sites in vmlinux that the boot rewrote
to native instructions (apply_paravirt), and the unit's ``static inline``
pfn_swap_entry_to_page is emitted out of line in several units (one copy per unit, the same
code). Before the paravirt sites travelled with the pre code, apply refused this exact source
(``expected ff1500000000 ... found 4889f8``). The fix adds 1 kB of SwapPss per page table
walked, which /proc/<pid>/smaps_rollup shows: 0 kB before (the guest has no swap), more after
apply, 0 kB again after undo.

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost (cache ready, 2 cores): one create (~40 s) + one boot (~30 s).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

CASES = Path(__file__).parent / "kernel"
FN = "smaps_pte_range"

pytestmark = pytest.mark.kernel

# the running bytes of a function, read in the guest the way apply reads them (/proc/kcore)
READ = (
    "PYTHONHOME=/opt/livesplice PYTHONPATH=/opt/livesplice/site "
    'LD_LIBRARY_PATH=/opt/livesplice/lib $PY -c "import sys; '
    "from livesplice.kernel.kmatch import KernelImage as K; "
    "i = K.open(); (c,) = i.candidates(sys.argv[1], None); "
    "print('running', sys.argv[1], i.read(c.addr, int(sys.argv[2])).hex(), "
    "len([s for s in i.candidates('pfn_swap_entry_to_page', None) "
    "if s.type in 'tT']))\" "
)


@pytest.fixture(scope="module")
def update(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kernel_support import prepared_lab
    from livesplice.kernel.target import create_kernel_update
    from test_kernel_target import signing_key

    lab = prepared_lab()
    out = tmp_path_factory.mktemp("paravirt")
    manifest, path, _ = create_kernel_update(
        lab.ksrc,
        CASES / "smaps-pte-paravirt.patch",
        update_id="smaps",
        output=out / "smaps.update",
        signing_key=signing_key(),
    )
    assert manifest is not None and path is not None
    return path


def test_paravirt_fix_applies_in_the_booted_kernel(update: Path) -> None:
    from kernel_support import prepared_lab
    from livesplice.kernel.guest import Guest
    from livesplice.kernel.initramfs import GuestFile
    from livesplice.kernel.overlay import ensure_overlay
    from livesplice.kernel.package import read_kernel_members
    from livesplice.update.archive import read_update
    from test_kernel_target import TRUST, trust_files

    (t,) = read_update(update).manifest.targets
    assert t.changed_functions == [FN]
    pre = next(s for s in t.sections if s.role == "pre" and s.name == FN)
    pv = [s for s in pre.sites if s.kind == "paravirt"]
    assert pv, "the pre code of smaps_pte_range carries no paravirt site"
    # the new code's own sites travel in the module: its loader patches them as the boot
    # patched the old code (module_finalize), instead of create refusing the alternatives
    module, _ = read_kernel_members(update)
    names = {s.name for s in ELFFile(BytesIO(module)).iter_sections()}
    assert {".parainstructions", ".altinstructions", ".altinstr_replacement"} <= names

    swap = "grep SwapPss /proc/self/smaps_rollup"
    script = "\n".join(
        [
            "PY=$(ls /opt/livesplice/bin/python3* | head -1)",
            TRUST,
            READ + f"{FN} {pre.size}",
            swap,
            "livesplice apply smaps.update || exit 10",
            "echo view:; livesplice view",
            swap,
            "livesplice undo smaps || exit 11",
            swap,
            "lsmod | grep -c livesplice_smaps; echo smaps-left",
        ]
    )
    guest = Guest(prepared_lab(), timeout=300, extra_initrds=[ensure_overlay(prepared_lab().dir)])
    r = guest.run(script, [GuestFile(update, "smaps.update"), *trust_files()])
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()
    # the boot rewrote every paravirt site: matching went through them, not around them
    _, _, hexed, copies = next(ln.split() for ln in lines if ln.startswith("running "))
    running = bytes.fromhex(hexed)
    code = pre.bytes
    for s in pv:
        assert code[s.offset : s.offset + 2] == b"\xff\x15", s  # call *pv_ops+N(%rip)
        assert running[s.offset : s.offset + s.length] != code[s.offset : s.offset + s.length], s
    kb = [int(ln.split()[1]) for ln in lines if ln.startswith("SwapPss:")]
    assert len(kb) == 3, out
    before, applied, undone = kb
    assert before == 0 and undone == 0, out
    assert applied > 0, out  # 1 kB per page table walked through the new code
    assert "smaps" in out[out.index("view:") :], out
    # pfn_swap_entry_to_page (pre code the fix calls) has several copies that all matched:
    # apply went through only because they are interchangeable (test_kernel_paravirt_copies)
    assert int(copies) > 1, out
    assert lines[lines.index("smaps-left") - 1] == "0", out
