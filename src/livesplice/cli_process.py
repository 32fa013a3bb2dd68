"""The words and exit codes of apply / view / undo on processes.

The engine (:mod:`livesplice.process.apply`) works on one process at a time and returns a
report or raises a typed error; this module loops over the processes a command names, prints
a line per process (or one JSON document), and picks the exit code: OK, the failure's own
code when nothing succeeded, PARTIAL when some did (README "Exit codes").

With ``--all`` two kinds of process are noted and skipped, never counted as failures: one
that exited while the command ran (listed a moment before: a BGSAVE child, a recycled
worker), and, for apply, a fork child that already runs the update it inherited from its
parent (process/inherit.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from livesplice.errors import (
    ExitCode,
    LivespliceError,
    NoMatch,
    NotApplied,
    TargetGone,
    UsageError,
)
from livesplice.process.apply import (
    apply_to_process,
    exited,
    inherited_applied,
    processes_with,
    stop_figures,
    stop_words,
    target_processes,
    undo_in_process,
    view_rows,
)
from livesplice.process.journal import process_start
from livesplice.text import printable
from livesplice.update.archive import UpdateFile
from livesplice.update.format import Manifest


def _outcome(failures: list[LivespliceError], successes: int) -> int:
    """Exit code: OK, the failure's own code when nothing succeeded, PARTIAL otherwise."""
    if not failures:
        return ExitCode.OK
    return int(failures[0].code) if not successes else ExitCode.PARTIAL


def _skip_all(
    pid: int, start: int | None, e: LivespliceError, reports: list[dict[str, Any]], json_: bool
) -> bool:
    """With ``--all``: a process that exited while the command ran (a BGSAVE child, a worker
    recycled) is noted as "exited meanwhile" and skipped, not counted as a failure -- it
    was listed a moment ago, nobody named it. True when skipped."""
    if not isinstance(e, TargetGone) or not exited(pid, start):
        return False
    reports.append({"pid": pid, "status": "exited", "abort": e.abort, "reason": e.reason})
    if not json_:
        print(f"livesplice: note: pid {pid} exited meanwhile: skipped", file=sys.stderr)
    return True


def _say_failure(pid: int, e: LivespliceError) -> None:
    """The error's paragraph, every line from it made printable (reasons can quote what a
    process or an update file holds)."""
    lines = [f"livesplice: pid {pid}: {e.abort}: {printable(e.reason)}"]
    lines.extend(f"  {printable(d)}" for d in e.details)
    if e.advice:
        lines.append(f"what to do: {printable(e.advice)}")
    print("\n".join(lines), file=sys.stderr)


def cli_apply(args: argparse.Namespace, update: UpdateFile) -> int:
    """Apply ``update`` -- the object whose signature the CLI verified, never the path again.

    With ``--all``, a process whose candidate image turns out not to be the target (not a
    valid ELF file, or run-pre matching says it is other code) is skipped with a note: a
    decoy named like the target must not stop the real targets from being patched.
    """
    manifest = update.manifest
    if manifest.is_kernel:
        raise UsageError("this is a kernel update; apply it without --pid on the patched machine")
    pids = list(dict.fromkeys(args.pid)) if args.pid else target_processes(manifest)
    reports: list[dict[str, Any]] = []
    failures: list[LivespliceError] = []
    applied = 0
    starts = {pid: process_start(pid) for pid in pids}
    for pid in pids:
        parent = inherited_applied(pid, manifest.id) if args.all else None
        if parent is not None:
            reports.append({"pid": pid, "status": "inherited", "inherited_from": parent})
            if not args.json:
                print(
                    f"livesplice: note: pid {pid} skipped: already runs {printable(manifest.id)}"
                    f", inherited by fork from pid {parent}",
                    file=sys.stderr,
                )
            continue
        try:
            r = apply_to_process(
                manifest,
                pid,
                retries=args.retries,
                interval=args.retry_interval,
                by_code=not args.all,
            )
        except NoMatch as e:
            if not args.all:
                failures.append(e)
            reports.append(
                {
                    "pid": pid,
                    "status": "skipped" if args.all else "failed",
                    "abort": e.abort,
                    "reason": e.reason,
                    "details": e.details,
                }
            )
            if args.all and not args.json:
                print(
                    f"livesplice: note: pid {pid} skipped: {printable(e.reason)}"
                    + "".join(f"; {printable(d)}" for d in e.details[:3]),
                    file=sys.stderr,
                )
            elif not args.json:
                _say_failure(pid, e)
            continue
        except LivespliceError as e:
            if args.all and _skip_all(pid, starts[pid], e, reports, args.json):
                continue
            failures.append(e)
            reports.append(
                {
                    "pid": pid,
                    "status": "failed",
                    "abort": e.abort,
                    "reason": e.reason,
                    "details": e.details,
                }
            )
            if not args.json:
                _say_failure(pid, e)
            continue
        applied += 1
        reports.append(
            {
                "pid": pid,
                "status": "applied",
                **stop_figures(r),
                "attempts": r.attempts,
                "threads": r.threads,
                "ran_out": r.ran_out,
                "functions": r.functions,
                "images": r.images,
                "warnings": r.warnings,
            }
        )
        if not args.json:
            ran = f", {r.ran_out} run out of replaced code" if r.ran_out else ""
            print(
                f"livesplice: applied {printable(manifest.id)} to pid {pid}: "
                f"{len(r.functions)} function(s) replaced, pause {r.pause_us:.0f} us "
                f"({r.threads} threads{ran}, attempt {r.attempts}); {stop_words(r)}"
            )
            for line in r.images:
                print(f"livesplice:   {printable(line)}")
            for w in r.warnings:
                print(f"livesplice: warning: {printable(w)}")
    if args.all and not applied and not failures:
        failures.append(NoMatch(f"no running process runs a target of update {manifest.id}"))
        if not args.json:
            print(failures[0].render(), file=sys.stderr)
    if args.json:
        print(json.dumps({"id": manifest.id, "processes": reports}, indent=1))
    return _outcome(failures, applied)


