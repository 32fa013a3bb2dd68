"""Build the tree twice, unpatched (pre) and patched (post), and pair up the compiled units.

:func:`build_pair` reads like the list of steps in docs/ARCHITECTURE.md "Contract 1": copy the
tree, install the compiler shims, build, save what was built, patch in place, rebuild
incrementally, pair units, map units to the executables and libraries they went into.

Work directory layout (the caller owns ``workdir`` and deletes it)::

    workdir/tree/             copy of SRCDIR, built in place (pre, then patched, post)
    workdir/shims/            gcc, cc, g++, ..., ar -> wrapper.py
    workdir/tmp/              TMPDIR for the build (nothing is left in /tmp)
    workdir/pre/, post/       saved copies of objects and linked outputs, by tree path
    workdir/build-pre.log     build output; build-pre.jsonl: the wrapper's records
    workdir/build-post.log    ...
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from livesplice.build import wrapper
from livesplice.build.prebuild import CACHE_ENV, BuildSite, PrebuildCache, prebuild_key
from livesplice.build.records import BuildPair, CompileRecord, LinkRecord, UnitPair
from livesplice.errors import BuildFailed, PatchDoesNotApply, UsageError
from livesplice.private import PrivateFileError
from livesplice.progress import ProgressCallback, Stages

Stage = Literal["pre", "post"]

# Names the shims take when the real tool exists in PATH: the compiler drivers a Makefile,
# configure, CMake or debian/rules may call (Debian installs gcc as x86_64-linux-gnu-gcc-12 with
# gcc/gcc-12/x86_64-linux-gnu-gcc links, and dh may call the triplet name), and the archivers.
COMPILER_NAME = re.compile(
    r"^(?:[a-z0-9_]+-linux-gnu-)?(?:gcc|g\+\+|cc|c\+\+|clang|clang\+\+)(?:-\d+(?:\.\d+)*)?$"
)
ARCHIVER_NAME = re.compile(r"^(?:[a-z0-9_]+-linux-gnu-)?(?:gcc-)?ar(?:-\d+(?:\.\d+)*)?$")
ALWAYS_SHIMMED = ("gcc", "cc", "g++", "c++", "ar")

ASM_SOURCE_SUFFIXES = (".s", ".S", ".sx", ".asm")
FAILURE_TAIL_LINES = 40


@dataclass
class ShimDir:
    """The directory of compiler-wrapper shims put first in PATH, with the real tools each shim
    stands for: the wrapper records a compile and then runs exactly the tool the build would
    have found."""

    path: Path
    tools: dict[str, str]  # shim name -> real tool found when the shims were made
    base_env: dict[str, str] = field(default_factory=dict)  # the build's environment


# A clean build environment, as Debian's buildds have (sbuild): its default PATH, the
# locale, and only the variables that control a Debian build. The caller's environment
# otherwise leaks into the build: a pyenv python3 on PATH without the package's
# build-depends failed haproxy's documentation step.
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_KEEP = ("HOME", "USER", "LOGNAME", "SOURCE_DATE_EPOCH")
CLEAN_KEEP_PREFIXES = ("DEB_", "DPKG_")


def caller_environment(clean: bool) -> dict[str, str]:
    """The environment a build starts from: the caller's, or a clean one."""
    if not clean:
        return dict(os.environ)
    env = {
        k: v for k, v in os.environ.items() if k in CLEAN_KEEP or k.startswith(CLEAN_KEEP_PREFIXES)
    }
    env.update(PATH=CLEAN_PATH, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    return env


@dataclass
class SavedCompile:
    """A compile the wrapper recorded, with its source's absolute path (to tell later whether the
    source was deleted by the patch)."""

    record: CompileRecord
    source_abs: str


@dataclass
class SavedLink:
    """A link the wrapper recorded, with a copy of its output saved before the post build
    overwrites it: the diff assigns units to the programs and libraries they end up in."""

    output_abs: str
    saved: Path
    inputs: list[str]
    shared: bool
    relocatable: bool
    argv: list[str]
    cwd: str


@dataclass
class BuildResult:
    """What one build produced, with saved copies (everything keyed by the path the build wrote)."""

    compiles: dict[str, SavedCompile] = field(default_factory=dict)  # built object -> record
    links: dict[str, SavedLink] = field(default_factory=dict)  # output -> link
    archives: dict[str, list[str]] = field(default_factory=dict)  # archive -> member objects
    libtool_objects: dict[str, list[str]] = field(default_factory=dict)  # x.lo -> objects


@dataclass
class AppliedPatch:
    """What applying the patch did: the strip level that worked and the files it changed or
    deleted (the incremental post build is made to see them as newer)."""

    strip: int
    touched: list[str]  # tree-relative paths, in patch order
    deleted: list[str]


def build_pair(
    srcdir: Path,
    patch: Path,
    *,
    build_cmd: str,
    workdir: Path,
    jobs: int,
    progress: ProgressCallback | None = None,
    clean_env: bool = False,
    prebuild: PrebuildCache | None = None,
) -> BuildPair:
    """Build ``srcdir`` unpatched and patched; return the compiled units before and after.

    Units whose compile did not rerun in the post build, and units that recompiled into a
    byte-identical object (a header touched but nothing in this unit changed), have
    ``post=None``: the diff treats both as unchanged. ``progress`` hears the stages
    "pre build", "patch" and "post build" (:mod:`livesplice.progress`). With ``prebuild``
    the pre build of the same tree, command, toolchain and environment is reused when the
    cache has it, and kept for the next create when not (:mod:`livesplice.build.prebuild`).

    :raises BuildFailed: the unpatched or the patched tree does not build (compiler output in
        ``details``).
    :raises UsageError: the build compiled nothing through the compiler wrapper (an
        already-built tree).
    :raises PatchDoesNotApply: the patch does not apply, or is already applied / reversed.

    ``clean_env``: build in a clean environment (:func:`caller_environment`).
    """
    stages = Stages(progress)
    workdir = workdir.resolve()
    patch = patch.resolve()
    patch_text = patch.read_text(errors="surrogateescape")
    base_env = caller_environment(clean_env)
    tools = find_tools(base_env)
    with build_site(srcdir, build_cmd, base_env, tools, workdir, prebuild) as site:
        return build_in(site, srcdir, patch, patch_text, build_cmd, workdir, jobs, stages)


def build_in(
    site: Site,
    srcdir: Path,
    patch: Path,
    patch_text: str,
    build_cmd: str,
    workdir: Path,
    jobs: int,
    stages: Stages,
) -> BuildPair:
    """:func:`build_pair`'s steps, in ``site.path`` (tree/, shims/, tmp/)."""
    tree = site.path / "tree"
    shims = install_shims(site.path / "shims", site.base_env, site.tools)
    (site.path / "tmp").mkdir(exist_ok=True)
    reused = site.cached is not None and site.cached.hit
    with stages.stage("pre build", note="reused from the prebuild cache" if reused else ""):
        if site.cached is not None and site.cached.hit:
            site.cached.restore(tree, workdir)
        else:
            copy_source_tree(srcdir, tree, skip=workdir)
            run_build(build_cmd, tree, shims, workdir, jobs, "pre")
        pre = collect_build(workdir, tree, "pre")
        require_compiled_units(pre, build_cmd)
        if site.cached is not None and not site.cached.hit:
            site.cached.store(tree, workdir)

    with stages.stage("patch"):
        applied = apply_patch_in_place(patch, tree, newest_output_mtime(pre))
    with stages.stage("post build"):
        post = build_post(build_cmd, tree, shims, workdir, jobs, pre, applied)
    units, new_units, removed = pair_units(pre, post, tree)
    links = link_records(pre)
    assign_targets(units, pre)
    touched_sources = {u.source for u in units} | {u.source for u in new_units} | set(removed)
    return BuildPair(
        workdir=workdir,
        units=units,
        links=links,
        compiler=compiler_identity(units, new_units),
        patch_text=patch_text,
        new_units=new_units,
        new_unit_targets=new_unit_targets(new_units, pre, post),
        removed_units=removed,
        changed_asm=[f for f in applied.touched if f.endswith(ASM_SOURCE_SUFFIXES)],
        touched_files=[f for f in applied.touched if f not in touched_sources],
    )


@dataclass
class Site:
    """Where a create builds: ``path`` holds tree/, shims/ and tmp/. ``cached``: the prebuild
    cache's entry when the build runs in one (its fixed path is what lets a cached tree work)."""

    path: Path
    cached: BuildSite | None
    base_env: dict[str, str]  # the environment the build starts from
    tools: dict[str, str]  # shim name -> real tool


@contextlib.contextmanager
def build_site(
    srcdir: Path,
    build_cmd: str,
    base_env: dict[str, str],
    tools: dict[str, str],
    workdir: Path,
    prebuild: PrebuildCache | None,
) -> Iterator[Site]:
    """The prebuild cache's entry for this tree when there is a cache and the entry is free,
    else the work directory. A cached tree is moved into the work directory at the end (so
    ``--keep-tmp`` keeps it; the entry's snapshot is what the next create reuses)."""
    if prebuild is None:
        yield Site(workdir, None, base_env, tools)
        return
    key = prebuild_key(srcdir, build_cmd, tools, base_env)
    with contextlib.ExitStack() as stack:
        try:
            cached = stack.enter_context(prebuild.site(key))
        except PrivateFileError as e:
            raise UsageError(
                f"the prebuild cache {prebuild.root} cannot be trusted: {e}",
                advice="only livesplice's user may be able to write it and every directory "
                f"above it: fix that, point ${CACHE_ENV} elsewhere, or pass "
                "--no-prebuild-cache",
            ) from None
        if cached is None:  # another create of the same tree holds the entry
            yield Site(workdir, None, base_env, tools)
            return
        try:
            yield Site(cached.path, cached, base_env, tools)
        finally:
            with contextlib.suppress(OSError):
                os.rename(cached.path / "tree", workdir / "tree")


def build_post(
    build_cmd: str,
    tree: Path,
    shims: ShimDir,
    workdir: Path,
    jobs: int,
    pre: BuildResult,
    applied: AppliedPatch,
) -> BuildResult:
    """The incremental rebuild of the patched tree, checked to have recompiled what the patch
    changed (else a clean rebuild for dpkg, else :class:`BuildFailed`)."""
    run_build(post_build_command(build_cmd), tree, shims, workdir, jobs, "post")
    post = collect_build(workdir, tree, "post", archives=pre.archives)
    missed = _missed(tree, applied.touched, pre, post, jobs)
    drift = flag_drift(pre, post)
    if (missed or drift) and post_build_command(build_cmd) != build_cmd:
        # dpkg-buildpackage -nc skipped work hidden behind stamps (debian/rules that copy
        # the sources once, build directories made by a stamp target), or something other
        # than the build step recompiled (`make install`, with the Makefile's own flags):
        # build clean instead.
        run_build(build_cmd, tree, shims, workdir, jobs, "post")
        post = collect_build(workdir, tree, "post", archives=pre.archives)
        missed = _missed(tree, applied.touched, pre, post, jobs)
        drift = flag_drift(pre, post)
    if drift and not any(_is_build_file(f) for f in applied.touched):
        # (a patch that edits the build itself changes options on purpose: the diff then
        # shows every function they change)
        raise BuildFailed(
            "the patched tree was compiled with other options than the unpatched one",
            details=drift,
            advice="the update's code must be built exactly like the running code (a lost "
            "-D_FORTIFY_SOURCE or -O level changes every function); options that change on "
            "every build (a -D with the date) make that impossible; use a --build command "
            "that passes the same options on every run",
        )
    if missed:
        raise BuildFailed(
            "the build did not recompile what the patch changed",
            details=[f"{f}: patched, but no unit compiled from it was rebuilt" for f in missed],
            advice="the incremental rebuild missed the patch (stamp files, sources copied by "
            "the build); pass a --build command that rebuilds them, e.g. one that cleans "
            "first; otherwise the update would wrongly say there is nothing to do",
        )
    return post


# ---------------------------------------------------------------------------------------------
# step 1: copy


def copy_source_tree(srcdir: Path, dest: Path, skip: Path | None = None) -> Path:
    """Copy SRCDIR keeping symlinks and mtimes (so make/autotools see the same up-to-date state).

    FIFOs, sockets and device nodes are skipped: reading a FIFO would block the copy. ``skip``
    (the work directory) is not copied when it lies inside SRCDIR: the copy would recurse.
    """
    srcdir = srcdir.resolve()
    if not srcdir.is_dir():
        raise UsageError(f"source tree {srcdir} is not a directory")

    def special_files(directory: str, names: list[str]) -> list[str]:
        skipped = []
        for n in names:
            try:
                mode = os.lstat(os.path.join(directory, n)).st_mode
            except OSError:
                continue
            special = not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))
            if special or (skip is not None and os.path.join(directory, n) == str(skip)):
                skipped.append(n)
        return skipped

    try:
        shutil.copytree(srcdir, dest, symlinks=True, ignore=special_files)
    except (shutil.Error, OSError) as e:
        raise UsageError(f"cannot copy the source tree {srcdir}: {e}") from None
    age_build_outputs(dest)
    return dest


