"""The service's kernel side in the lab: accepted kernel updates re-applied at boot from the
local store (Uptrack's install_on_reboot; what packaging/systemd/livesplice-boot.service runs), not
with ``livesplice=off`` on the kernel command line, and not when the crash guard holds it.

Each boot is a fresh guest whose store is the one the host prepared -- as after a reboot.
Needs the prepared lab (skips with the reason when it cannot run; LIVESPLICE_KERNEL_TESTS=1
makes that a failure). Cost: one kernel update created (~8 s) and three guest boots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel
from test_kernel_target import TRUST, create, trust_files


@pytest.fixture(scope="module")
def lab() -> LabKernel:
    return prepared_lab()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def store(lab: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store (as `upgrade` leaves it) holding one accepted kernel update for the lab kernel."""
    from livesplice.service.client import accepted_from
    from livesplice.service.index import repo_add, repo_init
    from livesplice.service.store import Store

    out = tmp_path_factory.mktemp("kservice")
    update = create(lab, "cmdline-body", out, "kboot")
    key = Path(os.environ["LIVESPLICE_SIGNING_KEY"])
    repo_init(out / "repo", key)
    entry = repo_add(out / "repo", key, update, effective_version=f"{lab.release}+ls1")
    assert entry.kind == "kernel" and entry.build_ids[0].startswith(f"{lab.release}:")
    root = out / "state"
    Store(root).accept(update, accepted_from(entry, str(out / "repo")))
    return root


def boot(lab: LabKernel, store: Path, *, append: str = "") -> str:
    from livesplice.kernel.overlay import ensure_overlay

    script = "\n".join(
        [
            TRUST,
            # the store as the disk would hold it after a reboot (root's, private)
            "cp -r /payload/state /tmp/state && chmod -R go-rwx /tmp/state",
            "export LIVESPLICE_STATE_DIR=/tmp/state LIVESPLICE_ETC=/tmp/etc",
            "livesplice agent --boot --json; echo boot-rc=$?",
            "cat /proc/cmdline",
            "livesplice uname -r",
        ]
    )
    guest = Guest(lab, timeout=150, extra_initrds=[ensure_overlay(lab.dir)], append=append)
    r = guest.run(script, [GuestFile(store, "state"), *trust_files()])
    assert r.status == 0, r.output
    return r.output


def test_kernel_update_reapplied_at_boot_unless_switched_off_or_held(
    lab: LabKernel, store: Path, tmp_path: Path
) -> None:
    out = boot(lab, store)
    assert "boot-rc=0" in out, out
    assert '"id": "kboot"' in out and '"status": "applied"' in out, out
    cmdline = next(line for line in out.splitlines() if line.startswith("console=ttyS0"))
    assert cmdline.endswith(" livesplice-patched"), out
    assert f"{lab.release}+ls1" in out.splitlines(), out  # the effective version

    off = boot(lab, store, append="livesplice=off")
    assert '"event": "disabled"' in off and "livesplice=off" in off, off
    cmdline = next(line for line in off.splitlines() if line.startswith("console=ttyS0"))
    assert not cmdline.endswith(" livesplice-patched"), off
    assert lab.release in off.splitlines(), off

    # the machine crashed while the update was being applied: held at the next boot
    from livesplice.service.store import Store

    crashed = tmp_path / "state"
    shutil.copytree(store, crashed)
    Store(crashed).begin("kboot", "kernel")
    held = boot(lab, crashed)
    assert '"event": "held"' in held and '"id": "kboot"' in held, held
    cmdline = next(line for line in held.splitlines() if line.startswith("console=ttyS0"))
    assert not cmdline.endswith(" livesplice-patched"), held
