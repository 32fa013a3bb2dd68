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
import re
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
    where = str(path) if path is not None else f"update {update.manifest.id}"
    if MODULE_MEMBER not in members or KERNEL_MEMBER not in members:
        raise MalformedUpdate(
            f"{where} is a kernel update without {MODULE_MEMBER}/{KERNEL_MEMBER}",
            advice="make kernel updates with `livesplice create --kernel`",
        )
    try:
        kernel = json.loads(members[KERNEL_MEMBER])
    except (ValueError, RecursionError) as e:
        raise MalformedUpdate(
            f"{where}: {KERNEL_MEMBER} is not JSON ({type(e).__name__})"
        ) from None
    problem = _kernel_json_problem(kernel)
    if problem:
        raise MalformedUpdate(
            f"{where}: {KERNEL_MEMBER} is malformed: {problem}",
            advice="make kernel updates with `livesplice create --kernel`",
        )
    return members[MODULE_MEMBER], kernel


_MODULE_NAME = re.compile(r"livesplice_[a-z0-9_]{1,32}")
_SYMBOL = re.compile(r"[A-Za-z0-9_.$-]{1,256}")


def _kernel_json_problem(kernel: object) -> str:
    """What is wrong with kernel.json ("" if nothing): apply uses ``module`` as a file
    name and the entries of ``funcs``/``klp_symbols`` as symbol names and counts, so each is
    checked before use (the file may be unsigned, under --allow-unsigned)."""
    if not isinstance(kernel, dict):
        return "not an object"
    if not isinstance(kernel.get("module"), str) or not _MODULE_NAME.fullmatch(kernel["module"]):
        return "module is not a livesplice module name"
    if not isinstance(kernel.get("release", ""), str):
        return "release is not a string"
    for key, fields in (
        ("funcs", ("object", "name")),
        ("klp_symbols", ("object", "name")),
        ("ksplice", ("object", "name")),
    ):
        entries = kernel.get(key, [])
        if not isinstance(entries, list) or len(entries) > 65536:
            return f"{key} is not a list"
        for e in entries:
            if not isinstance(e, dict) or not all(
                isinstance(e.get(f), str) and _SYMBOL.fullmatch(e[f]) for f in fields
            ):
                return f"an entry of {key} lacks a valid object/name"
            count = e.get("count", 0)
            if key == "klp_symbols" and (
                not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 1 << 20
            ):
                return "a klp_symbols count is not a small integer"
    return ""
