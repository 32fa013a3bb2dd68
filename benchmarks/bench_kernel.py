"""Kernel lab costs: prepare (from nothing and cached), guest boot, livepatch round trip.

    .venv/bin/python benchmarks/bench_kernel.py            # cached prepare, boots, round trip
    .venv/bin/python benchmarks/bench_kernel.py --cold     # + prepare from nothing (~25 s)

"From nothing" starts from an empty cache directory (the host packages of
scripts/bootstrap-kernel.sh already installed) and deletes it afterwards. Times are wall
seconds on this machine; they are for budgeting CI (90 minutes for everything), not tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from livesplice.kernel.guest import Guest
from livesplice.kernel.initramfs import GuestFile
from livesplice.kernel.lab import LabKernel, build_module, prepare_lab, stage_timings

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "kernel"


def _row(name: str, values: list[float], unit: str = "s") -> None:
    if len(values) == 1:
        print(f"{name:<38} {values[0]:8.2f} {unit}")
    else:
        print(
            f"{name:<38} {statistics.median(values):8.2f} {unit}  "
            f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
        )


def bench_cold(version: str) -> None:
    with tempfile.TemporaryDirectory(prefix="livesplice-bench-cache-") as tmp:
        t0 = time.monotonic()
        lab = prepare_lab(version, cache=Path(tmp))
        _row("prepare from nothing", [time.monotonic() - t0])
        for stage, seconds in stage_timings(lab).items():
            _row(f"  {stage}", [seconds])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="also prepare into an empty cache")
    ap.add_argument("--kernel", default="6.1.176-1")
    ap.add_argument("--boots", type=int, default=5, help="guest boots to time (default 5)")
    args = ap.parse_args()

    if args.cold:
        bench_cold(args.kernel)
    lab = prepare_lab(args.kernel)  # make sure the default cache is ready before timing it
    cached = []
    for _ in range(5):
        t0 = time.monotonic()
        prepare_lab(args.kernel)
        cached.append(time.monotonic() - t0)
    _row("prepare, cached", cached)

    guest = Guest(lab)
    walls, inits = [], []
    for _ in range(args.boots):
        r = guest.run("true")
        walls.append(r.wall_seconds)
        if r.uptime_at_init is not None:
            inits.append(r.uptime_at_init)
    _row("boot to /init (guest clock)", inits)
    _row("run `true`: boot + run + power off", walls)

    with tempfile.TemporaryDirectory(prefix="livesplice-bench-lp-") as tmp:
        mod = Path(tmp)
        shutil.copy(lab.ksrc / "samples/livepatch/livepatch-sample.c", mod)
        (mod / "Kbuild").write_text("obj-m += livepatch-sample.o\n")
        t0 = time.monotonic()
        (ko,) = build_module(lab, mod)
        build = time.monotonic() - t0
        t0 = time.monotonic()
        r = guest.run(
            "sh ./livepatch-sample-run.sh",
            [
                GuestFile(ko, "livepatch-sample.ko"),
                GuestFile(FIXTURES / "livepatch-sample-run.sh", "livepatch-sample-run.sh"),
            ],
        )
        run = time.monotonic() - t0
        if r.status != 0:
            print(r.output, file=sys.stderr)
            return 1
    _row("livepatch sample: build module", [build])
    _row("livepatch sample: boot+load+unload", [run])
    _row("livepatch sample: round trip", [build + run])
    return bench_update(lab, guest)


def bench_update(lab: LabKernel, guest: Guest) -> int:
    """create --kernel of a one-file fix after preparation; apply (match, transition)."""
    import json

    from livesplice.kernel.overlay import ensure_overlay
    from livesplice.kernel.target import create_kernel_update

    t0 = time.monotonic()
    ensure_overlay(lab.dir)
    _row("guest overlay (cached after the first)", [time.monotonic() - t0])
    with tempfile.TemporaryDirectory(prefix="livesplice-bench-ku-") as tmp:
        out = Path(tmp) / "body.update"
        _m, _p, sec = create_kernel_update(
            lab.ksrc, FIXTURES / "cmdline-body.patch", update_id="bench", output=out
        )
        for step in ("copy", "pre", "post", "diff", "module", "total"):
            _row(f"create --kernel (cmdline fix): {step}", [sec[step]])
        g = Guest(lab, timeout=150, extra_initrds=[ensure_overlay(lab.dir)])
        r = g.run("livesplice apply --json u.update", [GuestFile(out, "u.update")])
        if r.status != 0:
            print(r.output, file=sys.stderr)
            return 1
        data = json.loads(r.output[r.output.index("{") :])
        _row("apply in guest: run-pre match (TCG)", [data["match_seconds"]])
        _row("apply in guest: transition", [data["transition_seconds"]])
        _row("boot + apply (whole guest run)", [r.wall_seconds])
    return 0


if __name__ == "__main__":
    sys.exit(main())
