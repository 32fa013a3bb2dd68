"""``livesplice create``: build -> diff -> package, as a flat list of steps."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from livesplice.build.records import BuildPair
from livesplice.errors import UsageError
from livesplice.progress import ProgressCallback, Stages
from livesplice.update.archive import write_update
from livesplice.update.format import Hook, Manifest, Target, check_update_id

ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class CreateResult:
    manifest: Manifest | None  # None: the patch changes no code ("nothing to do")
    output: Path | None
    message: str


def new_update_id() -> str:
    """Random 8 characters, like Ksplice's update ids."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(8))


@dataclass
class CreateInputs:
    """What ``create`` was asked for, checked before anything slow runs."""

    srcdir: Path
    patch_text: str
    id: str
    output: Path
    description: str | None


def check_inputs(
    srcdir: Path,
    patch: Path,
    update_id: str | None,
    output: Path | None,
    description: str | None,
    signing_key: Path | None,
) -> CreateInputs:
    """The checks every ``create`` (process or kernel) makes before building: the tree, the
    patch, the update id, a writable output and the signing key -- a mistake found here costs
    nothing, found after the build it costs the build."""
    srcdir = check_source_tree(srcdir)
    patch_text = read_patch(patch)
    uid = check_update_id(update_id) if update_id else new_update_id()
    out = output if output is not None else Path(f"livesplice-{uid}.update")
    check_output_writable(out)
    if signing_key is not None and not signing_key.is_file():
        raise UsageError(f"signing key {signing_key} does not exist",
                         advice="make one with `livesplice keygen -o KEY`")  # fmt: skip
    return CreateInputs(srcdir, patch_text, uid, out, description)


def build_manifest(
    inputs: CreateInputs,
    compiler: str,
    targets: list[Target],
    hooks: list[Hook],
    warnings: list[str],
) -> Manifest | None:
    """The update's manifest from the diff's results; None when they change no code (the
    caller then says "nothing to do" and writes nothing)."""
    if not any(t.changed_functions or t.new_functions or t.new_data for t in targets):
        return None
    return Manifest(
        id=inputs.id,
        description=inputs.description or describe_patch(inputs.patch_text),
        compiler=compiler,
        patch_sha256=hashlib.sha256(inputs.patch_text.encode()).hexdigest(),
        targets=targets,
        hooks=hooks,
        warnings=warnings,
    )


