"""``python -m livesplice.eval CSV [--rows ...] [--out results.md]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from livesplice.errors import ExitCode, LivespliceError


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m livesplice.eval``."""
    p = argparse.ArgumentParser(
        prog="python -m livesplice.eval",
        description="Build real Debian security fixes with livesplice create, apply them to "
        "the running pre build under load, undo them, and tabulate the outcomes.",
    )
    p.add_argument(
        "csv",
        type=Path,
        metavar="CSV",
        help="corpus: package,version,first_patch,last_patch,cves,expected,target,change_class",
    )
    p.add_argument("--rows", help="row numbers, ranges, package names or CVEs (default: all)")
    p.add_argument("--out", type=Path, help="write the Markdown results table here")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(
            os.environ.get("LIVESPLICE_EVAL_CACHE", Path.home() / ".cache" / "livesplice" / "eval")
        ),
        help="downloads, trees, updates and per-row results (default ~/.cache/livesplice/eval)",
    )
    p.add_argument(
        "--build",
        help="build command for create (default: a clean "
        "dpkg-buildpackage -B -uc -us on each side)",
    )
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep create's build directories")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: tabulate the cached results of the selected rows",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def eval_signing_key(cache: Path) -> tuple[Path, Path]:
    """The evaluation's own signing key (made once) and a directory trusting only it."""
    from livesplice.update.signing import generate_key

    keys = cache / "signing"
    key, pub = keys / "eval.key", keys / "trusted" / "eval.pub"
    if not (key.exists() and pub.exists()):
        pub.parent.mkdir(parents=True, exist_ok=True)
        pair = generate_key()
        key.write_bytes(pair.private_pem)
        key.chmod(0o600)
        pub.write_bytes(pair.public_pem)
    return key, pub.parent


def use_eval_signing_key(cache: Path) -> None:
    """Sign every update the evaluation creates with the evaluation's own key, and trust
    only that key when applying them: the same path an operator's updates take."""
    key, trusted = eval_signing_key(cache)
    os.environ["LIVESPLICE_SIGNING_KEY"] = str(key)
    os.environ["LIVESPLICE_TRUST_DIR"] = str(trusted)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected corpus rows, print the summary (or JSON), write the results page;
    exit non-zero when a row is UNSAFE or failed."""
    from livesplice.eval.corpus import read_corpus, select_rows
    from livesplice.eval.create_step import DEFAULT_BUILD
    from livesplice.eval.report import render, summary_line
    from livesplice.eval.runner import RowResult, run_row, verdict

    args = build_parser().parse_args(argv)
    try:
        rows = select_rows(read_corpus(args.csv), args.rows)
    except LivespliceError as e:
        print(e.render(), file=sys.stderr)
        return int(e.code)

    def progress(msg: str) -> None:
        print(f"eval: {msg}", file=sys.stderr, flush=True)

    if not args.table_only:
        use_eval_signing_key(args.cache)

    results: list[RowResult] = []
    for row in rows:
        cached = args.cache / "rows" / row.slug / "result.json"
        if args.table_only:
            if cached.exists():
                # what livesplice did, judged by the corpus as it is now (the row's
                # `expected` may have been corrected since the run)
                r = RowResult(**json.loads(cached.read_text()))
                r.row = asdict(row)
                r.verdict = verdict(r.outcome, row.expected)
                results.append(r)
            continue
        r = run_row(
            row,
            args.cache,
            build=args.build or DEFAULT_BUILD,
            jobs=args.jobs,
            keep=args.keep,
            progress=progress,
        )
        progress(f"{row.package} {row.cves}: {r.outcome} ({r.verdict}) {r.reason}")
        results.append(r)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(summary_line(results))
    if args.out:
        command = "python -m livesplice.eval " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])
        )
        args.out.write_text(render(results, "livesplice on real Debian security fixes", command))
    bad = any(r.verdict in ("UNSAFE", "failed") for r in results)
    return int(ExitCode.FAILED if bad else ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