def age_build_outputs(tree: Path) -> None:
    """Make objects, archives and binaries already built in the copy look older than every
    source, so the pre build recompiles them through the wrapper.

    A user's tree is often already built (``make`` was run in it); without this, make sees
    up-to-date objects, compiles nothing, and we could not see a single unit. Nothing is
    deleted: files without a rule to rebuild them stay as they are.
    """
    for root, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    magic = f.read(8)
                if magic.startswith(b"\x7fELF") or magic == b"!<arch>\n":
                    os.utime(path, (0, 0))
            except OSError:
                continue


# ---------------------------------------------------------------------------------------------
# step 2: the compiler wrapper


def find_tools(base_env: dict[str, str]) -> dict[str, str]:
    """The compilers and archivers in the build's PATH: shim name -> real tool (none for
    absent tools, so configure does not find e.g. a ``clang`` that would fail)."""
    path = base_env.get("PATH", os.defpath)
    found: dict[str, str] = {}
    for d in path.split(os.pathsep):
        try:
            names = sorted(os.listdir(d or "."))
        except OSError:
            continue
        for n in names:
            if n in found or not (COMPILER_NAME.match(n) or ARCHIVER_NAME.match(n)):
                continue
            full = os.path.join(d, n)
            if os.access(full, os.X_OK) and not os.path.isdir(full):
                found[n] = full
    for n in ALWAYS_SHIMMED:
        if n not in found:
            real = shutil.which(n, path=path)
            if real:
                found[n] = real
    return found


