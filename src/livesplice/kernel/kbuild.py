"""Build stage of ``create --kernel``: compile only the changed units, pre and post, with kbuild.

The prepared tree (KSRC, e.g. the lab's cache) is never written to: the work happens in a
hard-link copy (``cp -al``, 1.5 s for 1.5 GB). A hard-linked file must never be modified in
place, and both GNU patch and kbuild's tools can write through an existing inode (objtool
rewrites objects in place; ``printf > .x.o.cmd`` truncates), so before the first ``make`` the
copy gets private inodes for every build output already present and for every file the patch
touches. Sources that are only read stay shared.

Per changed unit ``dir/unit.c`` the build runs ``make dir/unit.o`` with
``KCFLAGS=-ffunction-sections -fdata-sections`` (one section per function and object: the
diff's unit of comparison) once before and once after applying the patch. A changed header
recompiles every unit that includes it, directly or through other headers: candidates from
the tree's transitive ``#include`` graph (kbuild's ``.cmd`` dependency files only exist for
units built before), then only those whose ``.cmd`` from the pre build names a changed file
are compiled again (the compiler's own record; the others cannot have changed).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import BuildFailed, PatchDoesNotApply, PatchRefused, UsageError

SECTION_FLAGS = "-ffunction-sections -fdata-sections"

# build outputs a make in the copy may rewrite in place: give them private inodes first
_BUILD_OUTPUT = re.compile(r"(\.o|\.a|\.ko|\.mod|\.mod\.c|\.cmd|\.d|\.order|\.symvers|\.tmp)$")
_PRIVATE_DIRS = ("include/generated", "include/config", "arch/x86/include/generated")


@dataclass
class KernelUnit:
    """One compiled kernel unit before and after the patch."""

    source: str  # "fs/proc/cmdline.c"
    pre: Path  # saved pre object
    post: Path | None  # saved post object; None when byte-identical (unchanged)
    module: str | None  # KBUILD_MODNAME when built as part of a loadable module, else None


@dataclass
class KernelBuild:
    """What the kernel build stage hands the diff: the changed units (pre and post objects), the
    compiler, and the units this configuration does not build."""

    tree: Path  # the work copy (patched at the end)
    units: list[KernelUnit]
    compiler: str  # from the objects' .comment
    touched: list[str]  # files the patch touches
    seconds: dict[str, float] = field(default_factory=dict)
    # units the patch changes that this configuration does not build, with the reason
    not_built: list[str] = field(default_factory=list)


def touched_files(patch_text: str) -> list[str]:
    """Paths (relative, ``-p1``) of the files a unified diff changes, creates or deletes."""
    out: list[str] = []
    for line in patch_text.splitlines():
        if line.startswith("+++ ") or line.startswith("--- "):
            path = line[4:].split("\t")[0].strip()
            if path == "/dev/null":
                continue
            parts = path.split("/", 1)
            rel = parts[1] if len(parts) == 2 else parts[0]
            if rel not in out:
                out.append(rel)
    return out


def make_env(ksrc: Path) -> dict[str, str]:
    """Debian's build identity when KSRC is a lab tree (kernel.json beside it), else as is."""
    from livesplice.kernel.lab import LabKernel, _read_packages

    pkgs = _read_packages(ksrc.parent)
    env = LabKernel(pkgs, ksrc.parent).make_env() if pkgs else dict(os.environ)
    env.pop("MAKEFLAGS", None)
    return env


def check_prepared(ksrc: Path) -> None:
    """Refuse a tree that is not prepared (kbuild would start building the whole kernel, or fail
    late)."""
    for need in (".config", "Makefile", "include/generated/autoconf.h", "scripts/mod/modpost"):
        if not (ksrc / need).exists():
            raise UsageError(
                f"{ksrc} is not a prepared kernel tree (no {need})",
                advice="prepare it like the running kernel: its .config, then "
                "`make modules_prepare` (or use `livesplice lab prepare`)",
            )


