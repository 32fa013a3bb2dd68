"""Debian kernel packages: which ones make up one kernel version, and fetching them.

A Debian kernel version (``6.1.176-1``) is built as an ABI (``6.1.0-50``) per flavour
(``cloud-amd64`` or ``amd64``): ``uname -r`` = ``6.1.0-50-cloud-amd64``. The lab needs four
binary packages of exactly that version: the image (vmlinuz), the flavour's headers (the
complete ``.config``, ``.kernelvariables`` with Debian's build identity, ``Module.symvers``),
the ABI's ``-common`` headers and ``linux-source-6.1`` (the Debian-patched tree as .tar.xz).

``linux-kbuild-6.1`` (fixdep, modpost ... prebuilt) is deliberately not one of them: Debian
keeps it in the archive only for the newest version, so requiring it made every older kernel
unpreparable. The lab never builds against the headers package; ``modules_prepare`` in the
source tree compiles the same host tools from that tree's own ``scripts/``.

The archive drops old ABIs from its index over time, so availability is checked from the
local APT index first and a missing package is a clear error, not a half-prepared cache.
Nothing is installed: packages are downloaded with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into the cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from livesplice.errors import UsageError

DEFAULT_KERNEL = "6.1.176-1"
DEFAULT_FLAVOUR = "cloud-amd64"
#: Flavours the lab knows how to boot under QEMU (both build virtio and ext4 into the image or
#: as modules of the image package).
FLAVOURS = ("cloud-amd64", "amd64")


class LabUnavailable(UsageError):
    """The lab cannot run here: a host tool or a Debian package is missing."""

    abort = "LAB_UNAVAILABLE"


@dataclass(frozen=True)
class KernelPackages:
    """The Debian packages of one kernel version and flavour."""

    version: str  # Debian package version, e.g. 6.1.176-1
    flavour: str  # cloud-amd64 or amd64
    abi: str  # e.g. 6.1.0-50

    @property
    def series(self) -> str:
        """``6.1``: the upstream series naming linux-source-6.1."""
        return ".".join(self.version.split(".")[:2])

    @property
    def release(self) -> str:
        """``uname -r`` of the kernel: ``6.1.0-50-cloud-amd64``."""
        return f"{self.abi}-{self.flavour}"

    @property
    def names(self) -> list[str]:
        """The Debian packages one kernel version is made of (image, headers, common headers,
        source)."""
        return [
            f"linux-image-{self.release}",
            f"linux-headers-{self.release}",
            f"linux-headers-{self.abi}-common",
            f"linux-source-{self.series}",
        ]


def _series_of(version: str) -> str:
    m = re.fullmatch(r"(\d+\.\d+)\.\d+-\S+", version)
    if not m:
        raise UsageError(
            f"not a Debian kernel package version: {version!r}",
            advice=f"use the version of the linux-image package, e.g. {DEFAULT_KERNEL}",
        )
    return m.group(1)


def _apt_cache(*args: str) -> str:
    if shutil.which("apt-cache") is None:
        raise LabUnavailable(
            "apt-cache not found: the kernel lab fetches Debian's kernel packages with APT",
            advice="run the lab on Debian (bookworm) or a derivative with Debian's archive",
        )
    done = subprocess.run(["apt-cache", *args], capture_output=True, text=True)
    return done.stdout


def _madison(names: list[str]) -> dict[str, set[str]]:
    """Package name -> versions present in the APT index (binary ``Packages`` lines only)."""
    found: dict[str, set[str]] = {n: set() for n in names}
    for line in _apt_cache("madison", *names).splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) == 3 and cols[2].endswith("Packages") and cols[0] in found:
            found[cols[0]].add(cols[1])
    return found


def resolve_packages(version: str, flavour: str = DEFAULT_FLAVOUR) -> KernelPackages:
    """Find the ABI of ``version`` in the local APT index and check every package exists.

    :raises LabUnavailable: a package of that exact version is not in the index (any more).
    """
    series = _series_of(version)
    if flavour not in FLAVOURS:
        raise UsageError(
            f"unknown kernel flavour {flavour!r}",
            advice=f"use --flavour {' or --flavour '.join(FLAVOURS)}",
        )
    pattern = rf"^linux-image-{re.escape(series)}\.0-[0-9]+-{re.escape(flavour)}$"
    images = _apt_cache("search", "--names-only", pattern).split("\n")
    names = sorted({line.split(" ")[0] for line in images if line.startswith("linux-image-")})
    versions = _madison(names) if names else {}
    for name, vs in versions.items():
        if version in vs:
            abi = name.removeprefix("linux-image-").removesuffix(f"-{flavour}")
            break
    else:
        available = sorted({v for vs in versions.values() for v in vs})
        raise LabUnavailable(
            f"Debian kernel {version} ({flavour}) is not in the APT index (any more)",
            [f"available {series} {flavour} images: {' '.join(available) or 'none'}"],
            "choose one of the available versions with --kernel; if the list is empty or "
            "old, run apt-get update",
        )
    pkgs = KernelPackages(version, flavour, abi)
    present = _madison(pkgs.names)
    missing = [n for n in pkgs.names if version not in present[n]]
    if missing:
        raise LabUnavailable(
            f"Debian kernel {version}: packages of that version are gone from the archive",
            [f"missing: {n}={version}" for n in missing],
            "choose a version whose image, headers and source are all available "
            "(--kernel), e.g. the newest linux-source version",
        )
    return pkgs


def download_package(name: str, version: str, dest: Path) -> Path:
    """``apt-get download NAME=VERSION`` into ``dest``; returns the .deb (atomic per package).

    ``APT::Sandbox::User=root``: apt downloads as the unprivileged ``_apt`` user by default,
    which cannot write into root's cache directory (apt.conf(5), "APT::Sandbox::User").
    """
    existing = sorted(dest.glob(f"{name}_*.deb"))
    if existing:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", f"{name}={version}"]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise LabUnavailable(
                f"cannot download {name}={version}",
                [" ".join(cmd), *(done.stderr or done.stdout).strip().splitlines()[-10:]],
                "check the network and the APT sources; gone versions need another --kernel",
            )
        target = dest / debs[0].name
        debs[0].replace(target)
    return target


def unpack_deb(deb: Path, root: Path) -> None:
    """``dpkg-deb -x``: the package's files under ``root`` (no maintainer scripts run)."""
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LabUnavailable(
            f"cannot unpack {deb.name}",
            done.stderr.strip().splitlines()[-10:],
            "delete the cache directory and run `livesplice lab prepare` again",
        )
