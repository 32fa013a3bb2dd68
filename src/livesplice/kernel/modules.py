"""Loadable modules of the lab kernel for the guest: the .ko files and their dependencies.

The base initramfs has no modules. A test that patches code inside a module (sctp.ko,
psample.ko) adds an extra initrd with the modules it needs, taken from the image package
(``root/lib/modules/<release>/kernel/...``), their dependencies (the ``depends=`` field of
each module's ``.modinfo``, what depmod reads), and a ``modules.dep`` in depmod's format so
busybox ``modprobe NAME`` loads them in order. The package ships no ``modules.dep``: Debian
runs depmod in the image's postinst, which ``dpkg-deb -x`` does not run.

    initrd = modules_initrd(lab, ["sctp", "psample"])
    Guest(lab, extra_initrds=[overlay, initrd]).run("modprobe sctp && lsmod")
"""

from __future__ import annotations

import gzip
import hashlib
import os
from contextlib import suppress
from pathlib import Path

from livesplice.errors import UsageError
from livesplice.kernel.lab import LabKernel


def module_dir(lab: LabKernel) -> Path:
    """The lab kernel's module directory (lib/modules/RELEASE in the unpacked image)."""
    return lab.root / "lib" / "modules" / lab.release


def _canonical(name: str) -> str:
    return name.replace("-", "_")


def module_index(lab: LabKernel) -> dict[str, Path]:
    """Module name (``_`` spelling) -> its .ko in the image package."""
    out: dict[str, Path] = {}
    for ko in sorted((module_dir(lab) / "kernel").rglob("*.ko")):
        out.setdefault(_canonical(ko.name.removesuffix(".ko")), ko)
    return out


def _modinfo(ko: Path) -> list[bytes]:
    """The ``key=value`` fields of a module's ``.modinfo`` section."""
    from livesplice.kernel.elfedit import ElfRel

    elf = ElfRel(ko.read_bytes())
    sec = next((s for s in elf.sections if s.name == ".modinfo"), None)
    return [] if sec is None else [f for f in sec.data.split(b"\0") if f]


def modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` field of a module's ``.modinfo`` section (comma separated)."""
    for field in _modinfo(ko):
        if field.startswith(b"depends="):
            deps = field[len(b"depends=") :].decode()
            return [_canonical(d) for d in deps.split(",") if d]
    return []


def modinfo_softdeps_pre(ko: Path) -> list[str]:
    """Names in ``softdep=pre: ...``: modules (or aliases) the module needs loaded first
    although it links to none of their symbols. libcrc32c's ``pre: crc32c`` is why it fails
    to load on the amd64 flavour (crc32c is a module there) when only ``depends=`` is
    followed: its init cannot find the crc32c algorithm."""
    out: list[str] = []
    for field in _modinfo(ko):
        if field.startswith(b"softdep="):
            words = field[len(b"softdep=") :].decode().split()
            if "pre:" in words:
                for w in words[words.index("pre:") + 1 :]:
                    if w.endswith(":"):  # post: ...
                        break
                    out.append(w)
    return out


def builtin_names(lab: LabKernel) -> set[str]:
    """Names and aliases of code built into the image (``modules.builtin.modinfo``, shipped by
    the image package): a softdep on one of them needs no module. On cloud-amd64 crc32c is
    built in, and the only *module* with that alias, crc32c-intel, fails on the lab's CPU."""
    out: set[str] = set()
    with suppress(OSError):
        for field in (module_dir(lab) / "modules.builtin.modinfo").read_bytes().split(b"\0"):
            mod, _, kv = field.decode(errors="replace").partition(".")
            out.add(_canonical(mod))
            if kv.startswith("alias="):
                out.add(kv.removeprefix("alias="))
    return out


def _provider(index: dict[str, Path], name: str) -> str | None:
    """The module called ``name``, or one whose ``alias=`` is ``name`` (the ``_generic``
    implementation first: it loads on every CPU). None: no module provides it."""
    if _canonical(name) in index:
        return _canonical(name)
    needle = b"\0alias=" + name.encode() + b"\0"
    providers = sorted(n for n, ko in index.items() if needle in ko.read_bytes())
    generic = [n for n in providers if n.endswith("_generic")]
    return (generic or providers)[0] if providers else None


def resolve_modules(lab: LabKernel, names: list[str]) -> list[tuple[str, Path]]:
    """``names`` and everything they depend on, dependencies first."""
    index = module_index(lab)
    builtin = builtin_names(lab)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _canonical(name)
        if name in seen:
            return
        ko = index.get(name)
        if ko is None:
            raise UsageError(
                f"module {name} is not in the {lab.release} image package",
                [f"needed by: {' -> '.join(chain)}"] if chain else [],
                "check the name (`find .../lib/modules -name '*.ko'`); built-in code "
                "(=y in .config) needs no module",
            )
        seen.add(name)
        for dep in _dependencies(index, ko, builtin):
            visit(dep, (*chain, name))
        order.append((name, ko))

    for n in names:
        visit(n, ())
    return order


def _dependencies(index: dict[str, Path], ko: Path, builtin: set[str] | None = None) -> list[str]:
    """Modules to load before ``ko``: its pre-softdeps that are not built in and that some
    module provides, then its ``depends=`` (modules.dep lists both for busybox modprobe,
    which reads no softdeps)."""
    wanted = [n for n in modinfo_softdeps_pre(ko) if not ({n, _canonical(n)} & (builtin or set()))]
    soft = [p for p in (_provider(index, n) for n in wanted) if p]
    return list(dict.fromkeys([*soft, *modinfo_depends(ko)]))


def modules_initrd(lab: LabKernel, names: list[str]) -> Path:
    """A cached gzip'd cpio with the modules (and dependencies) for ``Guest(extra_initrds)``."""
    from livesplice.kernel.initramfs import CpioWriter

    mods = resolve_modules(lab, names)
    base = module_dir(lab)
    digest = hashlib.sha256(
        "\n".join(f"{n}:{ko.stat().st_size}:{ko.stat().st_mtime_ns}" for n, ko in mods).encode()
    ).hexdigest()[:16]
    out = lab.dir / "initramfs" / f"modules-{digest}.cpio.gz"
    if out.exists():
        return out
    guest_base = f"lib/modules/{lab.release}"
    rel = {n: str(ko.relative_to(base)) for n, ko in mods}
    dep_lines = []
    for n, _ko in mods:
        deps = [rel[d] for d in _closure(n, mods)]
        dep_lines.append(f"{rel[n]}:{''.join(' ' + d for d in deps)}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with gzip.open(tmp, "wb", compresslevel=1) as gz:
        w = CpioWriter(gz)
        for n, ko in mods:
            w.parents(f"{guest_base}/{rel[n]}")
            w.host_file(f"{guest_base}/{rel[n]}", ko)
        w.file(f"{guest_base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
        w.close()
    os.replace(tmp, out)
    return out


def _closure(name: str, mods: list[tuple[str, Path]]) -> list[str]:
    """All dependencies of ``name``, in the order modprobe loads them (modules.dep lists
    the direct and indirect ones, the first needed last)."""
    paths = dict(mods)
    index = {n: ko for n, ko in mods}
    out: list[str] = []

    def visit(n: str) -> None:
        for d in _dependencies(index, paths[n]):
            if d not in out:
                visit(d)
                out.append(d)

    visit(name)
    return list(reversed(out))
