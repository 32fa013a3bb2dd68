"""Debian source packages: fetch with apt (cached), split into pre/post trees and a fix patch.

pre = upstream source + debian/patches/series applied up to (excluding) the fix;
post = the same through the fix. In both trees the series is trimmed to the applied patches
and quilt's ``.pc`` is kept, so ``dpkg-buildpackage`` (format "3.0 (quilt)") builds each tree
with exactly that patch set: dpkg-source finds every listed patch applied and applies none.
The fix patch is the difference of the two trees outside ``debian/`` and ``.pc/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from livesplice.errors import LivespliceError, UsageError
from livesplice.eval.corpus import CorpusRow, rules_pinned_tail, series_entries, split_series

# the content of rowdir/trees.done: trees made by an older split are made again
TREES_VERSION = "2 pinned-tail\n"

# deb-src entries for `apt-get source` when the machine has none (Debian 12 images ship
# deb lines only). deb822 format, sources.list(5).
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/livesplice-eval-src.sources")
DEB_SRC_TEXT = """\
# added by livesplice.eval: source packages for the evaluation (apt-get source)
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class SourceUnavailable(LivespliceError):
    abort = "SOURCE_UNAVAILABLE"


@dataclass(frozen=True)
class Trees:
    pre: Path
    post: Path
    fix_patch: Path  # empty: the fix touches only debian/
    pre_patches: int
    fix_patches: list[str]
    tail: list[str]  # entries after the fix kept last in both trees (debian/rules pops them)


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        what: str = "") -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise SourceUnavailable(f"{what or cmd[0]} failed (exit {proc.returncode})",
                                details=[f"$ {' '.join(cmd)}", *tail])
    return proc.stdout


def has_deb_src() -> bool:
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for f in lists:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix in (".list", "") and any(
            line.split()[:1] == ["deb-src"] for line in text.splitlines()
        ):
            return True
        if f.suffix == ".sources" and any(
            line.startswith("Types:") and "deb-src" in line for line in text.splitlines()
        ):
            return True
    return False


def ensure_deb_src() -> None:
    """Add deb-src entries for bookworm and bookworm-security if apt has none."""
    if has_deb_src():
        return
    DEB_SRC_FILE.write_text(DEB_SRC_TEXT)
    run(["apt-get", "update", "-qq"], what="apt-get update")


def fetch_source(row: CorpusRow, cache: Path) -> Path:
    """The .dsc of ``row.package=row.version``, downloaded once into the cache."""
    return fetch_source_version(row.package, row.version, cache)


def _no_epoch(version: str) -> str:
    return version.split(":", 1)[1] if ":" in version else version


def fetch_source_version(package: str, version: str, cache: Path) -> Path:
    """The .dsc of source ``package=version``, downloaded once into the cache: with apt
    (checked against the archive's signed index), else from the pool by URL (versions the
    index no longer lists; see :func:`_pool_fetch`)."""
    where = cache / "downloads" / package
    dsc = where / f"{package}_{_no_epoch(version)}.dsc"
    if dsc.exists():
        return dsc
    where.mkdir(parents=True, exist_ok=True)
    ensure_deb_src()
    spec = f"{package}={version}"
    try:
        run(["apt-get", "source", "--download-only", "-qq", spec], cwd=where,
            what=f"apt-get source {spec}")
    except SourceUnavailable:
        try:
            # the lists may predate the version in the row
            run(["apt-get", "update", "-qq"], what="apt-get update")
            run(["apt-get", "source", "--download-only", "-qq", spec], cwd=where,
                what=f"apt-get source {spec}")
        except SourceUnavailable:
            _pool_fetch(package, dsc.name, where)
            for name, sha in _dsc_files(dsc.read_text()).items():
                _pool_fetch(package, name, where, sha256=sha)
    if not dsc.exists():
        raise SourceUnavailable(f"apt-get source {spec} did not produce {dsc.name}")
    return dsc


POOLS = ("http://deb.debian.org/debian/pool/main",
         "http://deb.debian.org/debian-security/pool/updates/main")


