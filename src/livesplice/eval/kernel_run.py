"""One kernel corpus row end to end, as a user would run it: prepare -> fetch -> create -> boot.

1. ``prepare``: the pre kernel in the lab (``lab prepare --kernel PRE --flavour F``; cached).
2. ``fetch``: the row's files from ``linux-source`` POST (cached), ``diff -u`` against the
   prepared tree: the fix as a patch.
3. ``create``: ``create --kernel``, timed; a refusal keeps livesplice's reason and rules, no
   code change is "nothing", code the flavour does not build is "not built".
4. ``guest``: one boot of the pre kernel with the update, the modules and the check
   (:mod:`livesplice.eval.kernel_guest`); apply's figures, undo's result, the checks and
   the guest's health decide applied / failed / unsafe.

The lab or a download failing is ``harness``: no answer from livesplice, not counted against it.
"""

from __future__ import annotations

import hashlib
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from livesplice.errors import LivespliceError, PatchRefused
from livesplice.eval.kernel_guest import (
    GuestRun,
    baseline_script,
    baseline_sites,
    check_state,
    guest_script,
    read_guest_output,
    unsafe_lines,
)
from livesplice.eval.kernel_rows import CheckRun, KernelRow, KernelRowResult, result_for

Progress = Callable[[str], None]
GUEST_TIMEOUT = 420.0  # one boot: apply twice (TCG run-pre matching), checks, undo twice
_RULE = re.compile(r"\[rule: ([^\]]+)\]")
_ERROR = re.compile(r"^livesplice: [A-Z_]+: ")

# The files of the package that decide a row's outcome: a change to any of them invalidates
# the cached results. The command line, the table and the judgement against `expected`
# (re-done whenever results are tabulated) do not.
_NOT_OUTCOME = ("eval/kernel.py", "eval/kernel_report.py", "eval/kernel_rows.py")


