"""``livesplice create``: build -> diff -> package, as a flat list of steps."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.build.prebuild import PrebuildCache
from livesplice.build.records import BuildPair, LinkRecord
from livesplice.errors import TargetUnchanged, UsageError
from livesplice.progress import ProgressCallback, Stages
from livesplice.update.archive import write_update
from livesplice.update.format import Hook, Manifest, Target, check_update_id

if TYPE_CHECKING:
    from livesplice.diff.engine import DiffResult, UnitDiff

ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class OutputChange:
    """A link output the patch changes that ``--target`` left out of the update.

    Reported so that "the update is for X" never hides "the fix also lands in Y" (nginx built
    ``--with-mail=dynamic``: a src/mail/ fix changes ngx_mail_module.so, not nginx).
    ``refusals``: what would refuse an update for this output; they did not stop the update
    for the selected ones (a test binary's changes must not decide the daemon's update).
    """

    name: str
    kind: str  # "executable" | "shared_library"
    soname: str | None  # None for a shared object loaded with dlopen (a module)
    changed_functions: list[str] = field(default_factory=list)
    new_functions: list[str] = field(default_factory=list)
    new_data: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    # the diffs of its units not in the update (their refusals are said once per type)
    unit_diffs: list[UnitDiff] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """One line for a person: what it is and what changed in it."""
        what = {"executable": "executable", "shared_library": "shared library"}.get(
            self.kind, self.kind
        )
        if self.kind == "shared_library" and self.soname is None:
            what = "module: shared object without soname, loaded with dlopen"
        parts = []
        if self.changed_functions:
            parts.append("changed " + ", ".join(self.changed_functions))
        if self.new_functions:
            parts.append("new " + ", ".join(self.new_functions))
        if self.new_data:
            parts.append("new data " + ", ".join(self.new_data))
        if self.refusals:
            parts.append(
                f"{len(self.refusals)} change(s) an update for it would refuse: "
                + "; ".join(self.refusals)
            )
        return f"{self.name} ({what}): " + ("; ".join(parts) or "changed")

    def to_dict(self) -> dict[str, object]:
        """The output change as JSON, for ``create --json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "soname": self.soname,
            "changed_functions": self.changed_functions,
            "new_functions": self.new_functions,
            "new_data": self.new_data,
            "refusals": self.refusals,
        }


