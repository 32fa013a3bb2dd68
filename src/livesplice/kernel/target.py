"""The kernel target: ``create --kernel``, and apply / view / undo on the running kernel.

create:  copy KSRC -> compile changed units pre/post (kbuild) -> diff (shared engine + kernel
         rules) -> plan + build the livepatch module -> write the update (+ livepatch.ko)
apply:   run-pre match every pre function against the running text (/proc/kcore,
         /proc/kallsyms) -> decide sympos -> insmod -> wait for the transition (progress;
         name blocking tasks; revert after a timeout)
view:    /sys/kernel/livepatch/livesplice_* (id, functions, state, taint)
undo:    enabled=0 -> wait for the transition -> rmmod
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from livesplice.errors import (
    CodeBusy,
    LivespliceError,
    NoPermission,
    NotApplied,
    PatchRefused,
    UsageError,
)
from livesplice.kernel import ksplice
from livesplice.update.archive import UpdateFile
from livesplice.update.format import Hook, Manifest, Target

if TYPE_CHECKING:
    from livesplice.kernel.kbuild import KernelBuild
    from livesplice.kernel.kdiff import KernelDiff
    from livesplice.kernel.klp import ModulePlan
    from livesplice.kernel.kmatch import KernelMatch
    from livesplice.kernel.package import KernelJson

LIVEPATCH = Path("/sys/kernel/livepatch")
TRANSITION_TIMEOUT = 60.0

Progress = Callable[[str], None]
"""Where the engine reports progress ("building ...", "transition in progress"): the CLI
prints it, a service logs it; the engine itself never prints."""


def _quiet(_msg: str) -> None:
    """The progress callback when the caller wants none."""


# ---------------------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------------------


class KernelCreateResult(NamedTuple):
    """What ``create --kernel`` made. A named tuple so callers may unpack it as
    ``manifest, output, seconds``; ``manifest`` and ``output`` are None when the patch changes
    no code of this kernel."""

    manifest: Manifest | None
    output: Path | None
    seconds: dict[str, float]  # per step (kbuild's, diff, module, total)


def create_kernel_update(
    ksrc: Path,
    patch: Path,
    *,
    update_id: str | None = None,
    output: Path | None = None,
    description: str | None = None,
    jobs: int = 2,
    keep_tmp: bool = False,
    progress: Progress | None = None,
    notes: list[str] | None = None,
    signing_key: Path | None = None,
) -> KernelCreateResult:
    """Build a kernel update from ``patch`` against the prepared tree ``ksrc``.

    The steps: check the inputs (before anything slow), compile the changed units pre and
    post (kbuild), diff them (the shared engine, then the kernel's rules), the manifest,
    :func:`_build_module` (plan, choose livepatch or the Ksplice path per function, build the
    .ko), write the update.

    :param notes: filled with why nothing was built (units this configuration does not
        build: the running kernel does not contain the patched code).
    """
    from livesplice.create import build_manifest, check_inputs
    from livesplice.kernel.kbuild import build_kernel_pair
    from livesplice.kernel.kdiff import diff_kernel_build
    from livesplice.kernel.package import write_kernel_update

    say = progress or _quiet
    t0 = time.monotonic()
    inputs = check_inputs(ksrc, patch, update_id, output, description, signing_key)
    workdir = Path(tempfile.mkdtemp(prefix="livesplice-kcreate-"))
    try:
        say("building the changed units (pre, post) ...")
        build = build_kernel_pair(inputs.srcdir, patch, inputs.patch_text, workdir, jobs=jobs)
        seconds = dict(build.seconds)
        if notes is not None:
            notes.extend(build.not_built)
        t1 = time.monotonic()
        kd = diff_kernel_build(build, inputs.patch_text)
        seconds["diff"] = time.monotonic() - t1
        manifest = build_manifest(inputs, build.compiler, kd.targets, kd.hooks, kd.warnings)
        if manifest is None:
            return KernelCreateResult(None, None, seconds)
        check_hook_kinds(kd.hooks)
        t2 = time.monotonic()
        say("building the livepatch module ...")
        plan, ko = _build_module(inputs.srcdir, build, kd, manifest, inputs.id, workdir)
        seconds["module"] = time.monotonic() - t2
        kernel = kernel_json(plan, kernel_release(inputs.srcdir))
        write_kernel_update(
            inputs.output, manifest, inputs.patch_text, ko, kernel, signing_key=signing_key
        )
        seconds["total"] = time.monotonic() - t0
        return KernelCreateResult(manifest, inputs.output, seconds)
    finally:
        if keep_tmp:
            say(f"kept the build directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _build_module(
    ksrc: Path,
    build: KernelBuild,
    kd: KernelDiff,
    manifest: Manifest,
    uid: str,
    workdir: Path,
) -> tuple[ModulePlan, bytes]:
    """Plan the livepatch module and build it: a replaced function with an ftrace entry goes
    through livepatch, one without through Ksplice's own jump (refused, with every reason,
    where that path cannot take it)."""
    from livesplice.kernel.kbuild import make_env
    from livesplice.kernel.klp import build_module, load_symbol_tables, plan_module

    targets = kd.targets
    modules = [t.name for t in targets if t.kind == "kernel_module"]
    # the prepared tree, not the work copy: the shipped .ko files (same-named symbols of a
    # module, whose sympos apply must decide) are found beside it, in the lab's root/
    tables = load_symbol_tables(ksrc, modules)
    plan = plan_module(uid, targets, tables, kd.specials, kd.learn)
    ksplice_funcs = ksplice.select_functions(targets)
    refused = ksplice.refusals(ksplice_funcs, manifest.hooks)
    if refused:
        raise PatchRefused("livesplice cannot make this update", refused)
    ksplice.split_plan(plan, ksplice_funcs)
    ko = build_module(
        build.tree,
        workdir / "module",
        plan,
        targets,
        manifest.hooks,
        uid,
        manifest.description,
        make_env(ksrc),
        kd.specials,
    )
    return plan, ko


def kernel_json(plan: ModulePlan, release: str) -> KernelJson:
    """kernel.json of the update: what apply needs beyond the manifest, from the module's
    plan (the functions in the order of the module's ``sympos=``/``ksplice_addr=`` lists)."""
    return {
        "module": plan.name,
        "release": release,
        "funcs": [{"object": o, "name": n} for o, n, _ in plan.funcs],
        "ksplice": [{"object": o, "name": n} for o, n, _, _ in plan.ksplice],
        "klp_symbols": [
            {
                "object": s.obj,
                "name": s.name,
                "count": s.count,
                "key": s.key,
                "learn": list(s.learn) if s.learn else None,
            }
            for s in plan.klp_symbols.values()
        ],
    }


def check_hook_kinds(hooks: list[Hook]) -> None:
    """Only hooks with a livepatch callback (klp_callbacks) can run in the kernel."""
    from livesplice.kernel.klp import CALLBACKS

    bad = [h for h in hooks if h.kind not in CALLBACKS]
    if bad:
        raise PatchRefused(
            "the patch has hooks the kernel target cannot run",
            [
                f"{h.function}: LIVESPLICE_{h.kind.upper()} [rule: hooks]: a kernel update runs "
                "hooks as livepatch callbacks, which exist only for PRE_APPLY (pre_patch), "
                "POST_APPLY (post_patch), PRE_REVERSE (pre_unpatch) and POST_REVERSE "
                "(post_unpatch); there is no stop window in the kernel"
                for h in bad
            ],
        )


def kernel_release(ksrc: Path) -> str:
    """The release (uname -r) a prepared tree builds, from utsrelease.h ("" if unknown):
    apply warns when the running kernel is another."""
    try:
        text = (ksrc / "include" / "generated" / "utsrelease.h").read_text()
        return text.split('"')[1]
    except (OSError, IndexError):
        return ""


# ---------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------


@dataclass
class KernelApplyReport:
    """What apply did to the running kernel; the CLI (or a service) turns it into words."""

    id: str
    module: str  # the livepatch module's name, also its /sys/kernel/livepatch directory
    functions: list[str]
    match_seconds: float  # run-pre matching against /proc/kcore
    transition_seconds: float  # insmod until every task runs the new code
    warnings: list[str] = field(default_factory=list)
    # Ksplice path only: how long the module's stop_machine held every CPU (None: not used)
    stop_microseconds: float | None = None


@dataclass
class _KernelApply:
    """What the steps of one kernel apply hand each other: the update's members, checked
    once by :func:`_prepare`, and what matching learned (filled by :func:`_match`)."""

    update_id: str
    name: str  # livesplice_<id>: the module and its /sys/kernel/livepatch directory
    module: bytes  # the livepatch module as shipped (sympos not yet decided)
    kernel: KernelJson
    targets: list[Target]
    warnings: list[str] = field(default_factory=list)
    match: KernelMatch | None = None
    match_seconds: float = 0.0
    params: list[str] = field(default_factory=list)  # insmod's module parameters
    stop_microseconds: float | None = None  # the Ksplice path's stop_machine, as measured


def apply_to_kernel(
    update: UpdateFile,
    *,
    transition_timeout: float = TRANSITION_TIMEOUT,
    progress: Progress | None = None,
) -> KernelApplyReport:
    """Load ``update`` (already read and signature-checked) into the running kernel.

    The steps, in order: :func:`_prepare` (refuse what cannot be applied here),
    :func:`_match` (run-pre matching; a mismatch, NO_MATCH, leaves the kernel untouched),
    :func:`_load` (decide ``sympos``, insmod), :func:`_transition` (wait until every task
    runs the new code; after ``transition_timeout`` seconds revert and raise CODE_BUSY, so
    the kernel is never left half-patched) and :func:`_report`. The kernel keeps the record
    itself (/sys/kernel/livepatch), so there is no journal to write.
    """
    say = progress or _quiet
    job = _prepare(update, say)
    _match(job, say)
    _load(job, say)
    seconds = _transition(job.name, transition_timeout, say)
    return _report(job, seconds)


def _prepare(update: UpdateFile, say: Progress) -> _KernelApply:
    """Refuse, before reading the running kernel, what cannot be applied here: a process
    update, a kernel without livepatch, an update already applied; warn about another
    release (matching decides whether the code is the same)."""
    from livesplice.kernel.package import read_kernel_members

    if not update.manifest.is_kernel:
        raise UsageError(
            f"update {update.manifest.id} is not a kernel update",
            advice="apply it to processes with --pid PID or --all",
        )
    module, kernel = read_kernel_members(update)
    name = kernel["module"]
    if not LIVEPATCH.is_dir():
        raise UsageError("this kernel has no livepatch support (/sys/kernel/livepatch)")
    if (LIVEPATCH / name).exists():
        raise UsageError(f"update {update.manifest.id} is already applied ({name})")
    job = _KernelApply(update.manifest.id, name, module, kernel, update.manifest.targets)
    release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    if kernel.get("release") and kernel.get("release") != release:
        job.warnings.append(f"built for {kernel.get('release')}, running {release}")
        say(f"warning: {job.warnings[-1]}")
    return job


def _match(job: _KernelApply, say: Progress) -> None:
    """Run-pre matching against /proc/kcore: every pre function must be the running code.
    It also decides each ``sympos`` and, for the Ksplice path, reads the bytes the jumps
    will replace (the module writes only if it finds them there)."""
    from livesplice.kernel.kmatch import KernelImage, run_pre_match_kernel

    t0 = time.monotonic()
    image = KernelImage.open()
    job.match = run_pre_match_kernel(image, job.targets, job.kernel)
    job.match_seconds = time.monotonic() - t0
    say(f"run-pre matched {len(job.match.functions)} function(s) in {job.match_seconds:.2f} s")
    sympos = [
        str(job.match.func_sympos.get(f"{f['object']}.{f['name']}", 0))
        for f in job.kernel.get("funcs", [])
    ]
    job.params = [f"sympos={','.join(sympos)}"] if sympos else []
    job.params += ksplice.module_params(job.kernel, job.match.functions, image.read)


def _load(job: _KernelApply, say: Progress) -> None:
    """Write the matched ``sympos`` into the module's klp symbols and insmod it; a busy
    Ksplice stop is retried (:func:`livesplice.kernel.ksplice.load_retrying`). The Ksplice
    path's module measures its own stop_machine: read it back while the module is new."""
    from livesplice.kernel.elfedit import set_klp_sympos

    assert job.match is not None, "_match runs first"
    module = set_klp_sympos(job.module, job.match.klp_sympos)
    for dep in module_depends(module):
        modprobe(dep, say)
    with tempfile.TemporaryDirectory(prefix="livesplice-kapply-") as tmp:
        ko = Path(tmp) / f"{job.name}.ko"
        ko.write_bytes(module)
        ksplice.load_retrying(lambda: insmod(ko, job.params), say)
    if job.kernel.get("ksplice"):
        job.stop_microseconds = ksplice.stop_microseconds(job.name)
    if job.stop_microseconds is not None:
        say(f"Ksplice path: the machine was stopped for {job.stop_microseconds:.0f} µs")


def _transition(name: str, timeout: float, say: Progress) -> float:
    """Wait for livepatch's transition (seconds it took); a stalled one is reverted, so a
    CODE_BUSY leaves the kernel as it was before the load."""
    t0 = time.monotonic()
    try:
        wait_transition(name, timeout, say)
    except CodeBusy:
        revert(name, say)
        raise
    return time.monotonic() - t0


def _report(job: _KernelApply, transition_seconds: float) -> KernelApplyReport:
    """The report of a finished apply: every replaced function, livepatch's and the
    Ksplice path's, under the names the update gave them."""
    ksplice_funcs = job.kernel.get("ksplice", [])
    return KernelApplyReport(
        id=job.update_id,
        module=job.name,
        functions=[f["name"] for f in [*job.kernel.get("funcs", []), *ksplice_funcs]],
        match_seconds=round(job.match_seconds, 3),
        transition_seconds=round(transition_seconds, 3),
        warnings=job.warnings,
        stop_microseconds=job.stop_microseconds,
    )


def module_depends(ko: bytes) -> list[str]:
    """The modules a .ko needs loaded before it: modpost's ``depends=`` in ``.modinfo``.

    insmod does not load them (modprobe would); new code calling a function another module
    exports (btrfs's fix calls ``crc32c`` of libcrc32c) makes the livepatch module need that
    module even when the patched module is not loaded yet.
    """
    from elftools.elf.elffile import ELFFile

    sec = ELFFile(io.BytesIO(ko)).get_section_by_name(".modinfo")
    if sec is None:
        return []
    for item in sec.data().split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[len(b"depends=") :].decode().split(",") if d]
    return []


