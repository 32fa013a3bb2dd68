"""The prebuild cache: one pre build of a source tree, reused by every fix made against it.

A security team makes several updates for one package version; the pre build (the tree as
shipped, unpatched) is the same for all of them and is most of a create's time (curl:
325-930 s). Ksplice had ``--prebuild`` for this. Here the tree after the pre build, with the
wrapper's records and the build log, is kept under a key that names everything the pre build
depends on:

- the source tree's contents (every path, its type, mode, and bytes or link target;
  version-control metadata such as .git/ aside);
- the build command;
- the toolchain: each compiler and archiver the shims wrap (its real path and ``-v``
  output), ``ld -v``, and the installed Debian packages with their versions (system headers
  and libraries the build reads come from them);
- the environment the build inherits (every variable except terminal and session noise,
  and those livesplice sets itself: make reads every variable as a make variable);
- livesplice's compiler wrapper (it decides the extra flags every unit is compiled with).

The mtimes of the source files are not part of the key: the same bytes build the same
objects, and the restored tree keeps the mtimes of its first build, so the post build's
incremental rebuild sees exactly what it would have seen then.

Paths: a build records absolute paths (CMake's cache, the shims in ``CC``, libtool's
scripts, the wrapper's records), so a cached tree can only be reused where it was built.
Every cached build therefore runs in its entry's own ``site/`` directory, at the same path
each time, with an exclusive lock (a second create of the same tree meanwhile builds without
the cache). Debug info does not see the path (``-ffile-prefix-map``), so an update made
with the cache is byte-identical to one made without it.

Layout of the cache (``$LIVESPLICE_PREBUILD_CACHE``, default ``~/.cache/livesplice/prebuild``)::

    DIGEST/lock          flock'ed by the create using this entry
    DIGEST/snapshot/     tree/ (after the pre build), build-pre.jsonl, build-pre.log
    DIGEST/meta.json     what the key was made of, the entry's size; written last: an entry
                         without it is incomplete and is rebuilt. Its mtime is the last use.
    DIGEST/site/         tree/, shims/, tmp/ of the create running now

Trust: livesplice runs as root, and what it restores here is compiled into updates that
root splices into running processes. Every directory is created 0700 and accepted only
when it is ours, not writable by others and not a symlink, and so is every directory above
the cache root (:mod:`livesplice.private`); the meta file is read with ``O_NOFOLLOW`` and
must name the digest it is filed under. An entry that fails any of this is not used.
The size is bounded (``$LIVESPLICE_PREBUILD_CACHE_MAX`` bytes, default 20 GiB): after
storing an entry, the least recently used others are removed until the total fits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from livesplice.build import wrapper
from livesplice.private import PrivateFileError, private_dir, read_private, write_private

CACHE_ENV = "LIVESPLICE_PREBUILD_CACHE"
MAX_BYTES_ENV = "LIVESPLICE_PREBUILD_CACHE_MAX"
DEFAULT_MAX_BYTES = 20 * 2**30
FORMAT = "livesplice-prebuild 1"
META_LIMIT = 1 << 20
DPKG_STATUS = Path("/var/lib/dpkg/status")
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".bzr", "_darcs"})

# Variables that cannot change what a build produces (the terminal, the login session, the
# test runner), and those build_environment() sets itself whatever the caller had.
ENV_NOT_IN_KEY = frozenset(
    {
        "_",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "TERM",
        "COLORTERM",
        "COLUMNS",
        "LINES",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XAUTHORITY",
        "MAIL",
        "LS_COLORS",
        "LESS",
        "LESSOPEN",
        "LESSCLOSE",
        "PAGER",
        "EDITOR",
        "VISUAL",
        "PS1",
        "PS2",
        "PS4",
        "PROMPT_COMMAND",
        "HISTFILE",
        "HISTSIZE",
        "HISTFILESIZE",
        "HISTCONTROL",
        "TMUX",
        "TMUX_PANE",
        "STY",
        "WINDOW",
        "TERM_PROGRAM",
        "TERM_PROGRAM_VERSION",
        "TERM_SESSION_ID",
        "VTE_VERSION",
        "DBUS_SESSION_BUS_ADDRESS",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "MOTD_SHOWN",
        "GPG_AGENT_INFO",
        "GPG_TTY",
        "PYTEST_CURRENT_TEST",
        "PYTEST_XDIST_WORKER",
        "PYTEST_XDIST_TESTRUNUID",
        "PYTEST_XDIST_WORKER_COUNT",
        "TMPDIR",
        "CC",
        "CXX",
        wrapper.LOG_ENV,
        wrapper.PREFIX_MAP_ENV,
        # livesplice's own settings for signing, applying and its state, not the build's
        "LIVESPLICE_SIGNING_KEY",
        "LIVESPLICE_ALLOW_UNSIGNED",
        "LIVESPLICE_TRUST_DIR",
        "LIVESPLICE_STATE_DIR",
        "LIVESPLICE_RUN_DIR",
        "LIVESPLICE_ETC",
        "LIVESPLICE_CMDLINE",
        "LIVESPLICE_KILL_AT",
        "LIVESPLICE_EVAL_CACHE",
        "LIVESPLICE_CACHE",
        "LIVESPLICE_MEMFD",
        "LIVESPLICE_POINTER_SCAN_LIMIT",
        CACHE_ENV,
        MAX_BYTES_ENV,
    }
)
ENV_PREFIXES_NOT_IN_KEY = (
    "SSH_",
    "XDG_SESSION_",
    "XDG_SEAT",
    "XDG_VTNR",
    "XDG_RUNTIME_DIR",
    "SUDO_",
)


def default_root() -> Path:
    """``$LIVESPLICE_PREBUILD_CACHE``, else ``prebuild`` in livesplice's cache directory."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "livesplice" / "prebuild"


