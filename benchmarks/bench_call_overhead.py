"""Per-call overhead of a patched function: through the 5-byte ``jmp rel32`` vs direct.

Plain script: ``.venv/bin/python benchmarks/bench_call_overhead.py [--calls N] [--rounds R]``.
Builds tests/progs/call_overhead.c (gcc -O2), which writes the trampoline into its own code
(the same bytes livesplice writes: e9 rel32 at the old entry) and times, in one process with
rounds interleaved, N calls of the replacement made directly and N calls through the old
entry. Prints ns per call per round, the medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "progs"))

from ptrace_targets import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=100_000_000)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        exe = build("call_overhead", Path(d))
        out = subprocess.run(
            [str(exe), str(a.calls), str(a.rounds)], check=True, capture_output=True, text=True
        ).stdout
    direct, jumped = [], []
    print(f"{'round':>5} {'direct ns':>10} {'via jmp ns':>11} {'ratio':>7}")
    for line in out.split("\n"):
        if not line.strip():
            continue
        r, dn, jn = line.split()
        direct.append(float(dn))
        jumped.append(float(jn))
        print(f"{r:>5} {float(dn):10.4f} {float(jn):11.4f} {float(jn) / float(dn):7.3f}")
    md, mj = statistics.median(direct), statistics.median(jumped)
    print(f"median {md:10.4f} {mj:11.4f} {mj / md:7.3f}   (calls per round: {a.calls})")


if __name__ == "__main__":
    main()
