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
from typing import Required, TypedDict, cast

from livesplice.errors import MalformedUpdate
from livesplice.update.archive import UpdateFile, write_update
from livesplice.update.format import Manifest

MODULE_MEMBER = "livepatch.ko"
KERNEL_MEMBER = "kernel.json"


class KernelFunction(TypedDict):
    """A replaced function as kernel.json names it: livepatch addresses a function by its
    object (``vmlinux`` or a module) and name, so that pair is all apply needs."""

    object: str
    name: str


class KlpSymbolEntry(TypedDict):
    """A symbol the module reaches through a klp relocation whose ``sympos`` apply decides
    (:class:`livesplice.kernel.klp.KlpSymbol`, as JSON)."""

    object: str
    name: str
    count: int  # same-named symbols in the object, as create counted them
    key: str  # the update's symbol key: where matching learned its address
    learn: list[str | int] | None  # [section key, offset]: learned inside a section


class KernelJson(TypedDict, total=False):
    """kernel.json: what apply needs beyond the manifest. A TypedDict rather than a class
    because it is the JSON itself (written by create, checked by :func:`read_kernel_members`
    before any field is used); older updates lack the optional keys."""

    module: Required[str]  # livesplice_<id>: the module and its /sys/kernel/livepatch name
    release: str  # uname -r of the tree it was built against ("" unknown)
    funcs: list[KernelFunction]  # livepatch path, in sympos= order
    ksplice: list[KernelFunction]  # Ksplice path, in ksplice_addr= order
    klp_symbols: list[KlpSymbolEntry]


def write_kernel_update(
    path: Path,
    manifest: Manifest,
    patch: str,
    module: bytes,
    kernel: KernelJson,
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
) -> tuple[bytes, KernelJson]:
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
    return members[MODULE_MEMBER], cast(KernelJson, kernel)


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
            if key == "klp_symbols":
                problem = _klp_symbol_problem(e)
                if problem:
                    return problem
    return ""


def _klp_symbol_problem(e: dict[str, object]) -> str:
    """What is wrong with one klp_symbols entry beyond its object/name ("" if nothing):
    matching compares ``count``, looks ``key`` up and adds ``learn``'s offset to an address."""
    count = e.get("count")
    if not _small_int(count):
        return "a klp_symbols count is not a small integer"
    if not isinstance(e.get("key"), str):
        return "a klp_symbols entry has no key"
    learn = e.get("learn")
    if learn is not None and not (
        isinstance(learn, list)
        and len(learn) == 2
        and isinstance(learn[0], str)
        and _small_int(learn[1])
    ):
        return "a klp_symbols learn is not [section key, offset]"
    return ""


def _small_int(value: object) -> bool:
    """A non-negative int below 2**20 (JSON's true/false are ints to Python: not these)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 20
