"""livesplice inside the lab guest: a Python overlay for the initramfs, built once per kernel.

The guest is busybox only. ``lab run --update`` needs livesplice itself in there (apply
is the same code a user runs on a real machine), so the overlay carries the interpreter that
runs this livesplice (``sys.base_prefix``), its shared libraries, a trimmed standard library
and the packages livesplice imports at apply time (livesplice, elftools, capstone), under
``/opt/livesplice`` with a ``/usr/bin/livesplice`` wrapper.

Everything Python is shipped as sourceless ``.pyc`` compiled with ``unchecked-hash``
invalidation: the cpio has no meaningful mtimes, and compiling at import time under TCG
would cost seconds per boot. Cached as ``<kernel dir>/overlay.cpio.gz``; rebuilt when the
livesplice sources are newer than it.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from livesplice.errors import BuildFailed
from livesplice.kernel.initramfs import CpioWriter

GUEST_PREFIX = "opt/livesplice"
# stdlib parts apply never needs (and the big ones)
_SKIP_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "sqlite3",
    "dbm",
    "curses",
    "venv",
    "site-packages",
    "__pycache__",
    "unittest",
    "lib-dynload",
}
# shared libraries the kept extension modules may need (others: module left out)
_ALLOWED_LIBS = (
    "libc.so",
    "libm.so",
    "libz.so",
    "libbz2.so",
    "liblzma.so",
    "libffi.so",
    "libexpat.so",
    "libpython3",
    "ld-linux",
    "linux-vdso",
    "libpthread",
    "libdl.so",
    "libutil",
    "librt.so",
    "libuuid.so",
)
# cryptography: apply in the guest verifies signatures (its wheel links OpenSSL statically)
_PACKAGES = ("livesplice", "elftools", "capstone", "cryptography")
_MODULES = ("_cffi_backend",)  # single-file extension modules (cryptography's _rust needs it)


def overlay_path(kernel_dir: Path) -> Path:
    """One overlay per livesplice source tree: the kernel cache is shared by every checkout
    (worktrees of several people on one machine), and an overlay built from another tree's
    newer sources would otherwise pass the mtime check and run that tree's code."""
    import hashlib

    src = str(Path(__file__).resolve().parents[1])
    return kernel_dir / f"overlay-{hashlib.sha256(src.encode()).hexdigest()[:12]}.cpio.gz"


def ensure_overlay(kernel_dir: Path) -> Path:
    """The cached overlay, built if missing or older than the livesplice sources."""
    out = overlay_path(kernel_dir)
    src = Path(__file__).resolve().parents[1]
    newest = max(p.stat().st_mtime for p in src.rglob("*.py"))
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    build_overlay(out)
    return out


def _ldd(path: Path) -> list[Path]:
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    libs = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(Path(parts[2]))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))
    return libs


def _package_dir(name: str) -> Path:
    mod = __import__(name)
    return Path(mod.__file__ or "").resolve().parent


def build_overlay(out: Path) -> None:
    """Build the guest's Python overlay: this interpreter, its standard library, the packages
    livesplice imports and the shared libraries they need, as a directory tree for the
    initramfs."""
    prefix = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = prefix / "bin" / ver
    if not python.exists():
        raise BuildFailed(f"cannot find the interpreter {python} for the guest overlay")
    with tempfile.TemporaryDirectory(prefix="livesplice-overlay-") as tmp:
        stage = Path(tmp) / "root"
        lib = stage / "lib" / ver
        lib.mkdir(parents=True)
        stdlib = prefix / "lib" / ver
        for child in sorted(stdlib.iterdir()):
            if child.name in _SKIP_STDLIB or child.name.startswith("config-"):
                continue
            if child.is_dir():
                shutil.copytree(
                    child,
                    lib / child.name,
                    ignore=shutil.ignore_patterns("__pycache__", "test", "tests"),
                )
            elif child.suffix == ".py":
                shutil.copy2(child, lib / child.name)
        dyn = lib / "lib-dynload"
        dyn.mkdir()
        libs: set[Path] = set(_ldd(python))
        for so in sorted((stdlib / "lib-dynload").glob("*.so")):
            deps = _ldd(so)
            if all(any(a in d.name for a in _ALLOWED_LIBS) for d in deps):
                shutil.copy2(so, dyn / so.name)
                libs.update(deps)
        site = stage / "site"
        site.mkdir()
        for pkg in _PACKAGES:
            shutil.copytree(
                _package_dir(pkg),
                site / pkg,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "py.typed", "include", "*.a"),
            )
        for name in _MODULES:
            module = __import__(name)
            shutil.copy2(module.__file__ or "", site / Path(module.__file__ or "").name)
        for so in sorted(site.rglob("*.so")):
            libs.update(_ldd(so))  # capstone, cryptography: their own shared libraries' needs
        compile_cmd = [
            str(python),
            "-m",
            "compileall",
            "-b",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            str(lib),
            str(site),
        ]
        done = subprocess.run(compile_cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildFailed("compiling the guest overlay failed", done.stdout.splitlines()[-10:])
        for py in [*lib.rglob("*.py"), *site.rglob("*.py")]:
            py.unlink()
        tmp_out = out.with_suffix(".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp_out, "wb", compresslevel=6) as gz:
            cpio = CpioWriter(gz)
            cpio.host_file(f"{GUEST_PREFIX}/bin/{ver}", python)
            cpio.tree(f"{GUEST_PREFIX}/lib/{ver}", lib)
            cpio.tree(f"{GUEST_PREFIX}/site", site)
            for so in sorted(libs):
                real = so.resolve()
                guest = str(so).lstrip("/")
                cpio.host_file(guest, real)
                if "libpython" in so.name:
                    cpio.host_file(f"{GUEST_PREFIX}/lib/{so.name}", real)
            wrapper = (
                "#!/bin/sh\n"
                f"export PYTHONHOME=/{GUEST_PREFIX} PYTHONPATH=/{GUEST_PREFIX}/site "
                "PYTHONDONTWRITEBYTECODE=1\n"
                # A throwaway lab VM trying updates the host just built: without keys given
                # to it (LIVESPLICE_TRUST_DIR) it applies unsigned updates; given keys, it
                # verifies signatures like a real machine (the tests do that).
                '[ -n "$LIVESPLICE_TRUST_DIR" ] || export LIVESPLICE_ALLOW_UNSIGNED=1\n'
                f"export LD_LIBRARY_PATH=/{GUEST_PREFIX}/lib\n"
                f'exec /{GUEST_PREFIX}/bin/{ver} -m livesplice "$@"\n'
            )
            cpio.file("usr/bin/livesplice", wrapper.encode(), 0o755)
            cpio.close()
        tmp_out.replace(out)
