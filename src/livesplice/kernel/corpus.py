"""Real kernel fixes as patches: the diff of some files between two Debian source versions.

``corpus/kernel-public.csv`` (a copy of the shared corpus list) lists CVE fixes by the
files they change between two ``linux-source-<series>`` versions (e.g. 6.1.176-1 ->
6.1.187-1); its schema and reader are :mod:`livesplice.eval.kernel_rows`. The pre side is
the prepared lab tree; the post side is fetched once (``apt-get download``, only the listed
files are extracted from the tarball in ``usr/src``) and cached under
``$LIVESPLICE_CACHE/kernel-source/<version>/``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from livesplice.kernel.debian import LabUnavailable, _series_of, download_package
from livesplice.kernel.lab import cache_root


def source_files(version: str, files: list[str], cache: Path | None = None) -> Path:
    """The root of ``linux-source-<series>`` ``version`` holding at least ``files``."""
    series = _series_of(version)
    base = (cache or cache_root()) / "kernel-source" / version
    root = base / f"linux-source-{series}"
    missing = [f for f in files if not (root / f).exists()]
    if not missing:
        return root
    base.mkdir(parents=True, exist_ok=True)
    deb = download_package(f"linux-source-{series}", version, base)
    tarball = f"./usr/src/linux-source-{series}.tar.xz"
    members = [f"linux-source-{series}/{f}" for f in missing]
    cmd = (
        f"dpkg-deb --fsys-tarfile {deb} | tar -xO {tarball} | tar -xJ -C {base} {' '.join(members)}"
    )
    done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    still = [f for f in missing if not (root / f).exists()]
    if done.returncode != 0 or still:
        raise LabUnavailable(
            f"cannot extract {', '.join(still or missing)} from linux-source-{series} {version}",
            done.stderr.strip().splitlines()[-5:],
        )
    return root


def make_patch(pre_root: Path, post_root: Path, files: list[str]) -> str:
    """``diff -u`` of ``files`` between two trees, ``a/``/``b/`` labels (``patch -p1``)."""
    out = []
    for f in files:
        done = subprocess.run(
            [
                "diff",
                "-u",
                "--label",
                f"a/{f}",
                "--label",
                f"b/{f}",
                str(pre_root / f),
                str(post_root / f),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode > 1:
            raise LabUnavailable(f"diff of {f} failed", done.stderr.splitlines()[-3:])
        out.append(done.stdout)
    return "".join(out)
