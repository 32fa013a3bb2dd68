"""The kernel lab's cache: one prepared Debian kernel per version, built in resumable stages.

Layout of ``$LIVESPLICE_CACHE/kernel/<version>/`` (default cache: ``~/.cache/livesplice``)::

    kernel.json        the resolved packages (version, flavour, ABI): no APT query once known
    debs/              the downloaded .deb files
    root/              dpkg-deb -x of image, headers, source (boot/vmlinuz-<release>)
    src/               the prepared Debian source tree = KSRC (modules_prepare done)
    initramfs/         base.cpio.gz: busybox, /init, the exit helper
    stages/N-name.done completion markers, like klp-build's numbered stage directories
    logs/N-name.log    output of the make steps

Each stage starts over from a clean output when its marker is missing, and running a stage
invalidates every later one, so an interrupted ``prepare`` resumes where it stopped. Everything
here can be deleted and rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from livesplice.errors import BuildFailed
from livesplice.kernel.debian import (
    DEFAULT_FLAVOUR,
    DEFAULT_KERNEL,
    KernelPackages,
    LabUnavailable,
    download_package,
    resolve_packages,
    unpack_deb,
)

Progress = Callable[[str], None]

STAGES = ("1-resolve", "2-download", "3-unpack", "4-source", "5-tree", "6-initramfs")

#: Host commands the lab needs, and the Debian package that provides each.
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "tar": "tar",
    "xz": "xz-utils",
    "make": "make",
    "gcc": "gcc",
    "gcc-12": "gcc-12",
    "bison": "bison",
    "flex": "flex",
    "bc": "bc",
}


def cache_root() -> Path:
    """The cache of prepared kernels: LIVESPLICE_CACHE, else the XDG cache directory, shared by
    every checkout (a prepared kernel takes long to make)."""
    env = os.environ.get("LIVESPLICE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "livesplice"


def kernel_dir(version: str, flavour: str = DEFAULT_FLAVOUR, cache: Path | None = None) -> Path:
    """The cache directory of one kernel version and flavour."""
    name = version if flavour == DEFAULT_FLAVOUR else f"{version}-{flavour}"
    return (cache or cache_root()) / "kernel" / name


@dataclass(frozen=True)
class LabKernel:
    """A prepared kernel: what to boot and where the matching source tree is."""

    packages: KernelPackages
    dir: Path

    @property
    def release(self) -> str:
        """The kernel's ``uname -r``."""
        return self.packages.release

    @property
    def root(self) -> Path:
        """The unpacked Debian packages (image, headers, source)."""
        return self.dir / "root"

    @property
    def vmlinuz(self) -> Path:
        """The kernel image QEMU boots."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def headers(self) -> Path:
        """The kbuild headers tree the livepatch modules are built against."""
        return self.root / "usr" / "src" / f"linux-headers-{self.release}"

    @property
    def ksrc(self) -> Path:
        """The prepared source tree: build objects and out-of-tree modules against it."""
        return self.dir / "src"

    @property
    def initramfs(self) -> Path:
        """The guest's base initramfs (busybox, modules); each run appends its payload."""
        return self.dir / "initramfs" / "base.cpio.gz"

    def make_env(self) -> dict[str, str]:
        """Environment for ``make`` in :attr:`ksrc` reproducing Debian's build identity.

        Only strings (``uname -v``, /proc/version) depend on these; the values are the ones
        Debian's official build uses (debian/rules.real in the linux source package).
        """
        env = dict(os.environ)
        env.update(
            KBUILD_BUILD_USER="debian-kernel",
            KBUILD_BUILD_HOST="lists.debian.org",
            DISTRIBUTION_OFFICIAL_BUILD="1",
            DISTRIBUTOR="Debian",
            DISTRIBUTION_VERSION=self.packages.version,
        )
        return env

    def make(self, *args: str, log: Path | None = None, cwd: Path | None = None) -> None:
        """``make -C KSRC ARGS`` with Debian's identity; :class:`BuildFailed` on failure."""
        cmd = ["make", "-C", str(self.ksrc), *args]
        done = subprocess.run(
            cmd, cwd=cwd, env=self.make_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        text = done.stdout.decode(errors="replace")
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(text)
        if done.returncode != 0:
            raise BuildFailed(
                f"make {' '.join(args)} failed in the kernel tree",
                [" ".join(cmd), *text.splitlines()[-25:]],
                f"full log: {log}" if log else "",
            )


def build_module(lab: LabKernel, moddir: Path) -> list[Path]:
    """Build the out-of-tree module(s) in ``moddir`` (its Kbuild/Makefile) against KSRC.

    :returns: the ``.ko`` files, ready to load into the lab's kernel (same vermagic and
        symbol CRCs). The log is ``moddir/build.log``.
    """
    lab.make(f"M={moddir.resolve()}", "modules", log=moddir / "build.log")
    return sorted(moddir.glob("*.ko"))


def missing_host_tools() -> list[str]:
    """``tool (package)`` for every host command the lab needs and cannot find."""
    return [f"{t} ({p})" for t, p in HOST_TOOLS.items() if shutil.which(t) is None] + [
        f"{b} (busybox-static)" for b in ("/bin/busybox",) if not Path(b).exists()
    ]


def require_host_tools() -> None:
    """Refuse early, naming every missing host tool and the script that installs them, instead of
    failing half-way through preparing a kernel."""
    missing = missing_host_tools()
    if missing:
        raise LabUnavailable(
            "the kernel lab needs host tools that are not installed",
            [f"missing: {m}" for m in missing],
            "run scripts/bootstrap-kernel.sh (as root) to install them",
        )


class _Stages:
    def __init__(self, kdir: Path, progress: Progress) -> None:
        self.dir = kdir / "stages"
        self.progress = progress
        self.timings: dict[str, float] = {}

    def done(self, stage: str) -> bool:
        return (self.dir / f"{stage}.done").exists()

    @contextmanager
    def run(self, stage: str, already: float = 0.0) -> Iterator[None]:
        """Run ``stage``; ``already``: seconds of its work done before (outside the lock)."""
        # a rerun stage makes every later stage stale
        for later in STAGES[STAGES.index(stage) :]:
            (self.dir / f"{later}.done").unlink(missing_ok=True)
        self.progress(f"{stage} ...")
        t0 = time.monotonic()
        yield
        seconds = time.monotonic() - t0 + already
        self.timings[stage] = seconds
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{stage}.done").write_text(json.dumps({"seconds": round(seconds, 3)}) + "\n")
        self.progress(f"{stage}: {seconds:.1f} s")


@contextmanager
def _locked(kdir: Path, progress: Progress) -> Iterator[None]:
    """One prepare per kernel directory at a time (parallel test runs share the cache)."""
    kdir.mkdir(parents=True, exist_ok=True)
    with (kdir / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another prepare of {kdir} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_packages(kdir: Path) -> KernelPackages | None:
    try:
        data = json.loads((kdir / "kernel.json").read_text())
        return KernelPackages(data["version"], data["flavour"], data["abi"])
    except (OSError, ValueError, KeyError):
        return None


def find_prepared(
    version: str = DEFAULT_KERNEL, flavour: str = DEFAULT_FLAVOUR, cache: Path | None = None
) -> LabKernel | None:
    """The prepared kernel if every stage is complete, else None (no network, no APT)."""
    kdir = kernel_dir(version, flavour, cache)
    pkgs = _read_packages(kdir)
    if pkgs is None or not all((kdir / "stages" / f"{s}.done").exists() for s in STAGES):
        return None
    return LabKernel(pkgs, kdir)


def prepare_lab(
    version: str = DEFAULT_KERNEL,
    flavour: str = DEFAULT_FLAVOUR,
    *,
    cache: Path | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> LabKernel:
    """Fetch and prepare a Debian kernel for the lab, once; later calls return the cache.

    :raises LabUnavailable: host tools or the Debian packages are missing (exit code 2).
    :raises BuildFailed: the source tree could not be prepared.
    """
    say: Progress = progress or (lambda _msg: None)
    kdir = kernel_dir(version, flavour, cache)
    prepared = find_prepared(version, flavour, cache)
    if prepared is not None:
        return prepared
    resolved, resolve_seconds = None, 0.0
    if _read_packages(kdir) is None:
        # resolve before creating anything: a gone or mistyped version leaves no cache dir
        require_host_tools()
        t0 = time.monotonic()
        resolved = resolve_packages(version, flavour)
        resolve_seconds = time.monotonic() - t0
    with _locked(kdir, say):
        stages = _Stages(kdir, say)
        prepared = find_prepared(version, flavour, cache)
        if prepared is not None:  # another prepare finished while we waited for the lock
            return prepared
        require_host_tools()
        pkgs = _read_packages(kdir) if stages.done("1-resolve") else None
        if pkgs is None:
            with stages.run("1-resolve", resolve_seconds):
                pkgs = resolved or resolve_packages(version, flavour)
                (kdir / "kernel.json").write_text(
                    json.dumps({**asdict(pkgs), "release": pkgs.release}, indent=1) + "\n"
                )
        lab = LabKernel(pkgs, kdir)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("2-download", lambda: _download(lab, say)),
            ("3-unpack", lambda: _unpack(lab)),
            ("4-source", lambda: _untar_source(lab)),
            ("5-tree", lambda: _prepare_tree(lab, jobs or os.cpu_count() or 1)),
            ("6-initramfs", lambda: _build_initramfs(lab)),
        ]
        for stage, step in steps:
            if not stages.done(stage):
                with stages.run(stage):
                    step()
        return lab


def stage_timings(lab: LabKernel) -> dict[str, float]:
    """Seconds each stage took when it last ran (from the markers)."""
    out: dict[str, float] = {}
    for s in STAGES:
        with suppress(OSError, ValueError, KeyError):
            out[s] = float(json.loads((lab.dir / "stages" / f"{s}.done").read_text())["seconds"])
    return out


def _reuse_deb(name: str, version: str, debs: Path) -> None:
    """Link an identical .deb another cache entry already holds into ``debs``.

    A .deb is identified by name and version (the archive never reuses them), so the 139 MB
    linux-source of a version fetched for the other flavour, or by the kernel corpus
    (``kernel-source/<version>/``), is the same file: a second flavour costs only its image
    and headers.
    """
    if any(debs.glob(f"{name}_*.deb")):
        return
    root = debs.parent.parent.parent  # <cache>/kernel/<dir>/debs
    pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"
    candidates = [
        *root.glob(f"kernel/*/debs/{pattern}"),
        *root.glob(f"kernel-source/{version}/{pattern}"),
    ]
    for deb in candidates:
        with suppress(OSError):
            os.link(deb, debs / deb.name)
            return


def _download(lab: LabKernel, say: Progress) -> None:
    debs = lab.dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for name in lab.packages.names:
        _reuse_deb(name, lab.packages.version, debs)
        deb = download_package(name, lab.packages.version, debs)
        say(f"  {deb.name} ({deb.stat().st_size / 1e6:.1f} MB)")


def _unpack(lab: LabKernel) -> None:
    shutil.rmtree(lab.root, ignore_errors=True)
    lab.root.mkdir(parents=True)
    for deb in sorted((lab.dir / "debs").glob("*.deb")):
        unpack_deb(deb, lab.root)
    if not lab.vmlinuz.exists():
        raise LabUnavailable(f"the image package has no {lab.vmlinuz.name}", [str(lab.vmlinuz)])


def _untar_source(lab: LabKernel) -> None:
    series = lab.packages.series
    tarball = lab.root / "usr" / "src" / f"linux-source-{series}.tar.xz"
    shutil.rmtree(lab.ksrc, ignore_errors=True)
    lab.ksrc.mkdir(parents=True)
    cmd = ["tar", "-xf", str(tarball), "-C", str(lab.ksrc), "--strip-components=1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildFailed(f"cannot unpack {tarball.name}", done.stderr.splitlines()[-10:])
    # the .deb in debs/ still has it; the unpacked tarball is 139 MB of duplicate
    tarball.unlink()


def _prepare_tree(lab: LabKernel, jobs: int) -> None:
    """Make KSRC compile objects and modules exactly as Debian's build did.

    * ``.config``: the headers' one is complete; /boot/config-* lacks keys (BUILD_SALT,
      MODULE_SIG_KEY ...) that olddefconfig would otherwise reset.
    * ``.kernelvariables``: Debian's top Makefile includes it (``-include .kernelvariables``):
      ``CC = gcc-12`` and ``KERNELRELEASE``; without it vermagic and the compiler differ.
    * ``MODULE_SIG_KEY``: Debian's points into its build's output directory, which does not
      exist here; the kernel's default path lets kbuild make a throwaway key if needed.
    * ``Module.symvers`` of the shipped kernel, so out-of-tree modules get the symbol CRCs
      (CONFIG_MODVERSIONS) of the kernel they will be loaded into.
    """
    src, headers = lab.ksrc, lab.headers
    if "-include .kernelvariables" not in (src / "Makefile").read_text(errors="replace"):
        raise BuildFailed(
            "this linux-source tree does not read .kernelvariables (not Debian-patched?)"
        )
    shutil.copyfile(headers / ".kernelvariables", src / ".kernelvariables")
    config = (headers / ".config").read_text()
    lines = [
        'CONFIG_MODULE_SIG_KEY="certs/signing_key.pem"'
        if line.startswith("CONFIG_MODULE_SIG_KEY=")
        else line
        for line in config.splitlines()
    ]
    (src / ".config").write_text("\n".join(lines) + "\n")
    shutil.copyfile(headers / "Module.symvers", src / "Module.symvers")
    logs = lab.dir / "logs"
    lab.make("-s", "olddefconfig", log=logs / "5-olddefconfig.log")
    lab.make(f"-j{jobs}", "modules_prepare", log=logs / "5-modules_prepare.log")
    # include/config/kernel.release holds the upstream version (6.1.176); the release that
    # modules carry in vermagic is UTS_RELEASE, from the KERNELRELEASE override above.
    uts = (src / "include" / "generated" / "utsrelease.h").read_text()
    built = uts.split('"')[1] if uts.count('"') >= 2 else uts.strip()
    if built != lab.release:
        raise BuildFailed(
            f"the prepared tree says UTS_RELEASE {built!r}, expected {lab.release!r}",
            advice="the tree would build modules the guest kernel refuses (vermagic)",
        )


def _build_initramfs(lab: LabKernel) -> None:
    from livesplice.kernel.initramfs import is_static_elf, write_base_initramfs

    busybox = Path("/bin/busybox")
    if not is_static_elf(busybox):
        raise LabUnavailable(
            "/bin/busybox is dynamically linked; the guest has no libc",
            advice="install busybox-static (scripts/bootstrap-kernel.sh)",
        )
    out = lab.initramfs
    out.parent.mkdir(parents=True, exist_ok=True)
    work = lab.dir / "initramfs" / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    write_base_initramfs(out, busybox, work)
    shutil.rmtree(work)