def install_shims(
    shim_dir: Path, base_env: dict[str, str] | None = None, found: dict[str, str] | None = None
) -> ShimDir:
    """One shell-script shim per tool of :func:`find_tools` (or ``found``) for a build in
    ``base_env`` (default: ours)."""
    base_env = dict(os.environ) if base_env is None else base_env
    shim_dir.mkdir(parents=True, exist_ok=True)
    found = find_tools(base_env) if found is None else found
    wrapper_py = Path(wrapper.__file__).resolve()
    for name, real in found.items():
        shim = shim_dir / name
        shim.write_text(
            "#!/bin/sh\n"
            f"# livesplice shim for {name}: records the call, then runs {real}\n"
            f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(wrapper_py))} "
            f"{shlex.quote(name)} {shlex.quote(real)} {shlex.quote(str(shim_dir))} "
            '"$0" "$@"\n'
        )
        shim.chmod(0o755)
    return ShimDir(shim_dir, found, base_env)


def build_environment(shims: ShimDir, tree: Path, jobs: int, log: Path) -> dict[str, str]:
    """The build's environment with the shims first in PATH and as CC/CXX; TMPDIR beside
    the tree (nothing is left in /tmp)."""
    env = dict(shims.base_env or os.environ)
    # Debug info (and so the GNU build-id) records the directory of each compile; mapping the
    # random work directory away makes the same inputs give a byte-identical update.
    env[wrapper.PREFIX_MAP_ENV] = f"{tree}=."
    env["PATH"] = f"{shims.path}{os.pathsep}{env.get('PATH', os.defpath)}"
    # CMake records these absolute paths in its cache at configure time, so the post build
    # (same workdir, same paths) still goes through the shims.
    env["CC"] = str(shims.path / "gcc") if "gcc" in shims.tools else str(shims.path / "cc")
    env["CXX"] = str(shims.path / "g++") if "g++" in shims.tools else str(shims.path / "c++")
    env[wrapper.LOG_ENV] = str(log)
    env["TMPDIR"] = str(tree.parent / "tmp")
    env.setdefault("MAKEFLAGS", f"-j{jobs}")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(jobs))
    # dh reads parallel=N from DEB_BUILD_OPTIONS (debhelper(7), "parallel")
    opts = [o for o in env.get("DEB_BUILD_OPTIONS", "").split() if not o.startswith("parallel=")]
    env["DEB_BUILD_OPTIONS"] = " ".join([*opts, f"parallel={jobs}"])
    for var in ("CCACHE_DISABLE",):
        env.setdefault(var, "1")  # a cache hit would skip the compile we need to see
    return env