def cli_view(
    args: argparse.Namespace,
    kernel_rows: list[dict[str, Any]] | None = None,
    *,
    say_none: bool = True,
) -> int:
    """``view`` of processes; ``kernel_rows`` joins the kernel's rows into one JSON document.

    ``say_none=False``: no "no updates applied" line when there are none (the caller lists
    kernel updates after, and the line would read as "nothing is applied at all").
    """
    rows, problems = view_rows(list(dict.fromkeys(args.pid)) if args.pid else None)
    invalid = [r for r in rows if str(r["state"]).startswith("invalid")]
    if args.json:
        doc: dict[str, Any] = {"processes": rows, "problems": problems}
        if kernel_rows is not None:
            doc["kernel"] = kernel_rows
        print(json.dumps(doc, indent=1))
    else:
        if not rows and say_none:
            print(
                "livesplice: no updates applied to processes"
                + (f" (pid {', '.join(map(str, args.pid))})" if args.pid else "")
            )
        for r in rows:
            head = f"pid {r['pid']}: {printable(r['id'])} [{printable(r['state'])}]"
            if "description" in r:
                pause = f", pause {r['pause_us']:.0f} us" if r.get("pause_us") is not None else ""
                head += f" {printable(r['description'], 200)}{pause}"
            print(head)
            for key in ("note", "warning"):
                if key in r:
                    print(f"    {key}: {printable(r[key])}")
            for fn in r.get("functions", []):
                print(f"    replaced: {printable(fn)}")
        for p in problems:
            who = f"pid {p['pid']}" if "pid" in p else "livesplice"
            print(f"{who}: {p['abort']}: {printable(p['reason'])}", file=sys.stderr)
    if args.pid and len(problems) == len(args.pid) and not rows:
        return (
            ExitCode.TARGET_GONE
            if problems[0]["abort"] == "TARGET_GONE"
            else ExitCode.NO_PERMISSION
        )
    return ExitCode.PARTIAL if problems or invalid else ExitCode.OK


def cli_undo(args: argparse.Namespace, from_target: Manifest | None = None) -> int:
    """``undo ID --pid/--all``; ``from_target`` is the signed update vouching for a record
    found only in the process (``--from-target``)."""
    if args.all:
        pids = processes_with(args.update_id)
        if not pids:
            raise NotApplied(f"update {printable(args.update_id)} is not applied to any process")
    else:
        pids = list(dict.fromkeys(args.pid))
    failures: list[LivespliceError] = []
    results: list[dict[str, Any]] = []
    starts = {pid: process_start(pid) for pid in pids}
    gone = 0
    for pid in pids:
        try:
            rep = undo_in_process(
                args.update_id,
                pid,
                retries=args.retries,
                interval=args.retry_interval,
                from_target=from_target,
            )
        except LivespliceError as e:
            if args.all and _skip_all(pid, starts[pid], e, results, args.json):
                gone += 1
                continue
            failures.append(e)
            results.append({"pid": pid, "status": "failed", "abort": e.abort, "reason": e.reason})
            if not args.json:
                _say_failure(pid, e)
            continue
        results.append(
            {"pid": pid, "status": "undone", **stop_figures(rep), "warnings": rep.warnings}
        )
        if not args.json:
            print(
                f"livesplice: undid {printable(args.update_id)} in pid {pid} "
                f"(pause {rep.pause_us:.0f} us; {stop_words(rep)})"
            )
            for w in rep.warnings:
                print(f"livesplice: warning: pid {pid}: {printable(w)}")
    if args.json:
        print(json.dumps({"id": args.update_id, "processes": results}, indent=1))
    return _outcome(failures, len(pids) - len(failures) - gone)
