"""Debian packages as livesplice needs them: a source version, and the binaries users run.

``create --debian PKG=VERSION`` and the evaluation (:mod:`livesplice.eval`) both fetch a
source package version with apt (checked against the archive's signed index), falling back
to Debian's pools for versions the index no longer lists, and the architecture-dependent
binary packages built from it: the ``.deb`` files whose programs and libraries a
live update must fit (:mod:`livesplice.process.verify`).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from livesplice.errors import SourceUnavailable, UsageError

# deb-src entries for `apt-get source` when the machine has none (Debian 12 images ship
# deb lines only). deb822 format, sources.list(5).
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/livesplice-eval-src.sources")  # name kept
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


def run(
    cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, what: str = ""
) -> str:
    """Run a Debian tool, raising a typed error with the tail of its output when it fails
    (``what`` says what was being done, for the person reading it)."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise SourceUnavailable(
            f"{what or cmd[0]} failed (exit {proc.returncode})",
            details=[f"$ {' '.join(cmd)}", *tail],
        )
    return proc.stdout


def has_deb_src() -> bool:
    """Whether APT has deb-src lines (one-line or deb822 format): without them ``apt-get source``
    cannot fetch the package, and the error says so first."""
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


def _no_epoch(version: str) -> str:
    return version.split(":", 1)[1] if ":" in version else version


def unpack_source(dsc: Path, dest: Path, *, skip_patches: bool = False) -> None:
    """``dpkg-source -x``. A .dsc apt fetched was checked against the archive's signed
    index; one fetched from a pool by URL (:func:`_pool_fetch`) must carry a valid signature
    by a Debian uploader (debian-keyring): livesplice builds and runs what it unpacks, as root.

    :raises SourceUnavailable: the signature cannot be verified, or unpacking failed.
    """
    from_pool = fetched_by_url(dsc)
    cmd = [
        "dpkg-source",
        *(["--skip-patches"] if skip_patches else []),
        *(["--require-valid-signature"] if from_pool else []),
        "-x",
        str(dsc),
        str(dest),
    ]
    fields = dict(
        line.split(": ", 1)
        for line in dsc.read_text(errors="replace").splitlines()
        if ": " in line and not line.startswith((" ", "-"))
    )
    source, _, version = dsc.name.removesuffix(".dsc").partition("_")
    if fields.get("Source") != source or _no_epoch(fields.get("Version", "")) != version:
        raise SourceUnavailable(
            f"{dsc.name} describes {fields.get('Source', '?')} {fields.get('Version', '?')}, "
            "not the version its name says"
        )
    try:
        if from_pool:
            # Debian developers' keys only (not dpkg's default keyrings, which add Debian
            # Maintainers' and root's own trusted keys)
            if not DEBIAN_KEYRING.exists():
                raise SourceUnavailable(
                    f"{DEBIAN_KEYRING} is missing", details=[f"cannot check {dsc.name}'s signature"]
                )
            run(["gpgv", "--keyring", str(DEBIAN_KEYRING), str(dsc)], what=f"gpgv {dsc.name}")
        run(cmd, what=f"dpkg-source -x {dsc.name}")
    except SourceUnavailable as e:
        if from_pool:
            raise SourceUnavailable(
                f"{dsc.name} came from Debian's pool by URL (the archive index no longer lists "
                "it) and its signature could not be verified",
                details=e.details,
                advice="install debian-keyring (the uploaders' keys), or use a version the "
                "archive index lists",
            ) from None
        raise


DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-keyring.gpg")


def fetched_by_url(path: Path) -> bool:
    """Whether ``path`` came from a pool by URL (not through apt's signed index)."""
    return any(line.startswith(f"{path.name} from ") for line in _unverified_lines(path.parent))


def _unverified_lines(where: Path) -> list[str]:
    f = where / "UNVERIFIED"
    return f.read_text().splitlines() if f.exists() else []


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
        run(
            ["apt-get", "source", "--download-only", "-qq", spec],
            cwd=where,
            what=f"apt-get source {spec}",
        )
    except SourceUnavailable:
        try:
            # the lists may predate the version in the row
            run(["apt-get", "update", "-qq"], what="apt-get update")
            run(
                ["apt-get", "source", "--download-only", "-qq", spec],
                cwd=where,
                what=f"apt-get source {spec}",
            )
        except SourceUnavailable:
            _pool_fetch(package, dsc.name, where)
            for name, sha in _dsc_files(dsc.read_text()).items():
                _pool_fetch(package, name, where, sha256=sha)
    if not dsc.exists():
        raise SourceUnavailable(f"apt-get source {spec} did not produce {dsc.name}")
    return dsc


POOLS = (
    "https://deb.debian.org/debian/pool/main",
    "https://deb.debian.org/debian-security/pool/updates/main",
)


