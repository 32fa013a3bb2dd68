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

import gzip
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from livesplice.errors import MalformedUpdate, UsageError
from livesplice.update.archive import UpdateFile
from livesplice.update.format import Manifest

MODULE_MEMBER = "livepatch.ko"
KERNEL_MEMBER = "kernel.json"


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(payload))


def write_kernel_update(
    path: Path, manifest: Manifest, patch: str, module: bytes, kernel: dict[str, Any]
) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "manifest.json", manifest.to_json().encode())
        _member(tar, "patch", patch.encode())
        _member(tar, KERNEL_MEMBER, (json.dumps(kernel, sort_keys=True, indent=1) + "\n").encode())
        _member(tar, MODULE_MEMBER, module)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as e:
        raise UsageError(f"cannot write the update to {path}: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(out.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_kernel_members(update: UpdateFile, path: Path) -> tuple[bytes, dict[str, Any]]:
    """The module and kernel.json of a kernel update, from the update already read (and
    signature-checked) in memory -- never from the file again."""
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