def create_update(
    srcdir: Path | None,
    patch: Path,
    *,
    build_cmd: str | None = None,
    update_id: str | None = None,
    output: Path | None = None,
    description: str | None = None,
    jobs: int = 2,
    keep_tmp: bool = False,
    signing_key: Path | None = None,
    targets: list[str] | None = None,
    verify_against: list[Path] | None = None,
    debian: str | None = None,
    clean_env: bool = False,
    progress: ProgressCallback | None = None,
) -> CreateResult:
    """Turn ``patch`` against the tree ``srcdir`` into an update file.

    ``verify_against``: shipped binaries (files, directories, .debs) the update must fit:
    run-pre matched now, their build-ids recorded (:mod:`livesplice.process.verify`).
    ``progress`` hears each stage as it starts and ends: pre build, patch, post build, diff
    (n/N objects), verify, package (:mod:`livesplice.progress`).

    ``debian`` (``SOURCE=VERSION``, instead of ``srcdir``): the source package version as
    Debian built it -- fetched from the archive, built with ``dpkg-buildpackage -B`` in a clean
    environment -- and verified against that version's binary packages; targets it does not
    ship are left out. ``clean_env``: build in a clean environment (as sbuild does)."""
    from livesplice.build.builder import build_pair
    from livesplice.diff.engine import diff_build

    for path in verify_against or []:
        if not path.exists():
            raise UsageError(f"--verify-against {path}: no such file or directory")
    srcroot: Path | None = None
    source = ""
    notes: list[str] = []
    verify = list(verify_against or [])
    if debian is not None:
        from livesplice.build.debian import DEBIAN_BUILD, parse_spec, prepare_source

        if srcdir is not None:
            raise UsageError("give either SRCDIR or --debian SOURCE=VERSION, not both")
        parse_spec(debian)
        read_patch(patch)  # a bad patch path costs nothing now, a download later
        srcroot = Path(tempfile.mkdtemp(prefix="livesplice-debian-"))
        try:
            deb = prepare_source(debian, srcroot / "src")
        except BaseException:
            shutil.rmtree(srcroot, ignore_errors=True)
            raise
        srcdir, source, notes = deb.tree, deb.label, deb.notes
        build_cmd = build_cmd or DEBIAN_BUILD
        clean_env = True
        verify = [*deb.debs, *verify]
    elif srcdir is None:
        raise UsageError("no source tree given (SRCDIR, or --debian SOURCE=VERSION)")
    try:
        inputs = check_inputs(srcdir, patch, update_id, output, description, signing_key)
    except BaseException:
        if srcroot is not None:
            shutil.rmtree(srcroot, ignore_errors=True)
        raise
    srcdir, patch_text, uid, out = inputs.srcdir, inputs.patch_text, inputs.id, inputs.output
    build_cmd = build_cmd or "make"

    workdir = Path(tempfile.mkdtemp(prefix="livesplice-create-"))
    try:
        stages = Stages(progress)
        pair = build_pair(srcdir, patch, build_cmd=build_cmd, workdir=workdir, jobs=jobs,
                          clean_env=clean_env, progress=progress)
        if targets:
            restrict_targets(pair, targets)
        with stages.stage("diff") as advance:
            diff = diff_build(pair, on_unit=advance)
        manifest = build_manifest(inputs, pair.compiler, diff.targets, diff.hooks, diff.warnings)
        if manifest is None:
            return CreateResult(None, None, "no code changes: nothing to do (no update written)")
        manifest.source = source
        manifest.warnings.extend(notes)
        if verify:
            from livesplice.process.verify import verify_targets

            with stages.stage("verify"):
                manifest.warnings.extend(verify_targets(
                    manifest, verify, only_shipped=debian is not None).warnings)
        with stages.stage("package"):
            write_update(out, manifest, patch_text, signing_key=signing_key)
        return CreateResult(manifest, out, f"wrote update {uid} to {out}")
    finally:
        if keep_tmp:
            print(f"livesplice: kept the build directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if srcroot is not None:
            shutil.rmtree(srcroot, ignore_errors=True)


def restrict_targets(pair: BuildPair, names: list[str]) -> None:
    """Keep only the named link outputs (``create --target``).

    A package often links the same sources into programs nobody runs in production (a
    coverage-instrumented test binary, say); their changes must not decide whether the
    update for the real daemon can be made. Units linked only into other outputs are
    dropped; shared units keep only the named targets.
    """
    # a library may be named by its file name or its soname (libcurl.so.4.8.0 / libcurl.so.4)
    aliases = {link.name: link.name for link in pair.links}
    for link in pair.links:
        if link.kind == "shared_library":
            soname = shared_object_name(link.output)
            if soname:
                aliases.setdefault(soname, link.name)
    unknown = [n for n in names if n not in aliases]
    if unknown:
        raise UsageError(
            f"--target {', '.join(unknown)}: the build links no such executable or library",
            details=[f"it links: {', '.join(sorted(aliases)) or 'nothing'}"],
        )
    wanted = {aliases[n] for n in names}
    pair.links = [link for link in pair.links if link.name in wanted]
    kept = []
    for unit in pair.units:
        unit.targets = [t for t in unit.targets if t in wanted]
        if unit.targets:
            kept.append(unit)
    pair.units = kept
    pair.new_unit_targets = {
        obj: [t for t in ts if t in wanted] for obj, ts in pair.new_unit_targets.items()
    }


def shared_object_name(path: Path) -> str | None:
    """DT_SONAME of a shared library, None when it has none or cannot be read."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            dynamic = ELFFile(f).get_section_by_name(".dynamic")
            if not isinstance(dynamic, DynamicSection):
                return None
            for tag in dynamic.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    return str(getattr(tag, "soname", "")) or None
    except (OSError, ELFError):
        return None
    return None


def check_source_tree(srcdir: Path) -> Path:
    if not srcdir.exists():
        raise UsageError(f"source tree {srcdir} does not exist")
    if not srcdir.is_dir():
        raise UsageError(f"source tree {srcdir} is not a directory")
    return srcdir.resolve()


def read_patch(patch: Path) -> str:
    try:
        return patch.read_text(errors="surrogateescape")
    except FileNotFoundError:
        raise UsageError(f"patch file {patch} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"patch file {patch} is a directory") from None
    except OSError as e:
        raise UsageError(f"cannot read patch file {patch}: {e.strerror}") from None


def check_output_writable(out: Path) -> None:
    """Fail before a long build, not after it, when the output cannot be written."""
    directory = out.parent if str(out.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(
            f"cannot write the update to {out}: directory {directory} does not exist",
            advice="create the directory or pass another -o path",
        )
    if out.is_dir():
        raise UsageError(f"cannot write the update to {out}: it is a directory")
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".livesplice-probe-", dir=directory)
        import os

        os.close(fd)
    except OSError as e:
        raise UsageError(
            f"cannot write the update to {out}: {e.strerror}",
            advice="pass an -o path in a directory you can write to",
        ) from None
    finally:
        if probe:
            Path(probe).unlink(missing_ok=True)


def describe_patch(patch_text: str) -> str:
    """A description from the patch header (git format-patch Subject or first comment line)."""
    for line in patch_text.splitlines():
        if line.startswith("Subject:"):
            return line.removeprefix("Subject:").strip().removeprefix("[PATCH]").strip()
    for line in patch_text.splitlines():
        if line.startswith(("diff ", "--- ", "Index:")):
            break
        if line.strip():
            return line.strip()
    return "livesplice update"
