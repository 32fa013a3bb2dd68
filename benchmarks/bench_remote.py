"""How long one remote operation holds its host thread: three ways to run the same calls.

    .venv/bin/python benchmarks/bench_remote.py [--runs N] [--threads T]

The operation is what apply does for each region of an update: a named mapping
(``memfd_create``, ``ftruncate``, ``mmap`` near the executable, ``close``), then its
``munmap`` (what undo does). The host thread is stopped for all of it while the program's
other threads run on; a thread-per-connection server's accepting thread is a typical host, so
every microsecond of the hold is a microsecond a new connection waits.

Modes, interleaved run by run in one process against one target (tests/progs/ptrace_spin.c
with T spinning workers; the host is its main thread, asleep in read()):

* ``per-call``: one stub run per system call, stepping from syscall-stop to syscall-stop
  (how livesplice ran them before batching);
* ``batch-step``: all the calls in one stub run, still stepping through each call's two
  syscall-stops up to the end marker;
* ``batch-signal`` (what livesplice does): one stub run that ends with a signal the program
  never sees; the thread runs the calls without stopping.

Prints the hold (µs, from the host's interrupt to its release: ``Tracee.host_stopped_max_us``)
per mode: p50, p90, max, and each mode's p50 relative to ``batch-signal``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "progs"))

from ptrace_targets import Target, build

from livesplice.process import remote
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import PROT_EXEC, PROT_READ, remote_mmap, remote_munmap

MODES = ("per-call", "batch-step", "batch-signal")


@contextmanager
def mode(name: str) -> Iterator[None]:
    """Run remote.py's batches the way ``name`` says (module functions swapped for the run)."""
    saved = remote._mark_signal, remote.find_stub_area
    if name in ("per-call", "batch-step"):
        remote._mark_signal = lambda t, tid: 0  # type: ignore[assignment]
    if name == "per-call":
        real = remote.find_stub_area

        def small(t: Tracee) -> tuple[int, int]:
            _lo, hi = real(t)
            return hi - remote.SLOT, hi  # no room for a batch: one stub run per call

        remote.find_stub_area = small  # type: ignore[assignment]
    try:
        yield
    finally:
        remote._mark_signal, remote.find_stub_area = saved  # type: ignore[assignment]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    held: dict[str, dict[str, list[float]]] = {m: {"mmap": [], "munmap": []} for m in MODES}
    with tempfile.TemporaryDirectory() as d:
        tg = Target(build("ptrace_spin", Path(d)), str(a.threads), "sleepers")
        try:
            base = tg.base()
            near = (base - (1 << 31) + (1 << 20), base + (1 << 31) - (1 << 20))
            with Tracee(tg.pid) as t:
                for run in range(a.runs + 10):
                    for m in MODES:
                        with mode(m):
                            t.host_stopped_max_us = 0.0
                            addr = remote_mmap(
                                t, 65536, PROT_READ | PROT_EXEC, near=near, name="bench:code"
                            )
                            mapped = t.host_stopped_max_us
                            t.host_stopped_max_us = 0.0
                            remote_munmap(t, addr, 65536)
                            if run >= 10:  # warm-up runs not counted
                                held[m]["mmap"].append(mapped)
                                held[m]["munmap"].append(t.host_stopped_max_us)
        finally:
            tg.stop()
    ref = {op: statistics.median(held["batch-signal"][op]) for op in ("mmap", "munmap")}
    print(f"host thread held (µs), {a.runs} runs per mode, {a.threads} spinning workers")
    print(f"{'mode':14} {'op':7} {'p50':>7} {'p90':>7} {'max':>7} {'p50 / batch-signal':>19}")
    for m in MODES:
        for op in ("mmap", "munmap"):
            v = held[m][op]
            p50 = statistics.median(v)
            print(f"{m:14} {op:7} {p50:7.0f} {pct(v, 90):7.0f} {max(v):7.0f} {p50 / ref[op]:19.2f}")


if __name__ == "__main__":
    main()
