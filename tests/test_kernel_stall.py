"""A kernel update whose transition stalls: a task sleeps inside the function being
replaced. apply must name the blocking task with its stack, give up after the timeout,
and revert cleanly (nothing left loaded); the guest stays healthy.

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost: one create (~10-20 s) + one boot (~10 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel
from test_kernel_features import CASES, _create, lab  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def stall_update(lab: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("kstall")
    return _create(lab.ksrc, CASES / "pipe_read-stall.patch", out, "stall")


def test_stalled_transition_names_the_task_and_reverts(
    lab: LabKernel,  # noqa: F811
    stall_update: Path,
) -> None:
    from livesplice.kernel.overlay import ensure_overlay

    script = "\n".join(
        [
            "(sleep 1000 | cat) &",  # cat sleeps in pipe_read: it cannot switch to the new code
            "sleep 1",
            "livesplice apply --transition-timeout 3 u/stall.update; echo stall-rc=$?",
            "ls /sys/kernel/livepatch | grep -c livesplice; echo patches-after",
            "grep -c '^livesplice_' /proc/modules; echo modules-after",
            "echo hello | cat",  # pipes still work
        ]
    )
    guest = Guest(lab, cpus=1, timeout=200, extra_initrds=[ensure_overlay(lab.dir)])
    r = guest.run(script, [GuestFile(stall_update, "u/stall.update")])
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()

    def before(marker: str) -> str:
        return lines[lines.index(marker) - 1]

    assert "stall-rc=6" in lines, out
    assert "CODE_BUSY" in out and "(cat)" in out and "pipe_read" in out, out
    assert before("patches-after") == "0" and before("modules-after") == "0", out
    assert "hello" in lines, out