def copy_tree(ksrc: Path, dest: Path) -> None:
    """Hard-link copy of KSRC; build outputs and generated files get private inodes."""
    done = subprocess.run(["cp", "-al", str(ksrc), str(dest)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildFailed(f"cannot copy {ksrc}", done.stderr.splitlines()[-5:])
    for d in _PRIVATE_DIRS:
        for root, _dirs, files in os.walk(dest / d):
            for f in files:
                break_link(Path(root) / f)
    for root, dirs, files in os.walk(dest):
        dirs[:] = [x for x in dirs if x not in (".git", "Documentation")]
        for f in files:
            if _BUILD_OUTPUT.search(f) or f.startswith(".tmp"):
                break_link(Path(root) / f)
    # tools kbuild may rebuild in a fresh tree (objtool, resolve_btfids, fixdep, modpost)
    for sub in ("tools/objtool", "tools/bpf/resolve_btfids", "scripts/basic", "scripts/mod"):
        for root, _dirs, files in os.walk(dest / sub):
            for f in files:
                break_link(Path(root) / f)


def author_headers() -> list[Path]:
    """The headers a kernel patch may include as ``<livesplice/NAME>``: shadow.h (this
    package) and the hook macros of the repository's include/livesplice.h."""
    here = Path(__file__).parent / "include" / "livesplice"
    found = sorted(here.glob("*.h"))
    repo = Path(__file__).resolve().parents[3] / "include" / "livesplice.h"
    if repo.exists():
        found.append(repo)
    return found


def install_author_headers(tree: Path) -> None:
    """Place the author headers in the copy under include/livesplice/ (never in KSRC)."""
    dest = tree / "include" / "livesplice"
    dest.mkdir(exist_ok=True)
    for h in author_headers():
        shutil.copyfile(h, dest / h.name)


def break_link(path: Path) -> None:
    """Give ``path`` its own inode (same content, mode and mtime)."""
    if path.is_symlink() or not path.is_file() or path.stat().st_nlink < 2:
        return
    tmp = path.with_name(path.name + ".livesplice-copy")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def apply_patch(tree: Path, patch: Path, touched: list[str]) -> None:
    """Apply the patch to the work copy, breaking hard links to the shared tree first so the
    prepared tree is never patched through a shared inode."""
    for rel in touched:
        break_link(tree / rel)
    cmd = [
        "patch",
        "-p1",
        "--forward",
        "--batch",
        "--no-backup-if-mismatch",
        "-d",
        str(tree),
        "-i",
        str(patch.resolve()),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PatchDoesNotApply(
            "the patch does not apply to the kernel tree",
            (done.stdout + done.stderr).splitlines()[-15:],
            "make the patch against the source of the running kernel",
        )


def units_for(tree: Path, touched: list[str]) -> list[str]:
    """C units to compile: touched .c files, plus units including a touched header."""
    units: list[str] = []
    headers: list[str] = []
    for rel in touched:
        if rel.endswith(".c"):
            units.append(rel)
        elif rel.endswith(".h"):
            headers.append(rel)
    index = include_index(tree) if headers else {}
    for h in headers:
        for user in header_users(tree, h, index):
            if user not in units:
                units.append(user)
    return units


#: Directories kbuild passes with ``-I`` to every unit (x86): ``<x/y.h>`` is looked up there.
_INCLUDE_DIRS = (
    "include",
    "arch/x86/include",
    "arch/x86/include/generated",
    "include/uapi",
    "arch/x86/include/uapi",
    "arch/x86/include/generated/uapi",
    "include/generated/uapi",
)
_INCLUDE_LINE = r'^\s*#\s*include\s*[<"][^>"]+[>"]'


def include_index(tree: Path) -> dict[str, list[tuple[str, bool]]]:
    """Spelling in ``#include`` -> the files (``.c`` and ``.h``) that use it, with whether
    they use the quoted form. One ``grep`` over the tree (~2-7 s): the includers of every
    header, direct or not, are looked up here instead of grepping once per header."""
    cmd = [
        "grep",
        "-rEo",
        "--include=*.c",
        "--include=*.h",
        "--exclude-dir=Documentation",
        "--exclude-dir=tools",
        "--exclude-dir=samples",
        "--exclude-dir=.git",
        _INCLUDE_LINE,
        ".",
    ]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, errors="replace")
    index: dict[str, list[tuple[str, bool]]] = {}
    for line in done.stdout.splitlines():
        path, _, directive = line.partition(":")
        m = re.search(r'([<"])([^>"]+)[>"]', directive)
        if m:
            index.setdefault(m.group(2), []).append((path.removeprefix("./"), m.group(1) == '"'))
    return index


def direct_includers(index: dict[str, list[tuple[str, bool]]], header: str) -> set[str]:
    """Files whose ``#include`` resolves to ``header``: ``<x/y.h>`` through an include
    directory, ``"y.h"`` relative to the includer (or through the include directories, as gcc
    falls back). Over-approximates (a spelling two directories share counts for both): an
    extra unit costs a compile, a missed one an unsafe update."""
    out: set[str] = set()
    for d in _INCLUDE_DIRS:
        if header.startswith(d + "/"):
            out.update(f for f, _quoted in index.get(header.removeprefix(d + "/"), []))
    name = Path(header).name
    for spelled, users in index.items():
        if spelled != name and not spelled.endswith("/" + name):
            continue
        for f, quoted in users:
            if quoted and os.path.normpath(os.path.join(os.path.dirname(f), spelled)) == header:
                out.add(f)
    return out


def header_users(
    tree: Path, header: str, index: dict[str, list[tuple[str, bool]]] | None = None
) -> list[str]:
    """Units that include ``header``, directly or through any chain of other headers.

    kbuild's ``.cmd`` dependency files would say it exactly, but a prepared tree has them only
    for the few objects ``modules_prepare`` built; so the candidates come from the transitive
    ``#include`` graph (a superset), and :func:`unit_depends_on` narrows them with the
    ``.cmd`` file the pre build writes. A header-only change to an inline function reaches
    every unit that can see it.
    """
    index = include_index(tree) if index is None else index
    seen = {header}
    todo = [header]
    units: set[str] = set()
    while todo:
        for f in direct_includers(index, todo.pop()):
            if f.endswith(".c"):
                units.add(f)
            elif f not in seen:
                seen.add(f)
                todo.append(f)
    return sorted(u for u in units if _is_built(tree, u))


def cmd_dependencies(tree: Path, unit: str) -> set[str] | None:
    """The files the compiler read for ``unit`` (``source_`` and ``deps_`` of kbuild's
    ``dir/.unit.o.cmd``, from gcc's -MMD), relative to the tree; None when there is none."""
    obj = Path(unit).with_suffix(".o")
    cmd = tree / obj.parent / f".{obj.name}.cmd"
    try:
        text = cmd.read_text(errors="replace")
    except OSError:
        return None
    deps: set[str] = set()
    in_deps = False
    for line in text.splitlines():
        if line.startswith("source_"):
            deps.add(line.partition(":=")[2].strip())
        elif line.startswith("deps_"):
            in_deps = True
        elif in_deps:
            item = line.strip().removesuffix("\\").strip()
            if not line.startswith((" ", "\t")):
                in_deps = False
            elif item and not item.startswith("$(wildcard"):
                deps.add(
                    os.path.normpath(os.path.relpath(item, tree) if item.startswith("/") else item)
                )
    return deps


def unit_depends_on(tree: Path, unit: str, files: list[str]) -> bool:
    """Did the compiler read any of ``files`` for ``unit`` (its ``.cmd`` file)? True when
    unknown: only the compiler's own record may rule a unit out."""
    deps = cmd_dependencies(tree, unit)
    return deps is None or any(os.path.normpath(f) in deps for f in files)


def _is_built(tree: Path, unit: str) -> bool:
    """Is ``unit`` named by the Makefile of its directory or of a directory above it
    (``dccp-y += ccids/lib/tfrc.o`` in net/dccp/Makefile names net/dccp/ccids/lib/tfrc.c,
    whose directory has no Makefile)? Whether the configuration builds it is
    :func:`not_configured`."""
    obj = Path(unit).with_suffix(".o")
    for parent in obj.parents:
        if str(parent) == ".":
            break
        rel = str(obj.relative_to(parent))
        for name in ("Makefile", "Kbuild"):
            with contextlib.suppress(OSError):
                if re.search(
                    rf"(^|[\s=]){re.escape(rel)}(\s|$)",
                    (tree / parent / name).read_text(errors="replace"),
                    re.M,
                ):
                    return True
    return False


def _config(tree: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (tree / ".config").read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _makefile_lines(path: Path) -> list[str]:
    """Makefile/Kbuild lines with backslash continuations joined."""
    text = ""
    for name in ("Kbuild", "Makefile"):
        if (path / name).exists():
            text += (path / name).read_text(errors="replace") + "\n"
    return re.sub(r"\\\n", " ", text).splitlines()


_ASSIGN = re.compile(
    r"^\s*([A-Za-z0-9_.-]+?)-(\$\((CONFIG_[A-Za-z0-9_]+)\)|y|m|objs)\s*[:+]?=(.*)$"
)


def not_configured(tree: Path, unit: str) -> str | None:
    """Why kbuild would not build ``unit`` in this configuration, or None when it would.

    Follows the kbuild lists: ``obj-$(CONFIG_X) += unit.o``, a composite object
    (``foo-$(CONFIG_Y) += unit.o``, ``foo-objs := unit.o``; then foo.o itself), and the
    directory (``obj-$(CONFIG_Z) += dir/`` in the parent Makefile) up to the top level,
    whose directories are always descended (Makefile, Kbuild). ``make dir/unit.o`` compiles
    a unit whatever the configuration says, so create must ask first.
    """
    config = _config(tree)

    def cond(var: str | None) -> str | None:
        if var is None or config.get(var) in ("y", "m"):
            return None
        return f"{var} is not set"

    def obj_reason(directory: Path, obj: str, depth: int = 0) -> str | None:
        if depth > 4:
            return None
        reasons: list[str] = []
        for line in _makefile_lines(tree / directory):
            m = _ASSIGN.match(line)
            if m is None or obj not in m.group(4).split():
                continue
            prefix, var = m.group(1), m.group(3)
            why = cond(var)
            if why is None and prefix not in ("obj", "lib", "core", "drivers", "libs"):
                why = obj_reason(directory, prefix + ".o", depth + 1)
            if why is None:
                return dir_reason(directory)
            reasons.append(why)
        return reasons[0] if reasons else None  # unknown spelling: let kbuild decide

    def dir_reason(directory: Path) -> str | None:
        parent = directory.parent
        if parent == Path(".") or str(directory) in (".", ""):
            return None
        return obj_reason(parent, directory.name + "/")

    return obj_reason(Path(unit).parent, Path(unit).with_suffix(".o").name)


def compile_units(tree: Path, units: list[str], env: dict[str, str], jobs: int, log: Path) -> None:
    """Compile just these units with kbuild, with function and data sections (their old objects
    removed first, so make cannot skip them)."""
    if not units:  # make with no target would build the whole kernel
        return
    objs = [str(Path(u).with_suffix(".o")) for u in units]
    for o in objs:  # force the rebuild; never through a shared inode
        (tree / o).unlink(missing_ok=True)
    cmd = ["make", "-C", str(tree), f"-j{jobs}", f"KCFLAGS={SECTION_FLAGS}", *objs]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = done.stdout.decode(errors="replace")
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{text}\n")
    if done.returncode != 0:
        raise BuildFailed(
            "kbuild failed to compile the changed units",
            [" ".join(cmd), *text.splitlines()[-25:]],
            f"full log: {keep_log(log)}",
        )


def keep_log(log: Path) -> Path:
    """A copy of ``log`` that outlives the build's work directory, for the error to name.

    ``log`` lives in create's temporary directory, removed before the error reaches the
    user; naming it sent users to a file that no longer exists (issue 12). The copy is made
    with mkstemp (mode 0600, a fresh name) because /tmp is shared with untrusted users.
    """
    import tempfile

    fd, name = tempfile.mkstemp(prefix="livesplice-kbuild-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        try:
            out.write(log.read_bytes())
        except OSError as e:
            out.write(f"(build log {log} unreadable: {e})\n".encode())
    return Path(name)


def module_of(tree: Path, unit: str) -> str | None:
    """KBUILD_MODNAME of a unit built for a loadable module (-DMODULE), None if built in."""
    obj = tree / Path(unit).parent / f".{Path(unit).stem}.o.cmd"
    try:
        cmdline = obj.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    if " -DMODULE " not in cmdline + " ":
        return None
    m = re.search(r"-DKBUILD_MODNAME='\"([^\"]+)\"'", cmdline)
    return m.group(1) if m else None


def object_compiler(obj: Path) -> str:
    """The compiler that made an object, from its .comment section: the update records it and
    apply warns about another."""
    from elftools.elf.elffile import ELFFile

    with obj.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(".comment")
        raw: bytes = sec.data() if sec is not None else b""
    return raw.strip(b"\0").split(b"\0")[0].decode(errors="replace")


def build_kernel_pair(
    ksrc: Path, patch: Path, patch_text: str, workdir: Path, *, jobs: int = 2
) -> KernelBuild:
    """Copy KSRC, compile the changed units, apply the patch, compile them again."""
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    check_prepared(ksrc)
    touched = touched_files(patch_text)
    asm = [t for t in touched if t.endswith((".S", ".s"))]
    if asm:
        raise PatchRefused(
            "the patch changes assembly sources",
            [
                f"{a}: assembly source changed [rule: asm files]: livesplice correlates "
                "compiler output only; move the change into C code"
                for a in asm
            ],
        )
    tree = workdir / "tree"
    copy_tree(ksrc, tree)
    install_author_headers(tree)
    seconds["copy"] = time.monotonic() - t0
    units = units_for(tree, touched)
    new_units = [u for u in units if not (tree / u).exists()]
    units = [u for u in units if u not in new_units]
    not_built = [(u, not_configured(tree, u)) for u in units]
    skipped = [f"{u}: not built in this configuration ({why})" for u, why in not_built if why]
    units = [u for u, why in not_built if why is None]
    if skipped and not units and not new_units:
        return KernelBuild(
            tree=tree,
            units=[],
            compiler="",
            touched=touched,
            seconds={"copy": seconds["copy"]},
            not_built=skipped,
        )
    if not units and not new_units:
        raise PatchRefused(
            "the patch changes no C unit of the kernel",
            [f"touched: {t}" for t in touched] or ["the patch touches no file"],
        )
    env = make_env(ksrc)
    log = workdir / "build.log"
    (workdir / "pre").mkdir()
    (workdir / "post").mkdir()
    t1 = time.monotonic()
    if units:
        compile_units(tree, units, env, jobs, log)
    pre = {u: _save(tree, u, workdir / "pre") for u in units}
    modules = {u: module_of(tree, u) for u in units}
    seconds["pre"] = time.monotonic() - t1
    apply_patch(tree, patch, touched)
    units_after = [u for u in units_for(tree, touched) if not_configured(tree, u) is None]
    # a unit the compiler read none of the patched files for is the same object again
    same_as_pre = {u for u in units_after if u in pre and not unit_depends_on(tree, u, touched)}
    t2 = time.monotonic()
    compile_units(tree, [u for u in units_after if u not in same_as_pre], env, jobs, log)
    seconds["post"] = time.monotonic() - t2
    out: list[KernelUnit] = []
    for u in units_after:
        if u in same_as_pre:
            out.append(KernelUnit(u, pre[u], None, modules[u]))
            continue
        post = _save(tree, u, workdir / "post")
        if u not in pre:
            out.append(KernelUnit(u, post, post, module_of(tree, u)))  # new unit: all new
            continue
        same = pre[u].read_bytes() == post.read_bytes()
        out.append(KernelUnit(u, pre[u], None if same else post, modules[u]))
    compiler = object_compiler(out[0].post or out[0].pre) if out else ""
    seconds["build"] = time.monotonic() - t0
    return KernelBuild(
        tree=tree, units=out, compiler=compiler, touched=touched, seconds=seconds, not_built=skipped
    )


def _save(tree: Path, unit: str, dest: Path) -> Path:
    obj = tree / Path(unit).with_suffix(".o")
    saved = dest / unit.replace("/", "__")
    saved = saved.with_suffix(".o")
    shutil.copy2(obj, saved)
    return saved