def _pool_fetch(source: str, name: str, where: Path, sha256: str = "") -> Path:
    """Download ``name`` of source package ``source`` from Debian's pools.

    Superseded versions stay in the pool for a while after the index drops them (libcurl4
    7.88.1-10+deb12u14 after deb12u15). NOT checked against a signed index: the .dsc's own
    checksums are checked for the files it lists, nothing vouches for the .dsc itself or for
    a .deb; the evaluation notes it (``unverified`` in the row's result).
    """
    import hashlib

    import requests

    out = where / name
    if out.exists():
        return out
    prefix = source[:4] if source.startswith("lib") else source[0]
    errors = []
    for pool in POOLS:
        url = f"{pool}/{prefix}/{source}/{name}"
        try:
            r = requests.get(url, timeout=60)
        except requests.RequestException as e:
            errors.append(f"{url}: {e}")
            continue
        if r.status_code != 200:
            errors.append(f"{url}: HTTP {r.status_code}")
            continue
        if sha256 and hashlib.sha256(r.content).hexdigest() != sha256:
            raise SourceUnavailable(f"{url}: SHA-256 differs from the .dsc's")
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(r.content)
        tmp.replace(out)
        (where / "UNVERIFIED").open("a").write(f"{name} from {url}\n")
        return out
    raise SourceUnavailable(f"{name} is not in the archive index nor in its pools",
                            details=errors)


def _dsc_files(text: str) -> dict[str, str]:
    """File name -> SHA-256 of a .dsc's Checksums-Sha256 field (deb822, dsc(5))."""
    out: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("Checksums-Sha256:"):
            inside = True
            continue
        if inside and line.startswith(" "):
            sha, _size, name = line.split()
            out[name] = sha
        elif inside:
            break
    return out


def fetch_binaries(row: CorpusRow, cache: Path) -> list[Path]:
    """The amd64 .debs of ``row.binaries`` at ``row.shipped_version``: what users run."""
    where = cache / "downloads" / row.package / "binaries"
    where.mkdir(parents=True, exist_ok=True)
    debs = []
    for pkg in row.binaries.split():
        found = sorted(where.glob(f"{pkg}_*{_no_epoch(row.shipped_version)}_amd64.deb"))
        if not found:
            spec = f"{pkg}={row.shipped_version}"
            try:
                run(["apt-get", "download", "-qq", spec], cwd=where,
                    what=f"apt-get download {spec}")
            except SourceUnavailable:
                _pool_fetch(row.package, f"{pkg}_{_no_epoch(row.shipped_version)}_amd64.deb",
                            where)
            found = sorted(where.glob(f"{pkg}_*{_no_epoch(row.shipped_version)}_amd64.deb"))
        if not found:
            raise SourceUnavailable(f"no .deb of {pkg} {row.shipped_version}")
        debs.append(found[0])
    return debs


def unverified_downloads(row: CorpusRow, cache: Path) -> list[str]:
    """Files of this row fetched from a pool by URL (not through apt's signed index)."""
    out = []
    for d in (cache / "downloads" / row.package, cache / "downloads" / row.package / "binaries"):
        f = d / "UNVERIFIED"
        if f.exists():
            out.extend(f.read_text().splitlines())
    return out


def install_build_deps(dsc: Path, tree: Path) -> None:
    """``apt-get build-dep`` unless ``dpkg-checkbuilddeps`` is already satisfied."""
    check = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, capture_output=True, text=True,
                           check=False)
    if check.returncode == 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "build-dep", "-y", "-qq", str(dsc)], env=env,
        what=f"apt-get build-dep {dsc.name}")


def quilt_env() -> dict[str, str]:
    return dict(os.environ, QUILT_PATCHES="debian/patches", QUILT_PC=".pc")


def apply_series(tree: Path, entries: list[str]) -> None:
    """Trim the tree's series to ``entries`` and push them all with quilt."""
    series = tree / "debian" / "patches" / "series"
    series.write_text("".join(f"{e}\n" for e in entries))
    if entries:
        run(["quilt", "push", "-a", "-q", "--fuzz=0"], cwd=tree, env=quilt_env(),
            what=f"quilt push in {tree.name}")


