"""Kernel update files: the usual archive plus the livepatch module.

A kernel update is a normal update file (``manifest.json``, ``patch``; see
:mod:`livesplice.update.archive`) with two more members, which ``read_update`` ignores:

    livepatch.ko     the generated livepatch module (debug info stripped)
    kernel.json      what apply needs beyond the manifest: the module name, the changed
                     functions in ``sympos=`` order, and the klp symbols whose ``sympos``
                     run-pre matching must decide (same-named symbols in the object)

Same determinism rules as the base format: fixed mtime/owner, gzip without a timestamp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from livesplice.errors import MalformedUpdate
from livesplice.update.archive import UpdateFile, write_update
from livesplice.update.format import Manifest

MODULE_MEMBER = "livepatch.ko"
KERNEL_MEMBER = "kernel.json"


def write_kernel_update(
    path: Path,
    manifest: Manifest,
    patch: str,
    module: bytes,
    kernel: dict[str, Any],
    signing_key: Path | None = None,
) -> None:
    """The base archive (same determinism and signing rules) plus the two kernel members."""
    extra = {
        KERNEL_MEMBER: (json.dumps(kernel, sort_keys=True, indent=1) + "\n").encode(),
        MODULE_MEMBER: module,
    }
    write_update(path, manifest, patch, extra=extra, signing_key=signing_key)


def read_kernel_members(
    update: UpdateFile | Path, path: Path | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The module and kernel.json of a kernel update. apply passes the update it already
    read (and signature-checked) in memory, so the file is never read a second time."""
    if isinstance(update, Path):
        from livesplice.update.archive import read_update

        path, update = update, read_update(update)
    members = update.extra
    if MODULE_MEMBER not in members or KERNEL_MEMBER not in members:
        raise MalformedUpdate(
            f"{path} is a kernel update without {MODULE_MEMBER}/{KERNEL_MEMBER}",
            advice="make kernel updates with `livesplice create --kernel`",
        )
    try:
        kernel = json.loads(members[KERNEL_MEMBER])
    except ValueError as e:
        raise MalformedUpdate(f"{path}: {KERNEL_MEMBER} is not JSON ({e})") from e
    return members[MODULE_MEMBER], kernel