# ---------------------------------------------------------------------------------------------
# steps 3 and 5: build


def run_build(
    build_cmd: str, tree: Path, shims: ShimDir, workdir: Path, jobs: int, stage: Stage
) -> None:
    """Run the project's own build command through the shims, logging every compile and link as
    JSON lines; a failed build raises with the tail of its output."""
    output = workdir / f"build-{stage}.log"
    log = workdir / f"build-{stage}.jsonl"
    log.unlink(missing_ok=True)
    log.touch()
    env = build_environment(shims, tree, jobs, log)
    with output.open("wb") as out:
        proc = subprocess.run(
            ["bash", "-c", build_cmd],
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        what = (
            "the unpatched tree does not build"
            if stage == "pre"
            else ("the patched tree does not build")
        )
        raise BuildFailed(
            f"{what} ({build_cmd!r} exited with status {proc.returncode})",
            details=failure_excerpt(output),
            advice=(
                "fix the build of the original tree first (it must build with the command given "
                "by --build)"
                if stage == "pre"
                else "the patch breaks the build: fix the patch (compiler output above)"
            )
            + f"; rerun with --keep-tmp to keep the full build log ({output})",
        )


def post_build_command(build_cmd: str) -> str:
    """The incremental rebuild: dpkg-buildpackage must not clean the tree (``-nc``), and dh
    must run its build step again: with debian/debhelper-build-stamp left from the first
    build it skips dh_auto_build, and the changed units are recompiled by ``make install``
    with the Makefile's own flags instead of dpkg-buildflags' (seen with tree 2.1.0-1:
    ``-O3`` without ``-D_FORTIFY_SOURCE=2``)."""
    words = shlex.split(build_cmd) if build_cmd.strip() else []
    if "dpkg-buildpackage" in build_cmd and not any(w in ("-nc", "--no-pre-clean") for w in words):
        incremental = re.sub(r"\bdpkg-buildpackage\b", "dpkg-buildpackage -nc", build_cmd, count=1)
        return f"rm -f debian/debhelper-build-stamp; {incremental}"
    return build_cmd


# options that do not change the code of a unit: where its output and dependency files go
_NAMING_OPTIONS = ("-o", "-MF", "-MT", "-MQ")
_NAMING_FLAGS = ("-MD", "-MMD", "-MP", "-M", "-MM", "-c")
# options whose value may be the next word (gcc(1): -D NAME, -include FILE, ...)
_PAIRED = (
    "-D",
    "-U",
    "-I",
    "-include",
    "-imacros",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-x",
    "--param",
    "-Xassembler",
    "-Xpreprocessor",
    "-Xlinker",
    "-MF",
    "-MT",
    "-MQ",
    "-o",
)


def code_options(argv: list[str]) -> list[str]:
    """What of a compile command decides its code: the compiler, its options in order (a
    two-word option as one: ``-D X`` is ``-DX``; the contents of ``@file`` response files
    expanded), with the macro definitions as a sorted set; input and output names and
    dependency-file options left out."""
    words: list[str] = []
    for a in argv[1:]:
        if a.startswith("@") and os.path.isfile(a[1:]):
            try:
                words.extend(shlex.split(Path(a[1:]).read_text(errors="replace")))
                continue
            except (OSError, ValueError):
                pass
        words.append(a)
    joined: list[str] = []
    k = 0
    while k < len(words):
        w = words[k]
        if w in _PAIRED and k + 1 < len(words):
            joined.append(
                w + words[k + 1] if w.startswith("-") and len(w) == 2 else f"{w} {words[k + 1]}"
            )
            k += 2
            continue
        joined.append(w)
        k += 1
    out = [os.path.basename(argv[0]) if argv else ""]
    defines: list[str] = []
    for w in joined:
        if w.startswith(_NAMING_OPTIONS) or w in _NAMING_FLAGS or not w.startswith("-"):
            continue
        (defines if w.startswith(("-D", "-U")) else out).append(w)
    return out + sorted(defines)


_BUILD_FILES = re.compile(
    r"(^|/)(GNUmakefile|[Mm]akefile(\.\w+)?|[^/]*\.mk|CMakeLists\.txt|[^/]*\.cmake|"
    r"configure(\.ac|\.in)?|meson\.build|meson_options\.txt|debian/rules)$"
)


def _is_build_file(path: str) -> bool:
    return bool(_BUILD_FILES.search(path))


def flag_drift(pre: BuildResult, post: BuildResult) -> list[str]:
    """Units the post build compiled with other code options than the pre build."""
    out: list[str] = []
    for built, saved in sorted(post.compiles.items()):
        before = pre.compiles.get(built)
        if before is None:
            continue
        a, b = code_options(before.record.argv), code_options(saved.record.argv)
        if a != b:
            lost = [o for o in a if o not in b]
            added = [o for o in b if o not in a]
            out.append(
                f"{saved.record.source}: lost {' '.join(lost) or '(none)'}; added "
                f"{' '.join(added) or '(none)'}"
                + ("" if lost or added else " (same options, other order)")
            )
    return out


def failure_excerpt(output: Path) -> list[str]:
    """The last ~40 lines; compiler error lines scrolled out of them (make -j) come first."""
    lines = output.read_text(errors="replace").splitlines()
    tail = lines[-FAILURE_TAIL_LINES:]
    earlier = [
        ln
        for ln in lines[:-FAILURE_TAIL_LINES]
        if " error: " in ln or "fatal error:" in ln or "undefined reference" in ln
    ][-20:]
    if earlier:
        return [*earlier, "...", *tail]
    return tail


# ---------------------------------------------------------------------------------------------
# collecting what a build produced


def read_events(log: Path) -> list[dict[str, Any]]:
    """The wrapper's JSON-lines log (one event per compile, link or archive), in the order they
    ran."""
    events = []
    with log.open(encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                events.append(cast(dict[str, Any], json.loads(line)))
    return events


def is_build_system_probe(path: str) -> bool:
    """Compiles and links that configure tools make to probe the compiler, not the program:
    autoconf's ``conftest*``, CMake's CompilerId and try_compile scratch directories."""
    parts = path.split("/")
    return any(
        p in ("CMakeTmp", "CMakeScratch") or p.startswith("CompilerId") for p in parts
    ) or parts[-1].startswith("conftest")


def saved_path(workdir: Path, tree: Path, stage: Stage, built: str) -> Path:
    """Where a build output's copy for ``stage`` is kept: under the work directory, mirroring the
    tree (outputs outside the tree under ``_outside``), so pre copies survive the post build."""
    root = workdir / stage
    try:
        return root / Path(built).relative_to(tree)
    except ValueError:
        return root / "_outside" / built.lstrip("/")


def save_copy(src: str, dest: Path) -> None:
    """Copy a build output (with its times) to its saved place, making the directories."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)


def tree_relative(tree: Path, path: str) -> str:
    """``path`` relative to the tree when inside it (how units are named in updates), else as is."""
    try:
        return Path(path).relative_to(tree).as_posix()
    except ValueError:
        return path


def collect_build(
    workdir: Path, tree: Path, stage: Stage, archives: dict[str, list[str]] | None = None
) -> BuildResult:
    """Replay the wrapper's records; save a copy of every object and linked output that exists
    at the end of the build (what a configure probe made and deleted is dropped).

    ``archives``: archive contents before this build (an incremental rebuild only replaces
    the changed members).
    """
    events = read_events(workdir / f"build-{stage}.jsonl")
    result = BuildResult(archives={a: list(m) for a, m in (archives or {}).items()})
    to_asm: dict[str, tuple[str, str]] = {}  # generated .s -> (C source, language)
    versions: dict[str, str] = {}
    for ev in events:
        kind = ev["kind"]
        if kind == "to_asm":
            to_asm[ev["output"]] = (ev["source"], ev["language"])
        elif kind == "compile":
            built = ev["object"]
            probe = is_build_system_probe(built) or is_build_system_probe(ev["source"])
            if probe or not os.path.isfile(built):
                continue
            source, language = to_asm.get(ev["source"], (ev["source"], ev["language"]))
            saved = saved_path(workdir, tree, stage, built)
            save_copy(built, saved)
            record = CompileRecord(
                source=tree_relative(tree, source),
                object=saved,
                argv=list(ev["argv"]),
                cwd=ev["cwd"],
                compiler=compiler_version(ev["real"], versions),
                language=language,
                built_object=built,
            )
            result.compiles[built] = SavedCompile(record, source)
        elif kind == "link":
            out = ev["output"]
            if is_build_system_probe(out) or not os.path.isfile(out):
                continue
            saved = saved_path(workdir, tree, stage, out)
            save_copy(out, saved)
            result.links[out] = SavedLink(
                out,
                saved,
                list(ev["inputs"]),
                bool(ev["shared"]),
                bool(ev["relocatable"]),
                list(ev["argv"]),
                ev["cwd"],
            )
        elif kind == "archive":
            replay_archive(result.archives, ev["archive"], ev["operation"], ev["members"])
    result.libtool_objects = find_libtool_objects(tree)
    return result


def replay_archive(
    archives: dict[str, list[str]], archive: str, op: str, members: list[str]
) -> None:
    """ar keeps one member per file name: ``r`` replaces by basename, ``q`` appends, ``d``
    deletes (binutils ar manual)."""
    current = archives.setdefault(archive, [])
    if op == "d":
        names = {os.path.basename(m) for m in members}
        current[:] = [m for m in current if os.path.basename(m) not in names]
        return
    for m in members:
        if op == "r":
            current[:] = [c for c in current if os.path.basename(c) != os.path.basename(m)]
        current.append(m)


LIBTOOL_OBJECT = re.compile(r"^(pic_object|non_pic_object)='([^']*)'", re.MULTILINE)


def find_libtool_objects(tree: Path) -> dict[str, list[str]]:
    """libtool's ``x.lo`` is a text file naming the real objects (``pic_object='.libs/x.o'``,
    ``non_pic_object='x.o'``, relative to the .lo's directory; 'none' when not built)."""
    found: dict[str, list[str]] = {}
    for lo in tree.rglob("*.lo"):
        try:
            text = lo.read_text(errors="replace")
        except OSError:
            continue
        if "libtool" not in text:
            continue
        objs = [
            os.path.normpath(os.path.join(lo.parent, m.group(2)))
            for m in LIBTOOL_OBJECT.finditer(text)
            if m.group(2) != "none"
        ]
        found[str(lo)] = objs
    return found


def compiler_version(real: str, cache: dict[str, str]) -> str:
    """First line of ``REAL --version`` ("gcc (Debian 12.2.0-14+deb12u1) 12.2.0"), once per tool."""
    if real not in cache:
        try:
            proc = subprocess.run(
                [real, "--version"], capture_output=True, text=True, check=False, timeout=60
            )
            cache[real] = (proc.stdout.splitlines() or [real])[0].strip()
        except (OSError, subprocess.SubprocessError):
            cache[real] = real
    return cache[real]


def require_compiled_units(pre: BuildResult, build_cmd: str) -> None:
    """Refuse a pre build that compiled nothing through the wrapper: there would be nothing to
    compare, and the usual causes (a tree built before, a hard-coded compiler) have a fix."""
    if not pre.compiles:
        raise UsageError(
            f"the build ({build_cmd!r}) compiled nothing through the compiler wrapper",
            advice="pass a clean source tree (make clean / git clean -fdx): objects already "
            "built in SRCDIR are not rebuilt; a build that hard-codes an absolute compiler path "
            "bypasses the wrapper (use CC/CXX or a compiler from PATH)",
        )


def newest_output_mtime(pre: BuildResult) -> int:
    """The newest mtime of anything the pre build wrote: the patched files are made newer than it
    so the incremental post build recompiles what they touch."""
    paths = [*pre.compiles, *pre.links, *pre.archives]
    return max((os.stat(p).st_mtime_ns for p in paths if os.path.exists(p)), default=0)


# ---------------------------------------------------------------------------------------------
# step 4: patch in place


def apply_patch_in_place(patch: Path, tree: Path, newer_than_ns: int) -> AppliedPatch:
    """``patch --batch --forward`` after a dry run; nothing is touched when the dry run fails.

    The strip level is detected: -p1 (git style a/ b/), then -p0, trying first the level at
    which more of the named files exist (a patch that only creates files "applies" at any level).
    """
    levels = sorted((1, 0), key=lambda p: -count_existing_targets(patch, tree, p))
    attempts: list[tuple[int, str]] = []
    for strip in levels:
        rc, out = run_patch(patch, tree, strip, dry_run=True)
        if rc == 0:
            break
        attempts.append((strip, out))
    else:
        raise patch_failure(patch, attempts)
    rc, out = run_patch(patch, tree, strip, dry_run=False)
    if rc != 0:  # the dry run said yes: only a disk problem gets here
        raise PatchDoesNotApply(
            f"{patch.name}: patch failed after a successful dry run", details=out.splitlines()[-20:]
        )
    touched = patched_files(out)
    deleted = [f for f in touched if not (tree / f).exists()]
    make_newer(tree, [f for f in touched if f not in deleted], newer_than_ns)
    return AppliedPatch(strip, touched, deleted)


def run_patch(patch: Path, tree: Path, strip: int, *, dry_run: bool) -> tuple[int, str]:
    """Run ``patch`` (``dry_run``: only try, to find the strip level without touching the
    tree); returns its exit status and output."""
    argv = [
        "patch",
        "--batch",
        "--forward",
        f"-p{strip}",
        "--no-backup-if-mismatch",
        "-r",
        "-",
        "-i",
        str(patch),
        "-d",
        str(tree),
    ]
    if dry_run:
        argv.append("--dry-run")
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )  # messages parsed below are English
    return proc.returncode, proc.stdout + proc.stderr


PATCH_FILE_NAME = re.compile(r"^(?:\+\+\+|---) (\S+)", re.MULTILINE)


def count_existing_targets(patch: Path, tree: Path, strip: int) -> int:
    """How many of the files the patch names exist in the tree at this strip level: the level
    with most is tried first, as the one the author most likely meant."""
    names = set(PATCH_FILE_NAME.findall(patch.read_text(errors="replace")))
    count = 0
    for n in names:
        parts = n.split("/")[strip:]
        if parts and n != "/dev/null" and (tree / "/".join(parts)).is_file():
            count += 1
    return count


FILE_LINE = re.compile(r"^(?:checking|patching) file (.+)$")
HUNK_FAILED = re.compile(r"^Hunk #(\d+) FAILED at (\d+)")


def unquote_patch_name(name: str) -> str:
    """A file name as patch prints it, without the quotes it adds around names with spaces."""
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return name[1:-1]
    return name


def patch_failure(patch: Path, attempts: list[tuple[int, str]]) -> PatchDoesNotApply:
    """One clear message from GNU patch's dry-run output (the strip level that got furthest)."""

    def missing_files(out: str) -> int:
        return out.count("can't find file to patch")

    strip, out = min(attempts, key=lambda a: (missing_files(a[1]), a[0] != 1))
    problems: list[str] = []
    current = "?"
    for line in out.splitlines():
        if m := FILE_LINE.match(line):
            current = unquote_patch_name(m.group(1))
        elif m := HUNK_FAILED.match(line):
            problems.append(
                f"{patch.name}: hunk #{m.group(1)} of {current} does not apply "
                f"(expected at line {m.group(2)})"
            )
        elif line.startswith("Reversed (or previously applied) patch detected"):
            problems.append(
                f"{patch.name}: the changes to {current} are already in the tree "
                "(the patch is already applied, or reversed)"
            )
    if missing_files(out):
        names = re.findall(r"^\|(?:\+\+\+|---) (\S+)", out, re.MULTILINE)
        wanted = sorted({"/".join(n.split("/")[strip:]) for n in names if n != "/dev/null"})
        problems.append(
            f"{patch.name}: file(s) named by the patch do not exist in the tree: "
            + (", ".join(wanted) or "?")
        )
    if not problems:
        problems.append(f"{patch.name}: patch does not apply")
    return PatchDoesNotApply(
        problems[0],
        details=[*problems[1:], f"patch -p{strip} --dry-run said:", *out.splitlines()[-20:]],
        advice="make the patch against this source tree (the one passed to create)",
    )


def patched_files(out: str) -> list[str]:
    """The files ``patch`` reports it patched, in order and once each."""
    files: list[str] = []
    for line in out.splitlines():
        if (m := FILE_LINE.match(line)) and unquote_patch_name(m.group(1)) not in files:
            files.append(unquote_patch_name(m.group(1)))
    return files


def make_newer(tree: Path, files: Iterable[str], newer_than_ns: int) -> None:
    """make rebuilds only what is strictly NEWER than its target: a patched file must not share
    an mtime with an object built in the same clock tick."""
    for f in files:
        p = tree / f
        st = p.stat()
        if st.st_mtime_ns <= newer_than_ns:
            t = newer_than_ns + 1_000_000
            os.utime(p, ns=(t, t))


# ---------------------------------------------------------------------------------------------
# steps 5 and 6: pairing and link mapping


C_FAMILY_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".C", ".c++", ".m")


