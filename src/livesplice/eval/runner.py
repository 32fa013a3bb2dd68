"""One corpus row end to end: fetch -> trees -> create -> run under load -> apply -> undo."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livesplice.build.debian import fetch_binaries, fetch_source_version, unverified_downloads
from livesplice.errors import LivespliceError
from livesplice.eval.corpus import CorpusRow
from livesplice.eval.create_step import DEFAULT_BUILD, livesplice_command, run_create
from livesplice.eval.sources import (
    fetch_source,
    install_build_deps,
    make_shipped_trees,
    make_trees,
)
from livesplice.eval.workloads import (
    GenericLibraryWorkload,
    Workload,
    WorkloadFailed,
    generic_candidates,
    workload_for,
)

SETTLE = 1.0  # seconds of load before and after each live step

# observed outcome x expected -> verdict
VERDICTS = {
    ("applied", "apply"): "ok",
    ("nothing", "nothing"): "ok",
    ("refused", "refuse"): "ok",
    # the one dangerous answer: code swapped where it cannot be made safe
    ("applied", "refuse"): "UNSAFE",
}


def verdict(outcome: str, expected: str) -> str:
    """``ok``, ``UNSAFE`` (applied when it should be refused), ``failed``, ``mismatch``, or
    ``harness`` (the package's own pre tree did not build here: no answer from livesplice)."""
    if outcome in ("failed", "harness"):
        return outcome
    return VERDICTS.get((outcome, expected), "mismatch")


@dataclass
class RowResult:
    """One corpus row's result: its outcome, the verdict against the row's expectation, where it
    stopped and what was measured on the way (written to result.json and the table)."""

    row: dict[str, Any]
    outcome: str = "failed"  # applied | nothing | refused | failed
    verdict: str = "failed"
    reason: str = ""
    details: list[str] = field(default_factory=list)
    stage: str = ""  # where it stopped: fetch, trees, create, start, apply, undo, done
    create_seconds: float | None = None
    functions: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    pause_us: float | None = None
    apply_seconds: float | None = None
    undo_pause_us: float | None = None
    requests_during_apply: int | None = None
    requests_total: int | None = None
    failed_requests: int | None = None
    same_pids: bool | None = None
    repro_before: str | None = None
    repro_after: str | None = None
    repro_after_undo: str | None = None
    build_command: str = ""
    jobs: int | None = None  # the -j of the create that counted (1 after a serial retry)
    # what ran: "livesplice's pre build", or Debian's binary ("redis-server: usr/bin/...")
    binary: str = ""
    # files fetched from Debian's pools by URL, not through apt's signed index
    unverified: list[str] = field(default_factory=list)
    signed_by: str | None = None  # key id of the update's verified signature
    finished_at: str = ""

    def finish(self, outcome: str, reason: str = "", details: list[str] | None = None) -> None:
        """Record how the row ended and judge it against ``expected`` (the verdict is only ever
        set here)."""
        self.outcome = outcome
        self.reason = reason
        if details:
            self.details = details
        self.verdict = verdict(outcome, self.row["expected"])
        self.finished_at = time.strftime("%Y-%m-%d %H:%M:%S %z")


def find_target(pre_outputs: Path, target: str) -> Path | None:
    """The pre build's linked output for ``target`` (an executable name or a soname)."""
    found: list[Path] = []
    for p in pre_outputs.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        if p.name == target or (".so" in target and p.name.startswith(target + ".")):
            with p.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(p)
    found.sort(key=lambda p: (p.name != target, len(p.parts), str(p)))
    return found[0] if found else None


def shipped_target(debs: list[Path], root: Path, target: str) -> Path | None:
    """Unpack Debian's packages under ``root`` and return the target as the package
    installs it: a program by its installed name (a symlink stays a symlink: Debian's
    /usr/bin/redis-server -> redis-check-rdb), a library by its soname link."""
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
    for d in ("usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"):
        p = root / d / target
        if p.exists():
            return p
    return None


def cli(args: list[str], log: Path) -> tuple[int, dict[str, Any], str]:
    """Run the livesplice command as a user would, appending the command and its output to the
    row's log; returns (exit code, its JSON or {}, stderr)."""
    proc = subprocess.run(
        [*livesplice_command(), *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    with log.open("a") as f:
        f.write(
            f"$ livesplice {' '.join(args)}\n# exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n"
        )
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        doc = {}
    return proc.returncode, doc, proc.stderr.strip()


def run_row(
    row: CorpusRow,
    cache: Path,
    *,
    build: str = DEFAULT_BUILD,
    jobs: int = 2,
    keep: bool = False,
    progress: Callable[[str], None] = print,
) -> RowResult:
    """One corpus row end to end, its result also written to the row's result.json; a livesplice
    error ends the row as "failed" with its reason instead of stopping the whole run."""
    rowdir = cache / "rows" / row.slug
    rowdir.mkdir(parents=True, exist_ok=True)
    result = RowResult(row=asdict(row), build_command=build)
    try:
        _run(row, rowdir, cache, result, build=build, jobs=jobs, keep=keep, progress=progress)
    except LivespliceError as e:
        result.finish("failed", f"{result.stage}: {e.reason}", e.details)
    (rowdir / "result.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _run(
    row: CorpusRow,
    rowdir: Path,
    cache: Path,
    result: RowResult,
    *,
    build: str,
    jobs: int,
    keep: bool,
    progress: Callable[[str], None],
) -> None:
    result.stage = "fetch"
    progress(f"{row.package} {row.version}: fetching the source")
    dsc = fetch_source(row, cache)
    debs: list[Path] = []
    result.stage = "trees"
    if row.on_shipped_binaries:
        # Debian's own binaries: pre is the shipped version as built, the fix comes from the
        # newer version; create verifies the update against the .debs users have installed
        shipped = fetch_source_version(row.package, row.shipped_version, cache)
        debs = fetch_binaries(row.package, row.shipped_version, row.binaries.split(), cache)
        trees = make_shipped_trees(row, shipped, dsc, rowdir)
        result.unverified = unverified_downloads(row.package, cache)
        dsc = shipped
    else:
        trees = make_trees(row, dsc, rowdir)
    install_build_deps(dsc, trees.pre)
    if not trees.fix_patch.read_bytes().strip():
        result.finish("nothing", "the fix changes only debian/ (no source file)")
        return

    result.stage = "create"
    progress(
        f"{row.package}: livesplice create ({trees.pre_patches} patches in pre, "
        f"fix {' '.join(trees.fix_patches)})"
    )
    update = rowdir / f"{row.update_id}.update"
    created = run_create(
        trees.pre,
        trees.fix_patch,
        update,
        row.update_id,
        rowdir / "create.log",
        build=build,
        jobs=jobs,
        target=row.target,
        verify=debs,
    )
    result.jobs = jobs
    if (
        created.status in ("failed", "harness")
        and created.reason.startswith("BUILD_FAILED")
        and jobs > 1
    ):
        # Some packages' makefiles race under -j (libxml2 2.9.14: the python binding links
        # ../libxml2.la before it exists). The evaluation measures live patching, not the
        # package's parallel build, so a failed parallel build gets one serial retry.
        progress(f"{row.package}: the build failed with -j {jobs}; retrying with -j 1")
        if created.workdir is not None and not keep:
            shutil.rmtree(created.workdir, ignore_errors=True)
        (rowdir / "create.log").replace(rowdir / f"create-j{jobs}.log")
        created = run_create(
            trees.pre,
            trees.fix_patch,
            update,
            row.update_id,
            rowdir / "create.log",
            build=build,
            jobs=1,
            target=row.target,
            verify=debs,
        )
        result.jobs = 1
    result.create_seconds = round(created.seconds, 1)
    try:
        if created.status != "created":
            result.finish(created.status, created.reason, created.details)
            return
        assert created.workdir is not None
        if debs:
            result.binary = "; ".join(
                f"{v['origin']}: {v['file']} (build-id {v['build_id']}, "
                f"{v['functions']} pre functions matched at create)"
                for v in created.verified
            )
        else:
            result.binary = "livesplice's pre build"
        live(row, rowdir, created.workdir, update, result, progress, debs)
    finally:
        if created.workdir is not None and not keep:
            shutil.rmtree(created.workdir, ignore_errors=True)


def live(
    row: CorpusRow,
    rowdir: Path,
    workdir: Path,
    update: Path,
    result: RowResult,
    progress: Callable[[str], None],
    debs: list[Path] | None = None,
) -> None:
    """Apply the update to the pre build running under load, check the reproducer, the requests
    and that the processes are the same ones, then undo it."""
    result.stage = "start"
    factory = workload_for(row.target)
    if factory is None and ".so" not in row.target:
        result.finish(
            "failed",
            f"update created, but no workload knows how to run "
            f"{row.target} (add one to livesplice.eval.workloads.WORKLOADS)",
        )
        return
    rundir = rowdir / "run"
    shutil.rmtree(rundir, ignore_errors=True)
    (rundir / "lib").mkdir(parents=True)
    if debs:
        binary = shipped_target(debs, rundir / "root", row.target)
        if binary is None:
            result.finish("failed", f"the packages {row.binaries} install no {row.target}")
            return
    else:
        binary = find_target(workdir / "pre", row.target)
        if binary is None:
            result.finish("failed", f"the pre build has no linked output named {row.target}")
            return
    if ".so" in row.target and not debs:
        # installed as a distribution installs it: the real file plus the soname link, in a
        # directory of its own (the driver dlopen()s the soname). The update names the
        # target by the linked file (libxml2.so.2.9.14); /proc/PID/maps shows the real file.
        real = Path(shutil.copy2(binary, rundir / "lib" / binary.name))
        binary = rundir / "lib" / row.target
        if binary != real:
            binary.symlink_to(real.name)
    log = rundir / "livesplice.log"
    wl: Workload
    if factory is not None:
        wl = factory(binary, rundir)
    else:  # a library no workload knows: call its changed call graph (GenericLibraryWorkload)
        from livesplice.update.archive import read_update

        changed = [f for t in read_update(update).manifest.targets for f in t.changed_functions]
        wl = GenericLibraryWorkload(
            binary,
            rundir,
            generic_candidates(binary.resolve(), changed, sorted((workdir / "pre").rglob("*.o"))),
        )
    if debs:
        # the workloads' reproducers are for the corpus's own CVEs, not this fix's
        wl.has_reproducer = False
    try:
        wl.start()
        progress(f"{row.package}: {binary.name} running (pids {wl.pids()}), under load")
        time.sleep(SETTLE)
        result.repro_before = wl.reproduce()
        before = wl.identities()
        result.pids = list(before)
        r0, f0 = wl.stats.snapshot()

        result.stage = "apply"
        # signed path: create signed with $LIVESPLICE_SIGNING_KEY, apply trusts only
        # $LIVESPLICE_TRUST_DIR (both set by the harness's __main__); apply --json does not
        # print the signer, so the harness verifies the same way to record it
        from livesplice.update.archive import read_update

        result.signed_by = read_update(update).verify()
        t0 = time.monotonic()
        code, doc, err = cli(
            ["apply", str(update), "--json", *[a for p in result.pids for a in ("--pid", str(p))]],
            log,
        )
        result.apply_seconds = round(time.monotonic() - t0, 2)
        r1, _ = wl.stats.snapshot()
        result.requests_during_apply = r1 - r0
        procs = doc.get("processes", [])
        pauses = [p["pause_us"] for p in procs if p.get("status") == "applied"]
        result.pause_us = max(pauses) if pauses else None
        if procs and procs[0].get("functions"):
            result.functions = procs[0]["functions"]
        if code != 0:
            bad: dict[str, Any] = next((p for p in procs if p.get("status") != "applied"), {})
            why = f"{bad.get('abort', '')}: {bad.get('reason', '')}" if bad else err
            result.finish(
                "failed", f"apply: {why}", [*bad.get("details", []), *err.splitlines()][:30]
            )
            return
        time.sleep(SETTLE)
        result.repro_after = wl.reproduce()
        result.same_pids = wl.identities() == before

        result.stage = "undo"
        code, doc, err = cli(
            ["undo", row.update_id, "--json", *[a for p in result.pids for a in ("--pid", str(p))]],
            log,
        )
        undo_pauses = [p["pause_us"] for p in doc.get("processes", []) if "pause_us" in p]
        result.undo_pause_us = max(undo_pauses) if undo_pauses else None
        time.sleep(SETTLE)
        result.repro_after_undo = wl.reproduce()
        result.same_pids = result.same_pids and wl.identities() == before
        r2, f2 = wl.stats.snapshot()
        result.requests_total = r2
        result.failed_requests = f2 - f0
        problems = []
        if code != 0:
            problems.append(f"undo failed: {err.splitlines()[0] if err else code}")
        if not result.same_pids:
            problems.append("a target process did not survive (PID or start time changed)")
        if result.failed_requests:
            problems.append(
                f"{result.failed_requests} request(s) failed: " + "; ".join(wl.stats.first_errors)
            )
        if result.repro_after is not None and result.repro_after != "fixed":
            problems.append(
                f"the reproducer still shows the bug after apply ({result.repro_after})"
            )
        result.stage = "done"
        if problems:
            result.finish("failed", "; ".join(problems))
        else:
            result.finish(
                "applied",
                f"{len(result.functions)} function(s) replaced in "
                f"{len(result.pids)} process(es); update signed by key "
                f"{result.signed_by}",
            )
    except WorkloadFailed as e:
        result.finish("failed", f"{result.stage}: {e.reason}", e.details)
    finally:
        wl.stop()