def default_max_bytes() -> int:
    """The cache's size limit in bytes, from the environment when set (a CI machine may have less
    disk)."""
    value = os.environ.get(MAX_BYTES_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_MAX_BYTES


# ---------------------------------------------------------------------------------------------
# the key


@dataclass(frozen=True)
class PrebuildKey:
    """The digest an entry is filed under, and what it was made of (kept in meta.json so a
    person can see why two creates did or did not share a pre build)."""

    digest: str
    source_digest: str
    build_cmd: str
    toolchain: list[str]
    environment: list[str]  # NAME=VALUE, sorted
    packages_digest: str


def prebuild_key(
    srcdir: Path, build_cmd: str, tools: dict[str, str], env: dict[str, str]
) -> PrebuildKey:
    """The key of the pre build of ``srcdir`` with ``build_cmd`` and the shimmed ``tools``
    (shim name -> real tool, :func:`livesplice.build.builder.find_tools`) in the build
    environment ``env`` (the caller's or a clean one)."""
    source = source_tree_digest(srcdir)
    toolchain = toolchain_identity(tools, env)
    environment = build_environment_identity(env)
    packages = installed_packages_digest()
    h = hashlib.sha256()
    for part in (
        FORMAT,
        wrapper_digest(),
        source,
        build_cmd,
        *toolchain,
        "--env--",
        *environment,
        packages,
    ):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return PrebuildKey(h.hexdigest(), source, build_cmd, toolchain, environment, packages)


def source_tree_digest(srcdir: Path) -> str:
    """sha256 over every entry of the tree in a fixed order: relative path, type, permission
    bits, and the content's sha256 (files) or the target (symlinks). FIFOs, sockets and
    devices are skipped, as the copy skips them, and so is version-control metadata: a team
    that keeps the tree in git makes each fix on a branch, and a new ref must not cost the
    next fix its pre build (a version string a build takes from git can only be in code the
    fix does not replace, or the fix changed it and it is in the post build)."""
    h = hashlib.sha256()
    srcdir = srcdir.resolve()
    for root, dirs, files in os.walk(srcdir):
        dirs[:] = sorted(d for d in dirs if d not in VCS_DIRS)
        files = [f for f in files if f not in VCS_DIRS]  # a submodule's .git is a file
        rel_root = os.path.relpath(root, srcdir)
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            path = os.path.join(root, name)
            st = os.lstat(path)
            rel = os.path.normpath(os.path.join(rel_root, name))
            if stat.S_ISLNK(st.st_mode):
                entry = f"L {rel} {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
                entry = f"F {rel} {stat.S_IMODE(st.st_mode):o} {content}"
            else:
                continue
            h.update(entry.encode("utf-8", "surrogateescape") + b"\0")
        for d in dirs:
            st = os.lstat(os.path.join(root, d))
            if stat.S_ISDIR(st.st_mode):
                rel = os.path.normpath(os.path.join(rel_root, d))
                h.update(
                    f"D {rel} {stat.S_IMODE(st.st_mode):o}".encode("utf-8", "surrogateescape")
                    + b"\0"
                )
    return h.hexdigest()


def toolchain_identity(tools: dict[str, str], env: dict[str, str]) -> list[str]:
    """One line per shimmed tool (name, real path) and the version text of each distinct
    compiler (``-v``: version and configuration) and of the linker (``ld -v``)."""
    lines = [f"{name} -> {os.path.realpath(real)}" for name, real in sorted(tools.items())]
    reals = sorted({os.path.realpath(r) for n, r in tools.items() if "ar" not in n.split("-")})
    ld = shutil.which("ld", path=env.get("PATH", os.defpath))
    for real, flag in [*((r, "-v") for r in reals), *([(ld, "-v")] if ld else [])]:
        try:
            proc = subprocess.run(
                [real, flag],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            lines.append(f"{real} {flag}: {(proc.stdout + proc.stderr).strip()}")
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"{real} {flag}: {e}")
    return lines


def build_environment_identity(env: dict[str, str]) -> list[str]:
    """The build environment as part of the cache key: variables that change what a build
    produces count, the ones that only describe the session (TERM, SSH_*, ...) do not."""
    return sorted(
        f"{k}={v}"
        for k, v in env.items()
        if k not in ENV_NOT_IN_KEY and not k.startswith(ENV_PREFIXES_NOT_IN_KEY)
    )


def installed_packages_digest() -> str:
    """sha256 of the installed Debian packages and their versions ("" without dpkg): the
    headers and libraries a build reads come from them, and a pre build made before an
    upgrade of one of them is not the pre build of the same tree today."""
    try:
        text = DPKG_STATUS.read_text(errors="replace")
    except OSError:
        return ""
    installed = []
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in stanza.splitlines()
            if ": " in line and not line.startswith(" ")
        )
        if fields.get("Status", "").endswith(" installed"):
            installed.append(
                f"{fields.get('Package')}:{fields.get('Architecture')}={fields.get('Version')}"
            )
    return hashlib.sha256("\n".join(sorted(installed)).encode()).hexdigest()


