"""End-to-end apply and undo time on a running process, and where the time goes.

Plain script (not pytest): ``.venv/bin/python benchmarks/bench_apply.py [--runs N]``.

Builds the demo server (examples/kvserver) with its own Makefile, starts it, creates the
update from examples/kvserver/fix.patch once, then applies and undoes it RUNS times, timing:

* ``livesplice apply`` as a command (Python start-up included), and
* the library calls (read update, match + plan, attach + load + stop window + detach),

and prints medians with the pause the stop window reported, next to the create time.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "kvserver"


def median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    from livesplice.process.apply import apply_to_process, prepare, undo_in_process
    from livesplice.update.archive import read_update

    work = Path(tempfile.mkdtemp(prefix="livesplice-bench-"))
    server = None
    try:
        src, run = work / "src", work / "run"
        shutil.copytree(EXAMPLE, src)
        shutil.copytree(EXAMPLE, run)
        subprocess.run(["make", "-s", "-C", str(run)], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([str(run / "kvserver"), str(port)], stdout=subprocess.PIPE)
        assert server.stdout is not None
        server.stdout.readline()
        update = work / "u.update"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "livesplice",
                "create",
                "--patch",
                str(src / "fix.patch"),
                "--id",
                "bench001",
                "-o",
                str(update),
                str(src),
            ],
            check=True,
            capture_output=True,
        )
        create_s = time.perf_counter() - t0

        cmd_apply, cmd_undo, lib_read, lib_prepare, lib_apply, lib_undo, pauses = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )  # type: ignore[var-annotated]
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "livesplice",
                    "apply",
                    str(update),
                    "--pid",
                    str(server.pid),
                ],
                check=True,
                capture_output=True,
            )
            cmd_apply.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "livesplice", "undo", "bench001", "--pid", str(server.pid)],
                check=True,
                capture_output=True,
            )
            cmd_undo.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            manifest = read_update(update).manifest
            lib_read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prepare(manifest, server.pid)
            lib_prepare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = apply_to_process(manifest, server.pid)
            lib_apply.append(time.perf_counter() - t0)
            pauses.append(report.pause_us / 1e6)
            t0 = time.perf_counter()
            undo_in_process("bench001", server.pid)
            lib_undo.append(time.perf_counter() - t0)

        print(f"kvserver, 1 changed function, {args.runs} runs (medians)")
        print(f"  create (two builds + diff + package)   {create_s * 1000:8.1f} ms")
        print(f"  `livesplice apply` command             {median_ms(cmd_apply)}")
        print(f"  `livesplice undo` command              {median_ms(cmd_undo)}")
        print(f"  library: read update                   {median_ms(lib_read)}")
        print(f"  library: run-pre match + load plan     {median_ms(lib_prepare)}")
        print(f"  library: apply_to_process (all steps)  {median_ms(lib_apply)}")
        print(f"  library: undo_in_process               {median_ms(lib_undo)}")
        print(f"  stop-window pause inside apply         {statistics.median(pauses) * 1e6:8.1f} us")
        return 0
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