def _pool_fetch(source: str, name: str, where: Path, sha256: str = "") -> Path:
    """Download ``name`` of source package ``source`` from Debian's pools.

    Superseded versions stay in the pool for a while after the index drops them (libcurl4
    7.88.1-10+deb12u14 after deb12u15). NOT checked against a signed index (over HTTPS, but
    a mirror can serve anything): the .dsc's checksums are checked for the files it lists,
    :func:`unpack_source` requires the .dsc's own uploader signature and its Source/Version;
    nothing vouches for a .deb (used only to verify an update against; apply still matches
    what runs). Each such file is noted in ``UNVERIFIED`` before it is written, so an
    interrupted download is never taken for a verified one.
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
        with (where / "UNVERIFIED").open("a") as note:
            note.write(f"{name} from {url}\n")
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(r.content)
        tmp.replace(out)
        return out
    raise SourceUnavailable(f"{name} is not in the archive index nor in its pools", details=errors)


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


def arch_binaries(dsc: Path) -> list[str]:
    """The architecture-dependent binary packages a source package builds for amd64, from
    its .dsc's Package-List (dsc(5)): ``NAME TYPE SECTION PRIORITY arch=ARCHES``. udebs
    (the installer's) are left out; ``Architecture: all`` packages hold no machine code."""
    out: list[str] = []
    inside = False
    for line in dsc.read_text(errors="replace").splitlines():
        if line.startswith("Package-List:"):
            inside = True
            continue
        if not (inside and line.startswith(" ")):
            inside = False
            continue
        words = line.split()
        if len(words) < 5 or words[1] != "deb":
            continue
        arches = next(
            (w.removeprefix("arch=").split(",") for w in words[4:] if w.startswith("arch=")), []
        )
        if any(a in ("any", "amd64", "linux-any") for a in arches):
            out.append(words[0])
    return out


def fetch_binaries(
    source: str, version: str, packages: list[str], cache: Path, missing: list[str] | None = None
) -> list[Path]:
    """The amd64 .debs of ``packages`` (built from ``source``) at ``version``: what users
    run. With ``missing``, a package the archive does not have is noted there instead of
    raising :class:`SourceUnavailable`."""
    where = cache / "downloads" / source / "binaries"
    where.mkdir(parents=True, exist_ok=True)
    debs = []
    for pkg in packages:
        try:
            debs.append(_fetch_binary(source, version, pkg, where))
        except SourceUnavailable as e:
            if missing is None:
                raise
            missing.append(f"{pkg} {version}: {e.reason}")
    return debs


def _fetch_binary(source: str, version: str, pkg: str, where: Path) -> Path:
    found = sorted(where.glob(f"{pkg}_*{_no_epoch(version)}_amd64.deb"))
    if not found:
        spec = f"{pkg}={version}"
        try:
            run(["apt-get", "download", "-qq", spec], cwd=where, what=f"apt-get download {spec}")
        except SourceUnavailable:
            _pool_fetch(source, f"{pkg}_{_no_epoch(version)}_amd64.deb", where)
        found = sorted(where.glob(f"{pkg}_*{_no_epoch(version)}_amd64.deb"))
    if not found:
        raise SourceUnavailable(f"no .deb of {pkg} {version}")
    return found[0]


def unverified_downloads(source: str, cache: Path) -> list[str]:
    """Files of this row fetched from a pool by URL (not through apt's signed index)."""
    return [
        line
        for d in (cache / "downloads" / source, cache / "downloads" / source / "binaries")
        for line in _unverified_lines(d)
    ]


@dataclass
class DebianSource:
    """A source package version unpacked as Debian builds it, and what the archive ships."""

    package: str
    version: str
    tree: Path  # dpkg-source -x: upstream source with debian/patches applied
    debs: list[Path]  # its architecture-dependent binary packages, downloaded
    notes: list[str]

    @property
    def label(self) -> str:
        """How this source is named in messages and reports."""
        return f"Debian {self.package} {self.version}"


# dpkg-buildpackage -B: architecture-dependent packages only (documentation and other
# Architecture: all packages hold no code to patch, and their build steps are the ones that
# break outside a buildd); nocheck: the package's test suite is not the update's concern.
DEBIAN_BUILD = 'DEB_BUILD_OPTIONS="nocheck $DEB_BUILD_OPTIONS" dpkg-buildpackage -B -uc -us'
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_VERSION = re.compile(r"(?:\d+:)?[0-9][A-Za-z0-9.+~-]*")


def debian_cache() -> Path:
    """Where fetched Debian sources and binaries are kept (LIVESPLICE_DEBIAN_CACHE): fetching
    again for every run would take minutes."""
    return Path(
        os.environ.get("LIVESPLICE_DEBIAN_CACHE", Path.home() / ".cache" / "livesplice" / "debian")
    )


def parse_spec(spec: str) -> tuple[str, str]:
    """``PKG=VERSION`` (a source package and one of its versions)."""
    package, _, version = spec.partition("=")
    if not _PACKAGE.fullmatch(package) or not _VERSION.fullmatch(version):
        raise UsageError(
            f"--debian {spec!r:.80}: expected SOURCE=VERSION (e.g. redis=5:7.0.15-1~deb12u7)"
        )
    return package, version


def prepare_source(spec: str, dest: Path, cache: Path | None = None) -> DebianSource:
    """Fetch ``PKG=VERSION`` and the binaries built from it; unpack it into ``dest``.

    :raises SourceUnavailable: the version is not in the archive (nor its pools).
    :raises UsageError: a bad spec, or build dependencies missing on this machine.
    """
    package, version = parse_spec(spec)
    cache = cache or debian_cache()
    dsc = fetch_source_version(package, version, cache)
    unpack_source(dsc, dest)
    check = subprocess.run(
        ["dpkg-checkbuilddeps", "-B"], cwd=dest, capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise UsageError(
            f"the build dependencies of {package} {version} are not installed",
            details=check.stderr.strip().splitlines()[-3:],
            advice=f"apt-get build-dep --arch-only {package}={version}",
        )
    notes: list[str] = []
    debs = fetch_binaries(package, version, arch_binaries(dsc), cache, missing=notes)
    if not debs:
        raise SourceUnavailable(
            f"no binary package of {package} {version} is in the archive", details=notes
        )
    notes.extend(
        f"fetched from the pool by URL, not through apt's signed index: {u}"
        for u in unverified_downloads(package, cache)
    )
    return DebianSource(package, version, dest, debs, notes)