def _missed(
    tree: Path, touched: list[str], pre: BuildResult, post: BuildResult, jobs: int
) -> list[str]:
    """Patched sources, and units reading a patched header (build/headerdeps.py), that the
    post build did not compile again."""
    from livesplice.build.headerdeps import headers_not_recompiled

    return sources_not_recompiled(touched, pre, post) + headers_not_recompiled(
        tree, touched, pre, post, jobs
    )


def sources_not_recompiled(touched: list[str], pre: BuildResult, post: BuildResult) -> list[str]:
    """Patched C/C++ sources that units were compiled from in pre but none was recompiled.

    A source counts as compiled from when a pre unit's source has the same path or, for
    builds that compile a copy (expat's debian/rules copies expat/lib/*.c to src/lib/), the
    same file name. Such a source that no post compile touched means the rebuild missed
    the patch, and the diff would wrongly report "nothing to do".
    """
    pre_sources = {s.record.source for s in pre.compiles.values()}
    post_sources = {s.record.source for s in post.compiles.values()}
    missed = []
    for f in touched:
        if not f.endswith(C_FAMILY_SUFFIXES):
            continue
        base = os.path.basename(f)
        compiled_from = {src for src in pre_sources if src == f or os.path.basename(src) == base}
        if compiled_from and not compiled_from & post_sources:
            missed.append(f)
    return missed


