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
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from livesplice.update.format import Hook, Manifest

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
) -> tuple[Manifest | None, Path | None, dict[str, float]]:
    """Build a kernel update from ``patch`` against the prepared tree ``ksrc``.

    :param notes: filled with why nothing was built (units this configuration does not
        build: the running kernel does not contain the patched code).
    :returns: (manifest, output path, seconds per step); (None, None, ...) when the patch
        changes no code of this kernel.
    """
    from livesplice.create import build_manifest, check_inputs
    from livesplice.kernel.kbuild import build_kernel_pair, make_env
    from livesplice.kernel.kdiff import diff_kernel_build
    from livesplice.kernel.klp import build_module, load_symbol_tables, plan_module
    from livesplice.kernel.package import write_kernel_update

    say = progress or _quiet
    t0 = time.monotonic()
    inputs = check_inputs(ksrc, patch, update_id, output, description, signing_key)
    ksrc, patch_text, uid, out = inputs.srcdir, inputs.patch_text, inputs.id, inputs.output
    workdir = Path(tempfile.mkdtemp(prefix="livesplice-kcreate-"))
    try:
        say("building the changed units (pre, post) ...")
        build = build_kernel_pair(ksrc, patch, patch_text, workdir, jobs=jobs)
        seconds = dict(build.seconds)
        if notes is not None:
            notes.extend(build.not_built)
        t1 = time.monotonic()
        kd = diff_kernel_build(build, patch_text)
        targets, warnings = kd.targets, kd.warnings
        seconds["diff"] = time.monotonic() - t1
        manifest = build_manifest(inputs, build.compiler, targets, kd.hooks, warnings)
        if manifest is None:
            return None, None, seconds
        check_hook_kinds(kd.hooks)
        t2 = time.monotonic()
        say("building the livepatch module ...")
        modules = [t.name for t in targets if t.kind == "kernel_module"]
        tables = load_symbol_tables(build.tree, modules)
        plan = plan_module(uid, targets, tables, kd.specials, kd.learn)
        # path selection: an ftrace entry -> livepatch; none -> Ksplice's own jump
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
        seconds["module"] = time.monotonic() - t2
        kernel = {
            "module": plan.name,
            "release": kernel_release(ksrc),
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
        write_kernel_update(out, manifest, patch_text, ko, kernel, signing_key=signing_key)
        seconds["total"] = time.monotonic() - t0
        return manifest, out, seconds
    finally:
        if keep_tmp:
            say(f"kept the build directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


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


def apply_to_kernel(
    update: UpdateFile,
    *,
    transition_timeout: float = TRANSITION_TIMEOUT,
    progress: Progress | None = None,
) -> KernelApplyReport:
    """Load ``update`` (already read and signature-checked) into the running kernel.

    Run-pre matching happens before anything is loaded, so a mismatch (NO_MATCH) leaves the
    kernel untouched; a transition that does not finish within ``transition_timeout`` seconds
    is reverted and raised as CODE_BUSY, so the kernel is never left half-patched.
    """
    from livesplice.kernel.elfedit import set_klp_sympos
    from livesplice.kernel.kmatch import KernelImage, run_pre_match_kernel
    from livesplice.kernel.package import read_kernel_members

    say = progress or _quiet
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
    warnings: list[str] = []
    release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    if kernel.get("release") and kernel["release"] != release:
        warnings.append(f"built for {kernel['release']}, running {release}")
        say(f"warning: {warnings[-1]}")
    t0 = time.monotonic()
    image = KernelImage.open()
    match = run_pre_match_kernel(image, update.manifest.targets, kernel)
    match_seconds = time.monotonic() - t0
    say(f"run-pre matched {len(match.functions)} function(s) in {match_seconds:.2f} s")
    module = set_klp_sympos(module, match.klp_sympos)
    sympos = [str(match.func_sympos.get(f"{f['object']}.{f['name']}", 0)) for f in kernel["funcs"]]
    params = [f"sympos={','.join(sympos)}"] if sympos else []
    params += ksplice.module_params(kernel, match.functions, image.read)
    with tempfile.TemporaryDirectory(prefix="livesplice-kapply-") as tmp:
        ko = Path(tmp) / f"{name}.ko"
        ko.write_bytes(module)
        ksplice.load_retrying(lambda: insmod(ko, params), say)
    stop_us = ksplice.stop_microseconds(name) if kernel.get("ksplice") else None
    if stop_us is not None:
        say(f"Ksplice path: the machine was stopped for {stop_us:.0f} µs")
    t1 = time.monotonic()
    try:
        wait_transition(name, transition_timeout, say)
    except CodeBusy:
        revert(name, say)
        raise
    return KernelApplyReport(
        id=update.manifest.id,
        module=name,
        functions=[f["name"] for f in [*kernel["funcs"], *kernel.get("ksplice", [])]],
        match_seconds=round(match_seconds, 3),
        transition_seconds=round(time.monotonic() - t1, 3),
        warnings=warnings,
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

    A reverse transition that does not finish in ``timeout`` seconds is itself reversed, so
    the update stays fully applied (CODE_BUSY) rather than half-undone.
    """
    from livesplice.kernel.klp import module_name

    say = progress or _quiet
    name = module_name(update_id)
    if not (LIVEPATCH / name).exists():
        raise NotApplied(
            f"kernel update {update_id} is not applied",
            advice="`livesplice view` lists the applied updates",
        )
    stack = sorted(p.name for p in LIVEPATCH.iterdir())
    t0 = time.monotonic()
    jumps = ksplice.spliced(name)
    if jumps:
        ksplice.unsplice(name, say)  # CODE_BUSY here: nothing changed yet
    (LIVEPATCH / name / "enabled").write_text("0")
    try:
        wait_transition(name, timeout, say)
    except CodeBusy:
        (LIVEPATCH / name / "enabled").write_text("1")  # reverse the reverse: stay applied
        if jumps:
            ksplice.resplice(name, say)
        raise
    seconds = time.monotonic() - t0
    done = subprocess.run(["rmmod", name], capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"rmmod {name} failed", [done.stderr.strip(), f"patches: {stack}"])
    return KernelUndoReport(id=update_id, module=name, transition_seconds=round(seconds, 3))