def modprobe(name: str, say: Progress) -> None:
    """Load a module the livepatch module depends on (and its own dependencies)."""
    if Path("/sys/module", name.replace("-", "_")).exists():
        return
    say(f"loading module {name}, which the update needs")
    done = subprocess.run(["modprobe", name], capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(
            f"the update needs module {name} loaded, and modprobe {name} failed",
            [done.stderr.strip() or f"exit {done.returncode}"],
            f"load {name} (modprobe {name}) and apply again",
        )


def insmod(ko: Path, params: list[str]) -> None:
    """Load a module; the kernel's refusal (with the tail of its log) becomes a typed error."""
    done = subprocess.run(["insmod", str(ko), *params], capture_output=True, text=True)
    if done.returncode != 0:
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
        err: type[LivespliceError] = UsageError
        if "not permitted" in done.stderr:
            err = NoPermission
        raise err(
            "the kernel refused the livepatch module",
            [done.stderr.strip(), *[line for line in dmesg[-12:] if line.strip()]],
            "check the kernel log; the running kernel may differ from the tree the update "
            "was built against",
        )


def patch_state(name: str) -> dict[str, str]:
    """The livepatch's ``enabled`` and ``transition`` files ("?" when unreadable: it may be
    going away while we look)."""
    d = LIVEPATCH / name
    out = {}
    for f in ("enabled", "transition"):
        try:
            out[f] = (d / f).read_text().strip()
        except OSError:
            out[f] = "?"
    return out


def blocking_tasks(name: str) -> list[str]:
    """Tasks not yet switched: /proc/PID/patch_state differs from the patch's target state."""
    state = patch_state(name)
    goal = "1" if state.get("enabled") == "1" else "0"
    lines: list[str] = []
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        for task in sorted((proc / "task").glob("[0-9]*"), key=lambda p: int(p.name)):
            try:
                ps = (task / "patch_state").read_text().strip()
            except OSError:
                continue
            if ps in ("-1", goal):
                continue
            try:
                comm = (task / "comm").read_text().strip()
                stack = (task / "stack").read_text().strip().splitlines()
            except OSError:
                comm, stack = "?", []
            lines.append(f"pid {task.name} ({comm}) patch_state={ps}")
            lines.extend(f"    {s}" for s in stack[:12])
    return lines


def wait_transition(name: str, timeout: float, progress: Progress | None = None) -> None:
    """Wait until livepatch ``name`` is no longer in transition.

    :raises CodeBusy: after ``timeout`` seconds, naming the tasks still running old code
        (the caller decides whether to reverse the transition).
    """
    say = progress or _quiet
    t0 = time.monotonic()
    last = 0.0
    while True:
        state = patch_state(name)
        if state["transition"] != "1":
            return
        elapsed = time.monotonic() - t0
        if elapsed - last >= 2.0:
            last = elapsed
            say(f"transition of {name} in progress ({elapsed:.0f} s)")
        if elapsed > timeout:
            raise CodeBusy(
                f"the livepatch transition of {name} did not finish in {timeout:.0f} s",
                ["tasks not yet switched (patch_state, stack):", *blocking_tasks(name)],
                "a task sleeps inside a function being replaced; retry when it is idle",
            )
        time.sleep(0.1)


def revert(name: str, progress: Progress | None = None) -> None:
    """Reverse a stalled transition: writing 0 to enabled reverses it (livepatch.rst 3.1)."""
    (progress or _quiet)(f"reverting {name}")
    with contextlib.suppress(OSError):
        (LIVEPATCH / name / "enabled").write_text("0")
    t0 = time.monotonic()
    while (LIVEPATCH / name).exists() and time.monotonic() - t0 < TRANSITION_TIMEOUT:
        if patch_state(name)["transition"] != "1":
            break
        time.sleep(0.1)
    subprocess.run(["rmmod", name], capture_output=True)


# ---------------------------------------------------------------------------------------
# view / undo
# ---------------------------------------------------------------------------------------


@dataclass
class KernelPatchView:
    """One livesplice livepatch loaded in the running kernel, as view shows it."""

    id: str
    module: str
    functions: list[str]  # "object:function,sympos" as /sys/kernel/livepatch names them
    enabled: bool
    transition: bool
    taint: int  # /proc/sys/kernel/tainted (livepatch sets TAINT_LIVEPATCH)

    def to_dict(self) -> dict[str, Any]:
        """The JSON row of ``view --json``'s "kernel" list."""
        return asdict(self)


def view_kernel() -> list[KernelPatchView]:
    """The livesplice livepatches in /sys/kernel/livepatch (none without livepatch support)."""
    out: list[KernelPatchView] = []
    if not LIVEPATCH.is_dir():
        return out
    taint = Path("/proc/sys/kernel/tainted").read_text().strip()
    for d in sorted(LIVEPATCH.glob("livesplice_*")):
        functions = []
        for obj in sorted(p for p in d.iterdir() if p.is_dir()):
            for fn in sorted(p for p in obj.iterdir() if p.is_dir()):
                functions.append(f"{obj.name}:{fn.name}")
        functions += [f"vmlinux:{f} (jump)" for f in ksplice.spliced(d.name)]
        state = patch_state(d.name)
        out.append(
            KernelPatchView(
                id=d.name.removeprefix("livesplice_"),
                module=d.name,
                functions=functions,
                enabled=state["enabled"] == "1",
                transition=state["transition"] == "1",
                taint=int(taint),
            )
        )
    return out


def is_applied_to_kernel(update_id: str) -> bool:
    """Whether a livepatch of ``update_id`` is loaded (how undo tells kernel from process)."""
    from livesplice.kernel.klp import module_name

    return (LIVEPATCH / module_name(update_id)).exists()


@dataclass
class KernelUndoReport:
    """What undo did: the livepatch was disabled, its transition finished, it was unloaded."""

    id: str
    module: str
    transition_seconds: float


def undo_kernel(
    update_id: str, *, timeout: float = TRANSITION_TIMEOUT, progress: Progress | None = None
) -> KernelUndoReport:
    """Disable and unload the livepatch of ``update_id``.

    The steps mirror apply's: :func:`_applied_module` (NOT_APPLIED), :func:`_unsplice` (the
    Ksplice path's jumps out first), :func:`_reverse_transition` and :func:`_unload`. A
    reverse transition that does not finish in ``timeout`` seconds is itself reversed, so
    the update stays fully applied (CODE_BUSY) rather than half-undone.
    """
    say = progress or _quiet
    name = _applied_module(update_id)
    t0 = time.monotonic()
    jumps = _unsplice(name, say)
    _reverse_transition(name, timeout, jumps, say)
    seconds = time.monotonic() - t0
    _unload(name)
    return KernelUndoReport(id=update_id, module=name, transition_seconds=round(seconds, 3))


def _applied_module(update_id: str) -> str:
    """The livepatch module of ``update_id``, which must be loaded (NOT_APPLIED otherwise)."""
    from livesplice.kernel.klp import module_name

    name = module_name(update_id)
    if not (LIVEPATCH / name).exists():
        raise NotApplied(
            f"kernel update {update_id} is not applied",
            advice="`livesplice view` lists the applied updates",
        )
    return name


def _unsplice(name: str, say: Progress) -> bool:
    """Take the Ksplice path's jumps out before livepatch's own functions (whether there
    were any). A CODE_BUSY here changed nothing yet."""
    jumps = bool(ksplice.spliced(name))
    if jumps:
        ksplice.unsplice(name, say)
    return jumps


def _reverse_transition(name: str, timeout: float, jumps: bool, say: Progress) -> None:
    """Disable the livepatch and wait for its reverse transition; a stalled one is reversed
    again and the jumps put back, so the update stays fully applied (CODE_BUSY)."""
    (LIVEPATCH / name / "enabled").write_text("0")
    try:
        wait_transition(name, timeout, say)
    except CodeBusy:
        (LIVEPATCH / name / "enabled").write_text("1")  # reverse the reverse: stay applied
        if jumps:
            ksplice.resplice(name, say)
        raise


def _unload(name: str) -> None:
    """rmmod the disabled livepatch; a failure lists the livepatches still loaded, which is
    what a person needs to tell why (the module is in use, or another patch depends on it)."""
    done = subprocess.run(["rmmod", name], capture_output=True, text=True)
    if done.returncode != 0:
        stack = sorted(p.name for p in LIVEPATCH.iterdir()) if LIVEPATCH.is_dir() else []
        raise UsageError(f"rmmod {name} failed", [done.stderr.strip(), f"patches: {stack}"])