def pair_units(
    pre: BuildResult, post: BuildResult, tree: Path
) -> tuple[list[UnitPair], list[CompileRecord], list[str]]:
    """Pair by the object path the build wrote (one source may build several objects: PIC and
    non-PIC with libtool, one per CMake target)."""
    units: list[UnitPair] = []
    removed: list[str] = []
    for built, saved in sorted(pre.compiles.items()):
        rec = saved.record
        if not os.path.exists(saved.source_abs):
            removed.append(rec.source)
            continue
        after = post.compiles.get(built)
        changed = after is not None and (
            after.record.object.read_bytes() != rec.object.read_bytes()
        )
        units.append(UnitPair(rec.source, rec, after.record if changed and after else None, []))
    new_units = [s.record for b, s in sorted(post.compiles.items()) if b not in pre.compiles]
    return units, new_units, sorted(set(removed))


def link_records(pre: BuildResult) -> list[LinkRecord]:
    """The linked programs and libraries of the pre build, as the diff stage needs them (which
    units each contains, how it was linked)."""
    return [
        LinkRecord(
            output=link.saved,
            name=os.path.basename(out),
            kind="shared_library" if link.shared else "executable",
            inputs=link.inputs,
            argv=link.argv,
            cwd=link.cwd,
        )
        for out, link in sorted(pre.links.items())
        if not link.relocatable
    ]


