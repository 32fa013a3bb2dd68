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

from livesplice.build.debian import fetch_source_version, run, unpack_source
from livesplice.errors import SourceUnavailable, UsageError
from livesplice.eval.corpus import CorpusRow, rules_pinned_tail, series_entries, split_series

# the content of rowdir/trees.done: trees made by an older split are made again
TREES_VERSION = "2 pinned-tail\n"


@dataclass(frozen=True)
class Trees:
    """The pre and post source trees of one fix, and how the Debian patch series was split around
    it."""

    pre: Path
    post: Path
    fix_patch: Path  # empty: the fix touches only debian/
    pre_patches: int
    fix_patches: list[str]
    tail: list[str]  # entries after the fix kept last in both trees (debian/rules pops them)


def fetch_source(row: CorpusRow, cache: Path) -> Path:
    """The .dsc of ``row.package=row.version``, downloaded once into the cache."""
    return fetch_source_version(row.package, row.version, cache)


def install_build_deps(dsc: Path, tree: Path) -> None:
    """``apt-get build-dep`` unless ``dpkg-checkbuilddeps`` is already satisfied."""
    check = subprocess.run(
        ["dpkg-checkbuilddeps"], cwd=tree, capture_output=True, text=True, check=False
    )
    if check.returncode == 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(
        ["apt-get", "build-dep", "-y", "-qq", str(dsc)],
        env=env,
        what=f"apt-get build-dep {dsc.name}",
    )


def quilt_env() -> dict[str, str]:
    """The environment quilt needs to work on a Debian source tree's debian/patches."""
    return dict(os.environ, QUILT_PATCHES="debian/patches", QUILT_PC=".pc")


def apply_series(tree: Path, entries: list[str]) -> None:
    """Trim the tree's series to ``entries`` and push them all with quilt."""
    series = tree / "debian" / "patches" / "series"
    series.write_text("".join(f"{e}\n" for e in entries))
    if entries:
        run(
            ["quilt", "push", "-a", "-q", "--fuzz=0"],
            cwd=tree,
            env=quilt_env(),
            what=f"quilt push in {tree.name}",
        )


def make_trees(row: CorpusRow, dsc: Path, rowdir: Path) -> Trees:
    """pre/ and post/ trees and fix.patch under ``rowdir`` (reused when already made)."""
    pre, post, fix = rowdir / "pre", rowdir / "post", rowdir / "fix.patch"
    base = rowdir / "base"
    done = rowdir / "trees.done"
    if not done.exists() or done.read_text() != TREES_VERSION:
        for d in (pre, post, base):
            shutil.rmtree(d, ignore_errors=True)
        rowdir.mkdir(parents=True, exist_ok=True)
        unpack_source(dsc, base, skip_patches=True)
        series_file = base / "debian" / "patches" / "series"
        if not series_file.exists():
            raise UsageError(f"{row.package} {row.version} has no debian/patches/series")
        rules = base / "debian" / "rules"
        pinned = rules_pinned_tail(rules.read_text(errors="replace")) if rules.exists() else 0
        split = split_series(
            series_file.read_text(), row.first_patch, row.last_patch, pinned_tail=pinned
        )
        shutil.copytree(base, pre, symlinks=True)
        base.rename(post)
        apply_series(pre, split.pre)
        apply_series(post, split.post)
        # diff exits 1 when the trees differ; labels pre/ and post/ strip with -p1
        proc = subprocess.run(
            ["diff", "-ruN", "-x", "debian", "-x", ".pc", "pre", "post"],
            cwd=rowdir,
            capture_output=True,
            check=False,
        )
        if proc.returncode > 1:
            raise SourceUnavailable(
                "diff of the pre and post trees failed",
                details=[proc.stderr.decode(errors="replace")],
            )
        fix.write_bytes(proc.stdout)
        (rowdir / "series-split").write_text(
            "pre:\n"
            + "".join(f"  {e}\n" for e in split.pre[: len(split.pre) - len(split.tail)])
            + "fix:\n"
            + "".join(f"  {e}\n" for e in split.fix)
            + "tail (kept last in both, debian/rules pops them):\n"
            + "".join(f"  {e}\n" for e in split.tail)
        )
        done.write_text(TREES_VERSION)
    return _read_split(rowdir)


def make_shipped_trees(row: CorpusRow, shipped_dsc: Path, fix_dsc: Path, rowdir: Path) -> Trees:
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
        unpack_source(shipped_dsc, pre, skip_patches=True)
        unpack_source(fix_dsc, newer, skip_patches=True)
        series = pre / "debian" / "patches" / "series"
        entries = series_entries(series.read_text()) if series.exists() else []
        newer_series = (newer / "debian" / "patches" / "series").read_text()
        fix_entries = split_series(newer_series, row.first_patch, row.last_patch).fix
        rules = (pre / "debian" / "rules").read_text(errors="replace")
        pinned = min(rules_pinned_tail(rules), len(entries))
        head, tail = entries[: len(entries) - pinned], entries[len(entries) - pinned :]
        shutil.copytree(pre, post, symlinks=True)
        for e in fix_entries:  # a series entry may be in a subdirectory (CVE-X/01-….patch)
            dest = post / "debian" / "patches" / e.split()[0]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(newer / "debian" / "patches" / e.split()[0], dest)
        apply_series(pre, entries)
        apply_series(post, [*head, *fix_entries, *tail])
        shutil.rmtree(newer)
        proc = subprocess.run(
            ["diff", "-ruN", "-x", "debian", "-x", ".pc", "pre", "post"],
            cwd=rowdir,
            capture_output=True,
            check=False,
        )
        if proc.returncode > 1:
            raise SourceUnavailable(
                "diff of the pre and post trees failed",
                details=[proc.stderr.decode(errors="replace")],
            )
        fix.write_bytes(proc.stdout)
        (rowdir / "series-split").write_text(
            "pre:\n"
            + "".join(f"  {e}\n" for e in head)
            + "fix:\n"
            + "".join(f"  {e}\n" for e in fix_entries)
            + "tail (kept last in both, debian/rules pops them):\n"
            + "".join(f"  {e}\n" for e in tail)
        )
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
    return Trees(
        pre=rowdir / "pre",
        post=rowdir / "post",
        fix_patch=rowdir / "fix.patch",
        pre_patches=len(sections.get("pre", [])) + len(sections.get("tail", [])),
        fix_patches=sections.get("fix", []),
        tail=sections.get("tail", []),
    )
