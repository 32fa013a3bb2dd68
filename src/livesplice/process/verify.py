"""``create --verify-against``: run-pre matching against shipped binaries, at create time.

An update is built from livesplice's own build of the pre source. Users run the archive's
binaries: built elsewhere (Debian's buildds), stripped, with another build-id, sometimes
under another name (Debian's ``/usr/bin/redis-server`` is a symlink to ``redis-check-rdb``).
Matching the update's pre code against those files when the update is made tells the
security team at once whether the update fits what the archive ships, and records each
matching file's build-id in the target (:class:`livesplice.update.format.Verified`): apply
then recognises the running image by identity, whatever its path.

Inputs are ELF files, directories, or Debian packages (``.deb``, unpacked with
``dpkg-deb -x`` into a private temporary directory; several packages form one tree, as once
installed). A file in a directory or package is tried for a target only when its name, a
symlink's name to it, or its soname is the target's name -- never by its code alone: a
program that merely shares code with the target (redis-benchmark and redis-server share
files) must not be recorded as the target, or apply and the agent would patch it. A file
given on its own is the user's word: it is also tried for the update's only executable.
A file tried whose code does not match is an error: the update does not fit it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import NoMatch, UsageError
from livesplice.process.image import looks_like_elf
from livesplice.update.format import Manifest, Verified


@dataclass
class Candidate:
    """A shipped file that might be a target, with where it came from and the names it goes by."""

    path: Path  # a regular ELF file
    shown: str  # how it is named in reports: "usr/bin/redis-check-rdb"
    origin: str  # the argument it came from (a .deb's file name, or the path)
    names: set[str] = field(default_factory=set)  # its file name and symlinks' names
    explicit: bool = False  # given on its own on the command line


@dataclass
class VerifyReport:
    """What ``--verify-against`` found: which shipped files each target matched, warnings, and
    targets left out."""

    verified: dict[str, list[Verified]]  # target name -> files that matched
    warnings: list[str]
    dropped: list[str] = field(default_factory=list)  # targets left out (only_shipped)


def verify_targets(
    manifest: Manifest, inputs: list[Path], *, only_shipped: bool = False
) -> VerifyReport:
    """Match every process target of ``manifest`` against the files of ``inputs``; record the
    matching files in ``target.verified``.

    ``only_shipped`` (``create --debian``): a target no input file is named like (a test
    program the package builds but does not ship) is left out of the update, with a warning.

    :raises NoMatch: a file named like a target does not match it, or a target matched no
        file at all.
    :raises UsageError: an input does not exist or cannot be unpacked.
    """
    from livesplice.process.image import elf_errors, elf_facts, gnu_build_id
    from livesplice.process.match import match_file

    with _Unpacked(inputs) as candidates:
        report = VerifyReport({}, [])
        problems: list[str] = []
        programs = [t.name for t in manifest.targets if t.kind == "executable"]
        for target in manifest.targets:
            found: dict[str, Verified] = {}  # build-id -> the files that have it
            for c in candidates:
                try:
                    facts = elf_facts(str(c.path))
                except elf_errors():
                    continue
                named = target.name in c.names or target.name == facts.soname
                only_program = c.explicit and programs == [target.name] and not facts.soname
                if not named and not only_program:
                    continue  # only the file the package installs under the target's name
                bid = gnu_build_id(str(c.path))
                if bid and bid in found:  # the same file again (Debian's redis-check-*)
                    v = found[bid]
                    v.file = f"{v.file}, {c.shown}"
                    continue
                try:
                    match = match_file(str(c.path), target, compiler=manifest.compiler)
                except NoMatch as e:
                    problems.append(
                        f"{c.origin}: {c.shown} is {target.name} but its code "
                        f"is not the update's pre code: {e.reason}"
                    )
                    continue
                if not bid:
                    report.warnings.append(
                        f"{c.origin}: {c.shown} matches {target.name} but has no build-id: "
                        "apply finds it by name or by its code only"
                    )
                    continue
                found[bid] = Verified(
                    file=c.shown, build_id=bid, origin=c.origin, functions=len(match.functions)
                )
            named_any = any(target.name in c.names for c in candidates)
            if not found and only_shipped and not named_any:
                report.warnings.append(
                    f"{target.name}: no binary package ships it; left out of the update"
                )
                report.dropped.append(target.name)
                continue
            if not found and not any(target.name in p for p in problems):
                problems.append(
                    f"{target.name}: no given file is named like it (its file "
                    "name, a symlink's name, or its soname)"
                )
            target.verified = sorted(found.values(), key=lambda v: (v.origin, v.file))
            report.verified[target.name] = target.verified
        manifest.targets = [t for t in manifest.targets if t.name not in report.dropped]
        if not manifest.targets:
            problems.append("no target of the update is in the given packages")
        if problems:
            raise NoMatch(
                f"the update does not fit the given binaries ({len(problems)} problem(s))",
                details=problems,
                advice="build the update from the exact source and build configuration of "
                "those binaries (for a Debian package: its source package version and flags)",
            )
        return report


class _Unpacked:
    """The candidates of ``inputs``; unpacked packages are removed on exit."""

    def __init__(self, inputs: list[Path]) -> None:
        self.inputs = inputs
        self.tmp: Path | None = None

    def __enter__(self) -> list[Candidate]:
        plain: list[Candidate] = []
        roots: list[tuple[Path, str]] = []  # (tree, what it came from)
        for arg in self.inputs:
            if not arg.exists():
                raise UsageError(f"--verify-against {arg}: no such file or directory")
            if arg.is_dir():
                roots.append((arg, str(arg)))
            elif arg.name.endswith((".deb", ".ddeb")):
                if self.tmp is None:
                    self.tmp = Path(tempfile.mkdtemp(prefix="livesplice-verify-"))
                dest = self.tmp / str(len(os.listdir(self.tmp)))
                r = subprocess.run(
                    ["dpkg-deb", "-x", str(arg), str(dest)], capture_output=True, text=True
                )
                if r.returncode != 0:
                    raise UsageError(
                        f"--verify-against {arg}: not a Debian package ({r.stderr.strip()[:200]})"
                    )
                roots.append((dest, _deb_label(arg)))
            else:
                plain.append(Candidate(arg, arg.name, str(arg), {arg.name}, explicit=True))
        return plain + _walk(roots)

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _walk(roots: list[tuple[Path, str]]) -> list[Candidate]:
    """Regular ELF files under the roots, with their names and the names of symlinks to
    them. The roots are one file system, as the packages are once installed: Debian's
    /usr/bin/redis-server (package redis-server) links to redis-check-rdb (redis-tools).
    Links are resolved by path inside that union only, never through the host's files."""
    files: dict[str, Candidate] = {}  # path relative to the roots -> its candidate
    links: dict[str, str] = {}  # link path -> its target, both relative to the roots
    for root, origin in roots:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                rel = str(p.relative_to(root))
                if p.is_symlink():
                    target = os.readlink(p)
                    base = "/" if target.startswith("/") else "/" + os.path.dirname(rel)
                    links.setdefault(rel, os.path.normpath(os.path.join(base, target))[1:])
                elif p.is_file() and rel not in files and looks_like_elf(str(p)):
                    files[rel] = Candidate(p, rel, origin, {n})
    for link in sorted(links):
        dest = links[link]
        for _ in range(8):  # a link to a link
            if dest not in links:
                break
            dest = links[dest]
        if dest in files:
            files[dest].names.add(os.path.basename(link))
            files[dest].shown += f" (<- {link})"
    return sorted(files.values(), key=lambda c: c.shown)


def _deb_label(deb: Path) -> str:
    """ "Debian redis-tools 5:7.0.15-1~deb12u7 (amd64)" from the package's control data."""
    r = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    if r.returncode != 0 or "Package" not in fields:
        return deb.name
    from livesplice.build.debian import fetched_by_url

    how = ", fetched by URL: not vouched for by the archive index" if fetched_by_url(deb) else ""
    return (
        f"Debian {fields['Package']} {fields.get('Version', '?')} "
        f"({fields.get('Architecture', '?')}{how})"
    )


def describe(verified: dict[str, list[Verified]]) -> list[str]:
    """One line per verified file, for the create report."""
    return [
        f"{name}: verified against {v.origin}: {v.file} (build-id {v.build_id}, "
        f"{v.functions} pre function(s) matched)"
        for name, vs in verified.items()
        for v in vs
    ]