def livesplice_source_hash() -> str:
    """A digest of livesplice's own source (the kernel target and everything it uses)."""
    import livesplice

    root = Path(livesplice.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or p.suffix not in (".py", ".c", ".h", ".S") or rel in _NOT_OUTCOME:
            continue
        if rel.startswith("eval/") and not rel.startswith("eval/kernel"):
            continue  # the user-space evaluation
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def livesplice_commit() -> str:
    """The git commit livesplice runs from (``+`` when its tree has changes), or ""."""
    import subprocess

    import livesplice

    here = Path(livesplice.__file__).parent
    done = subprocess.run(
        ["git", "-C", str(here), "describe", "--always", "--dirty=+", "--abbrev=10"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


@dataclass(frozen=True)
class RowSetup:
    """What every row of one run shares."""

    checks_dir: Path  # kernel-checks/ beside the CSV
    workdir: Path  # patches, updates, guest logs of this run
    jobs: int = 2
    signing_key: Path | None = None
    trusted_dir: Path | None = None  # the public half, placed in the guest
    progress: Progress = print


def run_kernel_row(row: KernelRow, setup: RowSetup) -> KernelRowResult:
    """The row's result; never raises for livesplice's or the lab's failures (they are the
    result), only for a bug in the evaluation itself."""
    result = result_for(row)
    result.livesplice_source = livesplice_source_hash()
    result.livesplice_commit = livesplice_commit()
    rowdir = setup.workdir / row.name
    rowdir.mkdir(parents=True, exist_ok=True)
    try:
        _run(row, setup, rowdir, result)
    except LivespliceError as e:
        # a lab step the evaluation needs (prepare, fetch, modules, boot before apply)
        result.finish("harness", f"{result.stage}: {e.abort}: {e.reason}", e.details[-20:])
    return result


def _run(row: KernelRow, setup: RowSetup, rowdir: Path, result: KernelRowResult) -> None:
    from livesplice.kernel.corpus import make_patch, source_files
    from livesplice.kernel.lab import prepare_lab

    say = setup.progress
    result.stage = "prepare"
    say(f"{row.name}: lab prepare --kernel {row.pre_version} --flavour {row.flavour}")
    lab = prepare_lab(row.pre_version, row.flavour, jobs=setup.jobs, progress=say)
    result.stage = "fetch"
    post = source_files(row.post_version, list(row.files))
    patch = rowdir / "fix.patch"
    patch.write_text(make_patch(lab.ksrc, post, list(row.files)))
    if not patch.read_text().strip():
        result.finish(
            "nothing", f"{' '.join(row.files)}: identical in {row.pre_version} and the post tree"
        )
        return
    result.stage = "create"
    say(f"{row.name}: create --kernel ({' '.join(row.files)})")
    update = rowdir / f"{row.update_id}.update"
    created = _create(lab.ksrc, patch, update, row, setup, result)
    if not created:
        return
    result.stage = "guest"
    say(f"{row.name}: booting {lab.release} to apply, check and undo")
    _guest(lab, update, row, setup, rowdir, result)


def _create(
    ksrc: Path,
    patch: Path,
    update: Path,
    row: KernelRow,
    setup: RowSetup,
    result: KernelRowResult,
) -> bool:
    """``create --kernel``; True when an update was written (else the result is final)."""
    from livesplice.kernel.target import create_kernel_update

    notes: list[str] = []
    t0 = time.monotonic()
    try:
        manifest, _path, _seconds = create_kernel_update(
            ksrc,
            patch,
            update_id=row.update_id,
            output=update,
            description=f"{' '.join(row.cves)} ({row.pre_version} -> {row.post_version})",
            jobs=setup.jobs,
            notes=notes,
            signing_key=setup.signing_key,
        )
    except PatchRefused as e:
        result.create_seconds = round(time.monotonic() - t0, 1)
        result.rules = sorted({m for d in e.details for m in _RULE.findall(d)})
        result.finish("refused", e.reason, e.details)
        return False
    except LivespliceError as e:
        # BUILD_FAILED included: the lab tree builds, so a unit that does not is create's
        # failure, not the harness's
        result.create_seconds = round(time.monotonic() - t0, 1)
        result.finish("failed", f"create: {e.abort}: {e.reason}", e.details[-20:])
        return False
    except Exception as e:  # a crash of create is a result worth tabulating
        result.create_seconds = round(time.monotonic() - t0, 1)
        result.finish(
            "failed",
            f"create crashed: {type(e).__name__}: {e}",
            traceback.format_exc().splitlines()[-12:],
        )
        return False
    result.create_seconds = round(time.monotonic() - t0, 1)
    result.notes = notes
    if manifest is None:
        if notes:
            result.finish("not_built", "not built in this flavour: " + "; ".join(notes))
        else:
            result.finish("nothing", "no code changes: nothing to do")
        return False
    result.functions = [f for t in manifest.targets for f in t.changed_functions]
    result.objects = [t.name for t in manifest.targets]
    return True


def _guest(
    lab: object,
    update: Path,
    row: KernelRow,
    setup: RowSetup,
    rowdir: Path,
    result: KernelRowResult,
) -> None:
    from livesplice.kernel.guest import Guest, GuestCrashed
    from livesplice.kernel.initramfs import GuestFile
    from livesplice.kernel.klp import module_name
    from livesplice.kernel.lab import LabKernel
    from livesplice.kernel.modules import modules_initrd
    from livesplice.kernel.overlay import ensure_overlay
    from livesplice.update.archive import read_update

    assert isinstance(lab, LabKernel)
    targets = read_update(update).manifest.targets
    patched = [t.name for t in targets if t.kind == "kernel_module"]
    files = [GuestFile(update, "u/fix.update")]
    check = None
    if row.check:
        script = setup.checks_dir / f"{row.check}.sh"
        for p in sorted(setup.checks_dir.iterdir()):
            if p.is_file():
                files.append(GuestFile(p, f"checks/{p.name}"))
        if "VMLINUZ" in script.read_text():  # the kexec checks load the kernel image
            files.append(GuestFile(lab.vmlinuz, "vmlinuz"))
        check = f"/payload/checks/{row.check}.sh"
    prologue = "export VMLINUZ=/payload/vmlinuz\n"
    if setup.trusted_dir is not None:
        for p in sorted(setup.trusted_dir.glob("*.pub")):
            files.append(GuestFile(p, f"trusted/{p.name}"))
        prologue += "export LIVESPLICE_TRUST_DIR=/payload/trusted\n"
    script_text = prologue + guest_script(
        update="/payload/u/fix.update",
        update_id=row.update_id,
        patch_module=module_name(row.update_id),
        patched_modules=patched,
        extra_modules=row.modules,
        check=check,
    )
    initrds = [ensure_overlay(lab.dir)]
    wanted = list(dict.fromkeys([*patched, *row.modules]))
    if wanted:
        initrds.append(modules_initrd(lab, wanted))
    keep = rowdir / "guest"
    guest = Guest(lab, timeout=GUEST_TIMEOUT, extra_initrds=initrds)
    try:
        r = guest.run(script_text, files, keep_dir=keep)
        output, crashed = r.output, None
        result.guest_seconds = round(r.wall_seconds, 1)
    except GuestCrashed as e:
        log = keep / "payload.log"
        output = log.read_text(errors="replace") if log.exists() else ""
        output = output.split("@@LAB begin", 1)[-1]
        crashed = e
    (rowdir / "guest-output.txt").write_text(output)
    run = read_guest_output(output)
    baseline: frozenset[str] = frozenset()
    if wanted and unsafe_lines(run):
        # trouble while modules were loaded: is it the kernel's own? The same modules, the
        # same kernel, no update (one more boot, ~5 s, only for such rows)
        try:
            base = Guest(lab, timeout=GUEST_TIMEOUT, extra_initrds=initrds)
            baseline = baseline_sites(base.run(baseline_script(wanted), []).output)
        except GuestCrashed:
            pass  # no baseline: everything counts
        if baseline:
            result.notes.append(
                "not counted, printed without any update when the same modules load: "
                + "; ".join(sorted(baseline))[:300]
            )
    judge_guest(run, patched, result, crashed, baseline)


def judge_guest(
    run: GuestRun,
    patched: list[str],
    result: KernelRowResult,
    crashed: LivespliceError | None = None,
    baseline: frozenset[str] = frozenset(),
) -> None:
    """The row's final outcome from what the guest printed (and whether it crashed).

    ``baseline``: trouble sites the kernel prints without any update (see unsafe_lines)."""
    import json

    for phase in ("b-loaded", "before", "after", "after-undo"):
        rc = run.status(f"check.{phase}")
        if rc is not None:
            result.checks[phase] = CheckRun(rc, check_state(run.text(f"check.{phase}")))
    for m in patched:
        if f"patched.{m}" in run.values:
            result.patched_on_load[m] = run.values[f"patched.{m}"] == "1"
    try:
        doc = json.loads(run.text("apply.apply") or "{}")
    except json.JSONDecodeError:
        doc = {}
    result.match_seconds = doc.get("match_seconds")
    result.transition_seconds = doc.get("transition_seconds")
    if "stop_ns.apply" in run.values:
        result.stop_us = round(int(run.values["stop_ns.apply"]) / 1000, 1)
    if run.status("undo.undo") is not None:
        result.undo_ok = run.status("undo.undo") == 0
    result.unsafe_lines = unsafe_lines(run, baseline)
    livesplice_acted = any(p in run.phases for p in ("b-apply", "apply"))

    if crashed is not None:
        last = run.phases[-1] if run.phases else "boot"
        details = [f"last phase begun: {last}", *crashed.details[-25:]]
        if livesplice_acted and last not in ("before", "after-undo"):
            result.finish("unsafe", f"the guest crashed or hung in phase {last}", details)
        else:  # the boot, or a check on the unpatched code: the harness's
            result.finish(
                "harness", f"the guest crashed in phase {last} ({crashed.reason})", details
            )
        return
    if result.unsafe_lines:
        result.finish("unsafe", "the kernel reported trouble", result.unsafe_lines[:10])
        return
    if not run.alive:
        result.finish("unsafe", "the guest stopped answering (the script did not finish)")
        return
    before = result.checks.get("before")
    if "modprobe-failed" in run.values:
        m = run.values["modprobe-failed"]
        result.finish("harness", f"modprobe {m} failed on the unpatched kernel", run.stray[-10:])
        return
    if before is not None and before.status != 0:
        result.finish(
            "harness",
            f"the check fails (exit {before.status}) on the unpatched kernel",
            run.text("check.before").splitlines()[-10:],
        )
        return
    for phase in ("b-apply", "apply"):
        rc = run.status(f"apply.{phase}")
        if rc not in (None, 0):
            lines = run.text(f"apply.{phase}").splitlines()
            result.finish(
                "failed", f"apply ({phase}): exit {rc}: {_first_error(lines)}", lines[-20:]
            )
            return
    problems = []
    for m, ok in result.patched_on_load.items():
        if not ok:
            problems.append(
                f"{m} loaded under the update but not patched ({run.values[f'patched.{m}']})"
            )
    for phase in ("b-undo", "undo"):
        rc = run.status(f"undo.{phase}")
        if rc not in (None, 0):
            problems.append(
                f"undo ({phase}): exit {rc}: {_first_error(run.text(f'undo.{phase}').splitlines())}"
            )
    if run.status("apply.apply") is None and not problems:
        problems.append("apply never ran")
    for phase in ("b-loaded", "after"):
        c = result.checks.get(phase)
        if c is not None and (c.status != 0 or c.state == "vulnerable"):
            problems.append(
                f"the check {'fails' if c.status else 'still shows the bug'} with the fix "
                f"applied ({phase}: exit {c.status}, {c.state or 'no STATE'})"
            )
    if problems:
        result.finish("failed", "; ".join(problems))
        return
    undone = result.checks.get("after-undo")
    if undone is not None and undone.state == "fixed" and (before and before.state == "vulnerable"):
        result.notes.append("the check still shows the fix after undo")
    how = "Ksplice path" if result.stop_us is not None else "livepatch"
    result.finish(
        "applied",
        f"{', '.join(result.functions)} in {', '.join(result.objects)} ({how}); undone",
    )


def _first_error(lines: list[str]) -> str:
    """The line of livesplice's error paragraph that says what happened (``ABORT: reason``)."""
    for line in lines:
        if _ERROR.match(line):
            return line[len("livesplice: ") :]
    return lines[-1] if lines else "(no output)"