def objects_in(path: str, build: BuildResult, seen: set[str]) -> set[str]:
    """The compiled objects a link input stands for: itself, an archive's members, a libtool
    .lo's objects, or the inputs of a relocatable (-r) link. Shared libraries stand for nothing:
    their units belong to the library's own target."""
    if path in seen:
        return set()
    seen.add(path)
    if path in build.compiles:
        return {path}
    out: set[str] = set()
    link = build.links.get(path)
    nested = (
        build.archives.get(path)
        or build.libtool_objects.get(path)
        or (link.inputs if link is not None and link.relocatable else [])
    )
    for p in nested:
        out |= objects_in(p, build, seen)
    return out


def targets_by_object(build: BuildResult) -> dict[str, list[str]]:
    """Built object -> names of the executables/shared libraries it was linked into."""
    found: dict[str, set[str]] = {}
    for out, link in build.links.items():
        if link.relocatable:
            continue
        for inp in link.inputs:
            for obj in objects_in(inp, build, set()):
                found.setdefault(obj, set()).add(os.path.basename(out))
    return {obj: sorted(names) for obj, names in found.items()}


def assign_targets(units: list[UnitPair], pre: BuildResult) -> None:
    """Give each unit the programs and libraries its object was linked into: an update names the
    target it applies to."""
    by_object = targets_by_object(pre)
    for u in units:
        u.targets = by_object.get(u.pre.built_object, [])


