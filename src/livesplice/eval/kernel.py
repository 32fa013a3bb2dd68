"""``python -m livesplice.eval.kernel CSV``: real kernel fixes through create, apply and undo.

For every row of a kernel corpus CSV (the schema: :mod:`livesplice.eval.kernel_rows`; the
steps of a row: :mod:`livesplice.eval.kernel_run`) prepare the pre kernel in the lab, make
the fix's patch, ``create --kernel``, and in one QEMU boot apply / check / undo; then a
Markdown table with a summary line (``--out``), or JSON (``--json``).

Results are cached per row under ``$LIVESPLICE_CACHE/eval-kernel/rows/<CVE>-<row key>/
<livesplice source hash>.json``: a rerun runs only rows that are new or changed, or all of
them when livesplice's own source changed. ``--table-only`` runs nothing and tabulates the
newest cached result of each row, judged by the row's ``expected`` as it is now.

``--any-source`` reuses a row's newest result whatever livesplice it ran with (a long corpus
while others change livesplice: the table names each row's commit).

Exit codes: 0 = every row as expected (a fix in code the flavour does not build counts as
expected); 1 = a surprise (outcome differs from ``expected``), an unsafe row, or a row the
harness could not run or (``--table-only``) has not run yet, listed as such in the table;
2 = bad input (the CSV, --only) with the line named.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from livesplice.errors import LivespliceError
from livesplice.eval.kernel_rows import (
    KernelRow,
    KernelRowResult,
    read_kernel_csv,
    rejudge,
    result_for,
    select,
)

EXIT_OK, EXIT_SURPRISES, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m livesplice.eval.kernel``."""
    p = argparse.ArgumentParser(
        prog="python -m livesplice.eval.kernel",
        description="Run real Debian kernel fixes through livesplice as a user would: lab "
        "prepare the pre kernel, create --kernel, and in a QEMU guest apply, check and undo; "
        "tabulate outcomes against the CSV's expected column.",
        epilog="exit status: 0 every row as expected; 1 surprises, unsafe rows or rows the "
        "harness could not run; 2 bad input (the CSV row is named)",
    )
    p.add_argument(
        "csv",
        type=Path,
        metavar="CSV",
        help="cves,pre_version,post_version,files,functions,expected[,change_class,clean,"
        "flavour,check,modules] (corpus/kernel-public.csv)",
    )
    p.add_argument("--out", type=Path, help="write the Markdown results here")
    p.add_argument("--only", nargs="+", metavar="CVE", help="only the rows naming these CVEs")
    p.add_argument("-j", "--jobs", type=int, default=2, help="make -j for prepare and create")
    p.add_argument("--cache", type=Path, help="default $LIVESPLICE_CACHE/eval-kernel")
    p.add_argument(
        "--table-only", action="store_true", help="run nothing: tabulate the cached results"
    )
    p.add_argument("--rerun", action="store_true", help="ignore cached results of this source")
    p.add_argument(
        "--any-source",
        action="store_true",
        help="reuse a row's newest cached result even when livesplice's source changed since "
        "(the table names the commit each row ran with)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def cache_dir(arg: Path | None) -> Path:
    """Where row results are cached: ``--cache``, else eval-kernel in the kernel lab's cache (a
    row takes minutes: a rerun runs only what changed)."""
    from livesplice.kernel.lab import cache_root

    return arg or cache_root() / "eval-kernel"


def _checks_dir(csv_path: Path) -> Path:
    return csv_path.resolve().parent / "kernel-checks"


def _check_text(row: KernelRow, checks: Path) -> bytes:
    if not row.check:
        return b""
    script = checks / f"{row.check}.sh"
    if not script.is_file():
        from livesplice.errors import UsageError

        raise UsageError(f"line {row.line}: {row.name}: the check {script} does not exist")
    return script.read_bytes()


def row_cache(cache: Path, row: KernelRow, checks: Path) -> Path:
    """The cache directory of one row, keyed by everything that decides its outcome (the row and
    its check script), so an edited row is run again."""
    return cache / "rows" / f"{row.name}-{row.key(_check_text(row, checks))}"


def cached_result(cache: Path, row: KernelRow, checks: Path, source: str | None) -> Path | None:
    """The cached result of ``row`` for livesplice ``source`` (None: the newest of any)."""
    d = row_cache(cache, row, checks)
    if source is not None:
        p = d / f"{source}.json"
        return p if p.exists() else None
    found = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run(args: argparse.Namespace, rows: list[KernelRow]) -> list[KernelRowResult]:
    """Run (or take from the cache) every row, in order; every check script is looked up first,
    so a missing one fails before hours of work."""
    from livesplice.eval.__main__ import eval_signing_key
    from livesplice.eval.kernel_run import RowSetup, livesplice_source_hash, run_kernel_row

    cache = cache_dir(args.cache)
    checks = _checks_dir(args.csv)
    for row in rows:  # every check script exists before hours of work start
        _check_text(row, checks)

    def say(msg: str) -> None:
        print(f"eval.kernel: {msg}", file=sys.stderr, flush=True)

    source = livesplice_source_hash()
    results: list[KernelRowResult] = []
    setup: RowSetup | None = None
    for row in rows:
        any_source = args.table_only or args.any_source
        hit = cached_result(cache, row, checks, None if any_source else source)
        if hit is not None and not (args.rerun and not args.table_only):
            results.append(rejudge(KernelRowResult.from_json(json.loads(hit.read_text())), row))
            continue
        if args.table_only:  # listed, so a table never drops a row silently
            missing = result_for(row)
            missing.finish("not_run", "not run yet (no cached result)")
            results.append(missing)
            continue
        if setup is None:
            # signed with the evaluation's own key; the guest trusts only it, so apply takes
            # the signature check an operator's updates take
            key, trusted = eval_signing_key(cache)
            setup = RowSetup(checks, cache / "work", args.jobs, key, trusted, say)
        r = run_kernel_row(row, setup)
        target = row_cache(cache, row, checks) / f"{source}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(r.to_json(), indent=1) + "\n")
        say(f"{row.name}: {r.outcome} ({r.verdict}) {r.reason[:200]}")
        results.append(r)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected rows, print the summary (or JSON), write the table; the exit code says
    whether every row came out as expected."""
    from livesplice.eval.kernel_report import render, summary_line

    args = build_parser().parse_args(argv)
    try:
        rows = select(read_kernel_csv(args.csv), args.only)
        results = run(args, rows)
    except LivespliceError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USAGE if e.code == 2 else int(e.code)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        print(summary_line(results))
    if args.out:
        given = list(argv) if argv is not None else sys.argv[1:]
        command = "python -m livesplice.eval.kernel " + shlex.join(given)
        args.out.write_text(render(results, command))
    as_expected = all(r.verdict in ("ok", "not built") for r in results)
    return EXIT_OK if as_expected else EXIT_SURPRISES


if __name__ == "__main__":
    sys.exit(main())