def make_trees(row: CorpusRow, dsc: Path, rowdir: Path) -> Trees:
    """pre/ and post/ trees and fix.patch under ``rowdir`` (reused when already made)."""
    pre, post, fix = rowdir / "pre", rowdir / "post", rowdir / "fix.patch"
    base = rowdir / "base"
    done = rowdir / "trees.done"
    if not done.exists() or done.read_text() != TREES_VERSION:
        for d in (pre, post, base):
            shutil.rmtree(d, ignore_errors=True)
        rowdir.mkdir(parents=True, exist_ok=True)
        run(["dpkg-source", "--skip-patches", "-x", str(dsc), str(base)],
            what=f"dpkg-source -x {dsc.name}")
        series_file = base / "debian" / "patches" / "series"
        if not series_file.exists():
            raise UsageError(f"{row.package} {row.version} has no debian/patches/series")
        rules = base / "debian" / "rules"
        pinned = rules_pinned_tail(rules.read_text(errors="replace")) if rules.exists() else 0
        split = split_series(series_file.read_text(), row.first_patch, row.last_patch,
                             pinned_tail=pinned)
        shutil.copytree(base, pre, symlinks=True)
        base.rename(post)
        apply_series(pre, split.pre)
        apply_series(post, split.post)
        # diff exits 1 when the trees differ; labels pre/ and post/ strip with -p1
        proc = subprocess.run(
            ["diff", "-ruN", "-x", "debian", "-x", ".pc", "pre", "post"],
            cwd=rowdir, capture_output=True, check=False,
        )
        if proc.returncode > 1:
            raise SourceUnavailable("diff of the pre and post trees failed",
                                    details=[proc.stderr.decode(errors="replace")])
        fix.write_bytes(proc.stdout)
        (rowdir / "series-split").write_text(
            "pre:\n" + "".join(f"  {e}\n" for e in split.pre[:len(split.pre) - len(split.tail)])
            + "fix:\n" + "".join(f"  {e}\n" for e in split.fix)
            + "tail (kept last in both, debian/rules pops them):\n"
            + "".join(f"  {e}\n" for e in split.tail)
        )
        done.write_text(TREES_VERSION)
    return _read_split(rowdir)


def make_shipped_trees(row: CorpusRow, shipped_dsc: Path, fix_dsc: Path,
                       rowdir: Path) -> Trees:
    """A row on shipped binaries: pre = ``row.shipped_version`` exactly as Debian built it
    (its whole series); post = pre plus the fix (``first..last`` of ``row.version``'s
    series), inserted before the entries debian/rules pops (curl's crypto flavours)."""
    pre, post, fix = rowdir / "pre", rowdir / "post", rowdir / "fix.patch"
    done = rowdir / "trees.done"
    stamp = f"shipped {TREES_VERSION}"
    if not done.exists() or done.read_text() != stamp:
        newer = rowdir / "newer"
        for d in (pre, post, newer):
            shutil.rmtree(d, ignore_errors=True)
        rowdir.mkdir(parents=True, exist_ok=True)
        run(["dpkg-source", "--skip-patches", "-x", str(shipped_dsc), str(pre)],
            what=f"dpkg-source -x {shipped_dsc.name}")
        run(["dpkg-source", "--skip-patches", "-x", str(fix_dsc), str(newer)],
            what=f"dpkg-source -x {fix_dsc.name}")
        series = pre / "debian" / "patches" / "series"
        entries = series_entries(series.read_text()) if series.exists() else []
        newer_series = (newer / "debian" / "patches" / "series").read_text()
        fix_entries = split_series(newer_series, row.first_patch, row.last_patch).fix
        rules = (pre / "debian" / "rules").read_text(errors="replace")
        pinned = min(rules_pinned_tail(rules), len(entries))
        head, tail = entries[:len(entries) - pinned], entries[len(entries) - pinned:]
        shutil.copytree(pre, post, symlinks=True)
        for e in fix_entries:
            shutil.copy(newer / "debian" / "patches" / e.split()[0],
                        post / "debian" / "patches" / e.split()[0])
        apply_series(pre, entries)
        apply_series(post, [*head, *fix_entries, *tail])
        shutil.rmtree(newer)
        proc = subprocess.run(["diff", "-ruN", "-x", "debian", "-x", ".pc", "pre", "post"],
                              cwd=rowdir, capture_output=True, check=False)
        if proc.returncode > 1:
            raise SourceUnavailable("diff of the pre and post trees failed",
                                    details=[proc.stderr.decode(errors="replace")])
        fix.write_bytes(proc.stdout)
        (rowdir / "series-split").write_text(
            "pre:\n" + "".join(f"  {e}\n" for e in head) + "fix:\n"
            + "".join(f"  {e}\n" for e in fix_entries)
            + "tail (kept last in both, debian/rules pops them):\n"
            + "".join(f"  {e}\n" for e in tail))
        done.write_text(stamp)
    return _read_split(rowdir)


def _read_split(rowdir: Path) -> Trees:
    """The trees of ``rowdir`` as its series-split file describes them ("pre:", "fix:",
    "tail ...:" headings, each followed by "  entry" lines)."""
    sections: dict[str, list[str]] = {}
    key = ""
    for ln in (rowdir / "series-split").read_text().splitlines():
        if ln.startswith("  "):
            sections.setdefault(key, []).append(ln.split()[0])
        elif ln.strip():
            key = ln.split()[0].rstrip(":")
    return Trees(pre=rowdir / "pre", post=rowdir / "post", fix_patch=rowdir / "fix.patch",
                 pre_patches=len(sections.get("pre", [])) + len(sections.get("tail", [])),
                 fix_patches=sections.get("fix", []), tail=sections.get("tail", []))