def new_unit_targets(
    new_units: list[CompileRecord], pre: BuildResult, post: BuildResult
) -> dict[str, list[str]]:
    """Targets of units only the patched build has, from the state after the post build: the
    pre links and archives, updated by what the post build relinked and re-archived."""
    if not new_units:
        return {}
    after = BuildResult(
        compiles={**pre.compiles, **post.compiles},
        links={**pre.links, **post.links},
        archives=post.archives,  # replayed on top of the pre archives (collect_build)
        libtool_objects=post.libtool_objects,
    )
    by_object = targets_by_object(after)
    return {n.built_object: by_object.get(n.built_object, []) for n in new_units}


# ---------------------------------------------------------------------------------------------
# step 7: compiler identity


def comment_strings(obj: Path) -> list[str]:
    """The producer strings in ``.comment`` (gcc: "GCC: (Debian 12.2.0-14+deb12u1) 12.2.0")."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with obj.open("rb") as f:
            sec = ELFFile(f).get_section_by_name(".comment")
            data: bytes = sec.data() if sec is not None else b""
    except (ELFError, OSError):
        return []
    return [s.decode("utf-8", "replace") for s in data.split(b"\0") if s]


def compiler_identity(units: list[UnitPair], new_units: list[CompileRecord]) -> str:
    """The ``.comment`` of the changed units' post objects (else of any unit); several distinct
    compilers are joined with "; " so a mixed build is visible, not hidden."""
    changed = [u.post.object for u in units if u.post is not None] + [n.object for n in new_units]
    for candidates in (changed, [u.pre.object for u in units]):
        seen: list[str] = []
        for obj in candidates:
            for s in comment_strings(obj):
                if s not in seen:
                    seen.append(s)
        if seen:
            return "; ".join(seen)
    return "unknown"
