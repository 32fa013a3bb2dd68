"""Diff time of large objects: linear in the number of sections? do the cores help?

Plain script: ``.venv/bin/python benchmarks/bench_diff.py [--functions N] [--units U] [--jobs J]``.

A header change recompiles every unit, each compiled with ``-ffunction-sections
-fdata-sections -g`` into thousands of sections; issue 12/13 measured the DWARF pass
re-walking every section header per lookup (quadratic). This script builds, with real gcc,
a generated unit of N functions (each with its own section, static data and line rows) and
a post version where one function changed, then measures in one run:

1. ``diff_objects`` on the N-function pair and on an N/4-function pair: the ratio of the two
   times is ~4 when the diff is linear in the number of sections, ~16 when quadratic;
2. the per-unit diffs of U such pairs run serially and through ``diff_many`` with J worker
   processes: the ratio is the speed-up the cores give (bounded by the cores the machine has).

It also checks the diff found exactly the one changed function (a benchmark of a wrong
answer is worthless).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livesplice.diff.engine import diff_many, diff_objects


def _source(n: int, changed: bool) -> str:
    lines = ["#include <stdio.h>", "int sink;"]
    for i in range(n):
        body = "x * 3 + 1" if (changed and i == n // 2) else "x * 3"
        lines.append(
            f"static int counter_{i};\n"
            f"__attribute__((noinline)) int fn_{i}(int x)\n{{\n"
            f"    counter_{i}++;\n    if (x > {i}) sink += {i};\n    return {body};\n}}"
        )
    return "\n".join(lines) + "\n"


def _compile(d: Path, name: str, n: int, changed: bool) -> Path:
    src = d / f"{name}.c"
    src.write_text(_source(n, changed))
    obj = d / f"{name}.o"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-g",
            "-ffunction-sections",
            "-fdata-sections",
            "-c",
            str(src),
            "-o",
            str(obj),
        ],
        check=True,
    )
    return obj


def _pair(d: Path, tag: str, n: int) -> tuple[Path, Path]:
    return _compile(d, f"{tag}_pre", n, False), _compile(d, f"{tag}_post", n, True)


def _timed_diff(pre: Path, post: Path, n: int) -> float:
    t0 = time.perf_counter()
    ud = diff_objects(pre, post, "big.c")
    elapsed = time.perf_counter() - t0
    if ud.refusals or ud.changed_functions != [f"fn_{n // 2}"]:
        sys.exit(f"wrong diff: changed={ud.changed_functions} refusals={ud.refusals}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--functions", type=int, default=2000)
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    n, small = a.functions, a.functions // 4
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        big = _pair(d, "big", n)
        little = _pair(d, "little", small)
        units = [_pair(d, f"u{i}", small) for i in range(a.units)]
        sections = int(
            subprocess.run(
                ["readelf", "-S", "-W", str(big[0])], capture_output=True, text=True, check=True
            ).stdout.count("] .")
        )
        t_big = _timed_diff(*big, n)
        t_little = _timed_diff(*little, small)
        print(f"diff_objects, {n} functions ({sections} sections): {t_big:7.2f} s")
        print(f"diff_objects, {small} functions:{'':{len(str(sections)) + 12}} {t_little:7.2f} s")
        print(f"scaling ratio (x4 functions): {t_big / t_little:.1f}  (linear ~4, quadratic ~16)")
        jobs = [(pre, post, f"u{i}.c") for i, (pre, post) in enumerate(units)]
        t0 = time.perf_counter()
        serial = [diff_objects(pre, post, unit) for pre, post, unit in jobs]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        parallel = diff_many(jobs, workers=a.jobs)
        t_parallel = time.perf_counter() - t0
        if [u.changed_functions for u in serial] != [u.changed_functions for u in parallel]:
            sys.exit("parallel diff disagrees with the serial diff")
        print(
            f"{a.units} units serial: {t_serial:.2f} s, {a.jobs} workers: {t_parallel:.2f} s, "
            f"speed-up {t_serial / t_parallel:.2f} (cores: {os.cpu_count()})"
        )


if __name__ == "__main__":
    main()