@dataclass
class CreateResult:
    """What ``create`` made: the manifest and where the update was written, or why nothing was."""

    manifest: Manifest | None  # None: the patch changes no code ("nothing to do")
    output: Path | None
    message: str
    # outputs the patch changes that are not in the update (create --target left them out)
    other_outputs: list[OutputChange] = field(default_factory=list)


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
        raise UsageError(
            f"signing key {signing_key} does not exist",
            advice="make one with `livesplice keygen -o KEY`",
        )
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
    keep_workdir: Callable[[Path], None] | None = None,
    signing_key: Path | None = None,
    targets: list[str] | None = None,
    verify_against: list[Path] | None = None,
    debian: str | None = None,
    clean_env: bool = False,
    progress: ProgressCallback | None = None,
    prebuild: PrebuildCache | None = None,
) -> CreateResult:
    """Turn ``patch`` against the tree ``srcdir`` into an update file.

    ``verify_against``: shipped binaries (files, directories, .debs) the update must fit:
    run-pre matched now, their build-ids recorded (:mod:`livesplice.process.verify`).
    ``progress`` hears each stage as it starts and ends: pre build, patch, post build, diff
    (n/N objects), verify, package (:mod:`livesplice.progress`).

    ``debian`` (``SOURCE=VERSION``, instead of ``srcdir``): the source package version as
    Debian built it -- fetched from the archive, built with ``dpkg-buildpackage -B`` in a clean
    environment -- and verified against that version's binary packages; targets it does not
    ship are left out. ``clean_env``: build in a clean environment (as sbuild does).
    ``prebuild``: reuse (and keep) the pre build of the same tree there
    (:mod:`livesplice.build.prebuild`). ``keep_workdir``: keep the build directory, however
    create ends, and tell its path to this callback (the CLI prints it; the engine never
    does); None removes it."""
    from livesplice.build.builder import build_pair
    from livesplice.diff.engine import diff_build

    for path in verify_against or []:
        if not path.exists():
            raise UsageError(f"--verify-against {path}: no such file or directory")
    source = ""
    notes: list[str] = []
    verify = list(verify_against or [])
    # what the Debian source needs (its unpacked tree) is removed however create ends
    with contextlib.ExitStack() as cleanup:
        if debian is not None:
            from livesplice.build.debian import DEBIAN_BUILD, parse_spec, prepare_source

            if srcdir is not None:
                raise UsageError("give either SRCDIR or --debian SOURCE=VERSION, not both")
            parse_spec(debian)
            read_patch(patch)  # a bad patch path costs nothing now, a download later
            srcroot = Path(
                cleanup.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix="livesplice-debian-", ignore_cleanup_errors=True
                    )
                )
            )
            deb = prepare_source(debian, srcroot / "src")
            srcdir, source, notes = deb.tree, deb.label, deb.notes
            build_cmd = build_cmd or DEBIAN_BUILD
            clean_env = True
            verify = [*deb.debs, *verify]
        elif srcdir is None:
            raise UsageError("no source tree given (SRCDIR, or --debian SOURCE=VERSION)")
        inputs = check_inputs(srcdir, patch, update_id, output, description, signing_key)
        srcdir, patch_text, uid, out = inputs.srcdir, inputs.patch_text, inputs.id, inputs.output
        build_cmd = build_cmd or "make"

        workdir = Path(tempfile.mkdtemp(prefix="livesplice-create-"))
        try:
            stages = Stages(progress)
            pair = build_pair(
                srcdir,
                patch,
                build_cmd=build_cmd,
                workdir=workdir,
                jobs=jobs,
                clean_env=clean_env,
                progress=progress,
                prebuild=prebuild,
            )
            selected = restrict_targets(pair, targets) if targets else pair
            with stages.stage("diff") as advance:
                diff = diff_build(selected, on_unit=advance)
            others: list[OutputChange] = []
            if targets:
                with stages.stage("diff (outputs not selected)") as advance:
                    others = other_changed_outputs(pair, selected, diff, on_unit=advance)
            manifest = build_manifest(
                inputs, pair.compiler, diff.targets, diff.hooks, diff.warnings
            )
            if manifest is None:
                if others:
                    raise_target_unchanged(targets or [], others)
                return CreateResult(
                    None, None, "no code changes: nothing to do (no update written)"
                )
            manifest.source = source
            manifest.warnings.extend(notes)
            if verify:
                from livesplice.process.verify import verify_targets

                with stages.stage("verify"):
                    manifest.warnings.extend(
                        verify_targets(manifest, verify, only_shipped=debian is not None).warnings
                    )
            with stages.stage("package"):
                write_update(out, manifest, patch_text, signing_key=signing_key)
            return CreateResult(manifest, out, f"wrote update {uid} to {out}", others)
        finally:
            if keep_workdir is not None:
                keep_workdir(workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def restrict_targets(pair: BuildPair, names: list[str]) -> BuildPair:
    """The build as seen by the named link outputs only (``create --target``).

    A package often links the same sources into programs nobody runs in production (a
    coverage-instrumented test binary, say); their changes must not decide whether the
    update for the real daemon can be made. The returned pair keeps only the named links,
    the units linked into them (each with only the named targets) and the changed assembly
    sources of those units; ``pair`` itself is left whole, for
    :func:`other_changed_outputs` to report what the patch does to the rest.
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
    units = [replace(u, targets=[t for t in u.targets if t in wanted]) for u in pair.units]
    kept = [u for u in units if u.targets]
    left_out_asm = {u.source for u in units if u.pre.language == "asm" and not u.targets}
    return replace(
        pair,
        links=[link for link in pair.links if link.name in wanted],
        units=kept,
        new_unit_targets={
            obj: [t for t in ts if t in wanted] for obj, ts in pair.new_unit_targets.items()
        },
        changed_asm=[a for a in pair.changed_asm if a not in left_out_asm],
    )


def other_changed_outputs(
    pair: BuildPair,
    selected: BuildPair,
    diff: DiffResult,
    on_unit: Callable[[int, int], None] | None = None,
) -> list[OutputChange]:
    """What the patch changes in the link outputs ``--target`` did not select.

    Every output is diffed, selected or not: units of the selected outputs were diffed for
    the update (their changes are read back from ``diff``'s sections, by unit), the others
    are diffed here. A refusal in an unselected output is reported as a note of that
    output, never raised: it must not stop the update for the selected one.
    """
    from livesplice.diff.compare import LineMap
    from livesplice.diff.elfmodel import strip_clone_numbers
    from livesplice.diff.engine import DiffJob, diff_many, refusals_once_per_type

    chosen = {link.name for link in selected.links}
    outputs = {link.name: _output_change(link) for link in pair.links if link.name not in chosen}
    if not outputs:
        return []
    diffed = {u.source for u in selected.units}
    rest = [
        u
        for u in sorted(pair.units, key=lambda u: u.source)
        if u.post is not None
        and u.source not in diffed
        and u.pre.language != "asm"
        and any(t in outputs for t in u.targets)
    ]
    unit_diffs = diff_many(
        [DiffJob(u.pre.object, u.post.object, u.source) for u in rest if u.post is not None],
        line_map=LineMap.from_patch(pair.patch_text),
        on_done=on_unit,
    )
    for unit, ud in zip(rest, unit_diffs, strict=True):
        for name in unit.targets:
            if name in outputs:
                out = outputs[name]
                out.changed_functions.extend(ud.changed_functions)
                out.new_functions.extend(ud.new_functions)
                out.new_data.extend(ud.new_data)
                out.unit_diffs.append(ud)
    # units shared with a selected output: the update's own diff says what changed in them
    shipped = [s for t in diff.targets for s in t.sections]
    for unit in pair.units:
        if unit.source not in diffed:
            continue
        for name in unit.targets:
            if name not in outputs:
                continue
            for s in shipped:
                if s.unit != unit.source:
                    continue
                if s.role == "replacement" and not strip_clone_numbers(s.name).endswith(".cold"):
                    outputs[name].changed_functions.append(s.name)
                elif s.role == "new_function":
                    outputs[name].new_functions.append(s.name)
                elif s.role == "new_data":
                    outputs[name].new_data.append(s.name)
    for unit in pair.units:  # a changed assembly source is a refusal of its outputs
        if unit.pre.language == "asm" and unit.source in pair.changed_asm:
            for name in unit.targets:
                if name in outputs:
                    outputs[name].refusals.append(
                        f"{unit.source}: assembly source changed [rule: changed assembly sources]"
                    )
    changed = []
    for out in outputs.values():
        out.changed_functions = sorted(set(out.changed_functions))
        out.new_functions = sorted(set(out.new_functions))
        out.new_data = sorted(set(out.new_data))
        out.refusals = sorted(
            set(
                refusals_once_per_type(
                    [*out.refusals, *(r for ud in out.unit_diffs for r in ud.refusals)],
                    out.unit_diffs,
                )
            )
        )
        if out.changed_functions or out.new_functions or out.new_data or out.refusals:
            changed.append(out)
    return sorted(changed, key=lambda o: o.name)


def _output_change(link: LinkRecord) -> OutputChange:
    soname = shared_object_name(link.output) if link.kind == "shared_library" else None
    return OutputChange(name=link.name, kind=link.kind, soname=soname)


def raise_target_unchanged(names: list[str], others: list[OutputChange]) -> None:
    """The named outputs are unchanged, others are not: say so, never "nothing to do"."""
    buildable = [o.name for o in others if not o.refusals]
    how = " ".join(f"--target {n}" for n in buildable)
    advice = (
        f"build the update for them: {how} (or no --target: every changed output)"
        if buildable
        else "an update for them would be refused (see each output)"
    )
    raise TargetUnchanged(
        f"the patch does not change {', '.join(names)} (--target), but it changes "
        f"{len(others)} other output(s) of the build",
        details=[o.describe() for o in others],
        advice=advice,
        outputs=[o.to_dict() for o in others],
    )


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
    """The source tree as an absolute path, refused early when missing or not a directory."""
    if not srcdir.exists():
        raise UsageError(f"source tree {srcdir} does not exist")
    if not srcdir.is_dir():
        raise UsageError(f"source tree {srcdir} is not a directory")
    return srcdir.resolve()


def read_patch(patch: Path) -> str:
    """The patch text, kept byte for byte (surrogateescape: a patch need not be UTF-8); a missing
    or unreadable patch is a usage error, not a traceback."""
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
