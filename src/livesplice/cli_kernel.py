"""The words and exit codes of the kernel target's commands (create --kernel, apply, view, undo).

The engine (:mod:`livesplice.kernel.target`) returns reports and raises typed errors; this
module is the only place that turns them into lines for a person or JSON for a program, so a
service calling the engine gets the same behaviour without any printing.
"""

from __future__ import annotations

import argparse
import json

from livesplice.cli_progress import progress_printer
from livesplice.errors import ExitCode
from livesplice.kernel.target import (
    KernelPatchView,
    apply_to_kernel,
    create_kernel_update,
    undo_kernel,
)
from livesplice.update.archive import UpdateFile


def cli_create_kernel(args: argparse.Namespace) -> int:
    """``create --kernel``: build the update, then report it (or that nothing changed)."""
    notes: list[str] = []
    manifest, out, seconds = create_kernel_update(
        args.srcdir,
        args.patch,
        update_id=args.update_id,
        output=args.output,
        description=args.description,
        jobs=args.jobs,
        keep_tmp=args.keep_tmp,
        progress=progress_printer(args),
        notes=notes,
        signing_key=args.sign,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "status": "created" if manifest else "nothing_to_do",
                    "notes": notes,
                    "output": str(out) if out else None,
                    "id": manifest.id if manifest else None,
                    "seconds": {k: round(v, 2) for k, v in seconds.items()},
                },
                indent=1,
            )
        )
        return ExitCode.OK
    if manifest is None:
        print("livesplice: no code changes: nothing to do (no update written)")
        for n in notes:
            print(f"livesplice:   {n}")
        return ExitCode.OK
    funcs = [f for t in manifest.targets for f in t.changed_functions]
    print(
        f"livesplice: wrote kernel update {manifest.id} to {out} "
        f"({len(funcs)} function(s): {', '.join(funcs)}; {seconds['total']:.1f} s)"
    )
    for w in manifest.warnings:
        print(f"livesplice: warning: {w}")
    return ExitCode.OK


def cli_apply_kernel(args: argparse.Namespace, update: UpdateFile) -> int:
    """``apply`` of a kernel update: the signature-checked ``update``, never the path again."""
    r = apply_to_kernel(
        update, transition_timeout=args.transition_timeout, progress=progress_printer(args)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "id": r.id,
                    "module": r.module,
                    "functions": r.functions,
                    "match_seconds": r.match_seconds,
                    "transition_seconds": r.transition_seconds,
                    "warnings": r.warnings,
                },
                indent=1,
            )
        )
    else:
        print(
            f"livesplice: applied {r.id} to the running kernel "
            f"({', '.join(r.functions)}; transition {r.transition_seconds} s)"
        )
    return ExitCode.OK


def print_kernel_view(rows: list[KernelPatchView]) -> None:
    """``view``'s text for the kernel: one paragraph per livepatch."""
    if not rows:
        print("livesplice: no kernel updates applied")
    for u in rows:
        state = "enabled" if u.enabled else "disabled"
        if u.transition:
            state += ", in transition"
        print(f"kernel update {u.id} ({u.module}): {state}; taint {u.taint}")
        for f in u.functions:
            print(f"  {f}")


def cli_undo_kernel(args: argparse.Namespace) -> int:
    """``undo ID`` of a kernel update."""
    undo_kernel(args.update_id, progress=progress_printer(args))
    progress_printer(args)(f"undid kernel update {args.update_id}")
    return ExitCode.OK
