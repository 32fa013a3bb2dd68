"""Shared by the kernel lab tests: skip clearly when the lab cannot run, or fail when forced.

The QEMU tests skip, with the reason, when the host tools or the Debian packages are not
available; LIVESPLICE_KERNEL_TESTS=1 turns those skips into failures (CI with the lab set up).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import pytest

FORCED = os.environ.get("LIVESPLICE_KERNEL_TESTS") == "1"


def kernel_unavailable(reason: str) -> NoReturn:
    if FORCED:
        pytest.fail(f"LIVESPLICE_KERNEL_TESTS=1 but {reason}")
    pytest.skip(f"{reason} (set LIVESPLICE_KERNEL_TESTS=1 to make this a failure)")


def prepared_lab():  # type: ignore[no-untyped-def]
    """The default lab kernel, prepared once (cached): a LabKernel."""
    from livesplice.kernel.debian import LabUnavailable
    from livesplice.kernel.lab import missing_host_tools, prepare_lab

    missing = missing_host_tools()
    if missing:
        kernel_unavailable(
            f"kernel lab host tools missing: {', '.join(missing)}; run scripts/bootstrap-kernel.sh"
        )
    try:
        return prepare_lab(progress=lambda msg: print(f"lab prepare: {msg}", file=sys.stderr))
    except LabUnavailable as e:
        kernel_unavailable(e.render())