def wrapper_digest() -> str:
    """A digest of the compiler wrapper's code: a cached pre build made by another wrapper may
    have recorded its compiles differently, so it is not reused."""
    return hashlib.sha256(Path(wrapper.__file__).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the cache


class PrebuildCache:
    """The cache directory; :meth:`site` hands out the place a create builds in."""

    def __init__(self, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.root = (root or default_root()).absolute()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def open_root(self) -> Path:
        """The root, made 0700 if missing; every directory above it must be safe too."""
        check_ancestors(self.root)
        return private_dir(self.root, create=True)

    @contextlib.contextmanager
    def site(self, key: PrebuildKey) -> Iterator[BuildSite | None]:
        """The entry of ``key``, locked for this create: its ``site`` directory to build in,
        and whether a complete snapshot of the pre build is there (``hit``). None when the
        entry is in use by another create (build without the cache then)."""
        entry = private_dir(self.open_root() / key.digest, create=True)
        fd = os.open(entry / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise PrivateFileError(f"{entry / 'lock'} is not ours")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            site = BuildSite(self, key, entry)
            site.prepare()
            try:
                yield site
            finally:
                shutil.rmtree(site.path, ignore_errors=True)
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, directory) of every complete entry."""
        found = []
        for d in self.root.iterdir():
            try:
                meta = json.loads(read_private(d / "meta.json", META_LIMIT))
                found.append((os.lstat(d / "meta.json").st_mtime, int(meta["size"]), d))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def evict(self, keep: Path) -> None:
        """Remove the least recently used entries (not ``keep``, not one in use) until the
        cache fits its bound."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, d in entries:
            if total <= self.max_bytes:
                break
            if d == keep:
                continue
            with contextlib.suppress(OSError), _locked(d / "lock") as got:
                if got:
                    shutil.rmtree(d / "snapshot", ignore_errors=True)
                    (d / "meta.json").unlink(missing_ok=True)
                    total -= size


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[bool]:
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class BuildSite:
    """Where one cached create builds (``path``: tree/, shims/, tmp/), and its entry."""

    def __init__(self, cache: PrebuildCache, key: PrebuildKey, entry: Path) -> None:
        self.cache = cache
        self.key = key
        self.entry = entry
        self.path = entry / "site"
        self.snapshot = entry / "snapshot"
        self.hit = False

    def prepare(self) -> None:
        """Clear what a crashed create left, and find out whether the entry is complete."""
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.entry / "snapshot.new", ignore_errors=True)
        private_dir(self.path, create=True)
        self.hit = self._complete()
        if not self.hit:
            (self.entry / "meta.json").unlink(missing_ok=True)
            shutil.rmtree(self.snapshot, ignore_errors=True)

    def _complete(self) -> bool:
        try:
            meta = json.loads(read_private(self.entry / "meta.json", META_LIMIT))
            private_dir(self.snapshot, create=False)
            private_dir(self.snapshot / "tree", create=False)
        except (OSError, ValueError):
            return False
        return (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT
            and (meta.get("digest") == self.key.digest)
        )

    def restore(self, tree: Path, workdir: Path) -> None:
        """The tree as the pre build left it, at the path it was built in, and the pre build's
        records and log in ``workdir``."""
        shutil.copytree(self.snapshot / "tree", tree, symlinks=True)
        for name in ("build-pre.jsonl", "build-pre.log"):
            shutil.copy2(self.snapshot / name, workdir / name)
        now = time.time()
        os.utime(self.entry / "meta.json", (now, now))  # last use, for eviction

    def store(self, tree: Path, workdir: Path) -> None:
        """Keep the tree just built and its records; then trim the cache to its bound. A
        cache that cannot take it (disk full) costs the next create its pre build, not this
        create its update: the error is dropped with the incomplete entry."""
        try:
            self._store(tree, workdir)
        except OSError:
            shutil.rmtree(self.entry / "snapshot.new", ignore_errors=True)
            shutil.rmtree(self.snapshot, ignore_errors=True)
            (self.entry / "meta.json").unlink(missing_ok=True)

    def _store(self, tree: Path, workdir: Path) -> None:
        new = private_dir(self.entry / "snapshot.new", create=True)
        shutil.copytree(tree, new / "tree", symlinks=True)
        for name in ("build-pre.jsonl", "build-pre.log"):
            shutil.copy2(workdir / name, new / name)
        os.rename(new, self.snapshot)
        meta = {
            "format": FORMAT,
            "digest": self.key.digest,
            "size": tree_size(self.snapshot),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_digest": self.key.source_digest,
            "build_cmd": self.key.build_cmd,
            "toolchain": self.key.toolchain,
            "environment": self.key.environment,
            "packages_digest": self.key.packages_digest,
        }
        write_private(self.entry / "meta.json", json.dumps(meta, indent=1).encode())
        self.cache.evict(keep=self.entry)


def tree_size(path: Path) -> int:
    """Disk space a tree takes (allocated blocks, not file sizes): what the cache limit is about."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def check_ancestors(path: Path) -> None:
    """Every existing directory above ``path`` must be root's or ours and not writable by
    others (unless sticky, like /tmp): otherwise another user could swap the cache."""
    for parent in path.resolve().parents:
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            continue
        owner_ok = st.st_uid in (0, os.geteuid())
        writable = bool(st.st_mode & 0o022) and not st.st_mode & stat.S_ISVTX
        if not owner_ok or writable:
            raise PrivateFileError(f"{parent} could be changed by another user")
