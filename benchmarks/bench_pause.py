"""Pause of the stop window: first interrupt to last resume, with a 5-byte write inside.

Plain script (not pytest): ``.venv/bin/python benchmarks/bench_pause.py [--runs N]``.
For 1, 8, 64 and 256 threads (spinning; and blocked in read() with --blocked) it runs
StopWindow.run() RUNS times on tests/progs/ptrace_spin and prints median and p99 against the
targets (median <= 50 us at 1 thread, <= 700 us at 64, <= 5 ms at 256; p99 <= 3x median).
The busy range is a function no thread runs, so every attempt succeeds at once; the scan
still reads and checks every stack word and register.

``--busy``: the busy path instead. Workers loop through ``hot_outer() -> hot_inner()``
(ptrace_spin ``hot``), both busy, so at every stop some workers are inside them and the window
runs them out (StopWindow ``run_out``) before writing; reports the pause, how many threads
were run out and in how many slices. No target for this one: it is bounded by ``run_out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "progs"))

from ptrace_targets import Target, build

from livesplice.process.ptrace import Tracee
from livesplice.process.stopwindow import StopWindow

TARGET_MEDIAN_US = {1: 50.0, 64: 700.0, 256: 5000.0}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure_busy(
    exe: Path, threads: int, runs: int, fifo: bool
) -> tuple[list[float], list[int], list[int], int]:
    """Pauses, threads run out and slices per successful window; windows that stayed busy."""
    from livesplice.errors import CodeBusy

    tg = Target(exe, str(threads - 1), "hot")
    try:
        tg.wait_threads(threads)
        time.sleep(0.1)
        ranges = []
        for name in ("hot_outer", "hot_inner"):
            fn, size = tg.symbol(name)
            ranges.append((fn, fn + size, name))
        fn = ranges[0][0]
        with Tracee(tg.pid) as t:
            w = StopWindow(t, ranges, retries=1, fifo=fifo)
            jump = [(fn, t.read(fn, 5))]
            pauses: list[float] = []
            ran: list[int] = []
            slices: list[int] = []
            failed = 0
            for _ in range(runs):
                try:
                    st = w.run(jump)
                except CodeBusy:
                    failed += 1
                    continue
                pauses.append(st.pause_us)
                ran.append(st.ran_out)
                slices.append(st.slices)
                time.sleep(0.001)
        return pauses, ran, slices, failed
    finally:
        tg.stop()


def measure(exe: Path, threads: int, runs: int, blocked: bool, fifo: bool) -> list[float]:
    args = [str(max(threads - 1, 0) if threads > 1 else 0)]
    if blocked:
        args = [str(threads - 1), "sleepers"]  # main thread blocks in fgets, workers in read
    tg = Target(exe, *args)
    try:
        tg.wait_threads(threads)
        time.sleep(0.1)
        fn, size = tg.symbol("answer")
        with Tracee(tg.pid) as t:
            assert len(t.threads()) == threads, (len(t.threads()), threads)
            w = StopWindow(t, [(fn, fn + size, "answer")], retries=1, fifo=fifo)
            jump = [(fn, t.read(fn, 5))]  # the same 5 bytes: a real write, nothing changes
            for _ in range(10):  # warm-up: page faults, numpy first calls
                w.run(jump)
            out = []
            for _ in range(runs):
                out.append(w.run(jump).pause_us)
                time.sleep(0.001)
        return out
    finally:
        tg.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 8, 64, 256])
    ap.add_argument("--blocked", action="store_true", help="threads blocked in read()")
    ap.add_argument("--fifo", choices=["on", "off"], default="on")
    ap.add_argument("--busy", action="store_true", help="threads inside the busy code")
    a = ap.parse_args()
    fifo = a.fifo == "on"
    with tempfile.TemporaryDirectory() as d:
        exe = build("ptrace_spin", Path(d))
        if a.busy:
            print(
                f"stop-window pause, busy path (workers inside the replaced code), {a.runs} "
                f"runs, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
            )
            print(
                f"{'threads':>7} {'median us':>10} {'p95 us':>9} {'p99 us':>9} "
                f"{'ran out':>8} {'slices':>7} {'busy':>5}"
            )
            for n in a.threads:
                xs, ran, sl, failed = measure_busy(exe, n, a.runs, fifo)
                if not xs:
                    print(f"{n:>7} every window stayed busy ({failed})")
                    continue
                print(
                    f"{n:>7} {statistics.median(xs):10.1f} {pct(xs, 0.95):9.1f} "
                    f"{pct(xs, 0.99):9.1f} {statistics.median(ran):8.0f} "
                    f"{statistics.median(sl):7.0f} {failed:>5}"
                )
            return
        kind = "blocked" if a.blocked else "spinning"
        load = os.getloadavg()[0]
        print(
            f"stop-window pause, {kind} threads, {a.runs} runs, fifo={a.fifo}, "
            f"{os.cpu_count()} CPUs, load average {load:.1f} (other work skews the tail)"
        )
        print(
            f"{'threads':>7} {'median us':>10} {'p95 us':>9} {'p99 us':>9} {'p99/med':>8} "
            f"{'target us':>10} {'med/target':>10}"
        )
        for n in a.threads:
            xs = measure(exe, n, a.runs, a.blocked, fifo)
            med = statistics.median(xs)
            tail = pct(xs, 0.99)
            target = TARGET_MEDIAN_US.get(n)
            tcol = f"{target:10.0f}" if target else f"{'-':>10}"
            rcol = f"{med / target:10.2f}" if target else f"{'-':>10}"
            print(
                f"{n:>7} {med:10.1f} {pct(xs, 0.95):9.1f} {tail:9.1f} {tail / med:8.2f} "
                f"{tcol} {rcol}"
            )


if __name__ == "__main__":
    main()
