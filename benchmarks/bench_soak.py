"""Soak: N apply/undo cycles on a real daemon under client load with thread or fork churn.

Clients connect, PING and close in a loop (kvserver makes a thread per connection, so threads
are created and exit all through every apply and undo). Prints cycles, tool failures, failed
requests, client latency while the tool runs vs without it, the pause (final window) and
stopped time (everything the target felt) distributions, and leaks (mappings, fds, journal
entries, lock files).

    .venv/bin/python benchmarks/bench_soak.py --cycles 200 [--clients 4] [--warm]
    .venv/bin/python benchmarks/bench_soak.py --cycles 200 --warm --rate 200
    .venv/bin/python benchmarks/bench_soak.py --daemon redis --cycles 200 --warm --rate 200

``--daemon redis`` soaks Debian's own redis-server binary (the archive's .deb of the shipped
version in corpus/debian-shipped.csv) with Debian's real security update, built once by
livesplice itself and cached (benchmarks/soak_redis.py). The open-loop client then speaks
RESP (SET+GET of a per-thread key, the answer checked), half its threads connecting per
request, half over one connection each; redis is a single event loop, so a stop of its main
thread delays every connection. A data set (``--keys``) and a BGSAVE every ``--bgsave-every``
seconds make the target fork a child while apply and undo run; the report adds the forks,
the saves, redis's own log trouble and leftover children. redis creates no threads per
connection: its churn is connections and forks.

With ``--warm`` the report also says which slow requests a stop of the target by livesplice
overlapped (the intervals it held threads stopped) and which overlapped none: on a machine
shared with other jobs most multi-millisecond requests are the machine's.

Two kinds of load. By default closed-loop Python clients (as fast as they can): on a 2-core
machine they keep both CPUs busy, so any extra work -- the patcher's Python included --
queues behind them and every latency figure is mostly CPU contention. ``--rate R`` uses an
open-loop C client instead (benchmarks/soak_client.c, built with gcc): each of ``--clients``
threads sends R requests/s on a fixed schedule and a request's latency counts from when it
was scheduled, so a stall delays and is counted by every request queued behind it. The CPUs
stay mostly idle, as on a production server with headroom, and what remains is what the
tool's stops add.

Goals (issue 8): 0 failures; the longest client request during apply <= 2 ms;
others_stopped_us (every thread but the one hosting livesplice's remote calls) <= 1.2 x
pause_us.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soak_redis  # benchmarks/: the script's directory is on sys.path

from livesplice.eval.workloads import PingClients
from livesplice.process.procstat import children_of

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kvserver"


WARM_WORKER = """
import json, sys, time
from pathlib import Path
from livesplice.errors import LivespliceError
from livesplice.process.apply import apply_to_process, stop_figures, undo_in_process
from livesplice.update.archive import read_update
manifest = read_update(Path(sys.argv[1])).manifest
pid = int(sys.argv[2])
# every interval in which livesplice held threads of the target stopped (perf_counter, the
# client's CLOCK_MONOTONIC): lets the report tell a slow request that overlapped a stop
# from one the machine delayed. Instrumentation of a private method: absent, no intervals.
holds = []
from livesplice.process import ptrace
note = getattr(ptrace.Tracee, "_note_hold", None)
if note is not None:
    def noting(self, began, threads, *, hosted):
        holds.append((began, time.perf_counter()))
        return note(self, began, threads, hosted=hosted)
    ptrace.Tracee._note_hold = noting
print("ready", flush=True)
for line in sys.stdin:
    try:
        holds.clear()
        if line.strip() == "apply":
            rep = apply_to_process(manifest, pid)
        else:
            rep = undo_in_process(manifest.id, pid)
        print(json.dumps({**stop_figures(rep), "holds": holds if note else None}), flush=True)
    except LivespliceError as e:
        print(json.dumps({"error": e.reason}), flush=True)
"""


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def spread(values: list[float]) -> str:
    """p50 / p99 / max of a stop figure (microseconds), as the report prints it."""
    return f"p50 {statistics.median(values):.0f} p99 {pct(values, 99):.0f} max {max(values):.0f}"


class RateClients:
    """Open-loop load from benchmarks/soak_client.c (see the module docstring)."""

    def __init__(
        self,
        port: int,
        n: int,
        rate: float,
        workdir: Path,
        prefix: list[str],
        mode: str = "line",
    ) -> None:
        assert time.get_clock_info("perf_counter").implementation.endswith("MONOTONIC)")
        exe = workdir / "soak_client"
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-pthread",
                "-o",
                str(exe),
                str(Path(__file__).with_name("soak_client.c")),
            ],
            check=True,
        )
        self.out = workdir / "samples.txt"
        self.proc = subprocess.Popen(
            [*prefix, str(exe), str(port), str(n), str(rate), str(self.out), mode],
            stdin=subprocess.PIPE,
        )
        self.samples: list[tuple[float, float]] = []
        self.failed: list[str] = []

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(60) != 0:
            raise SystemExit("soak_client failed")
        for line in self.out.read_text().splitlines():
            at, dt, err = (int(v) for v in line.split())
            self.samples.append((at / 1e9, dt / 1e9))
            if err:
                self.failed.append(f"errno {err}" if err > 0 else "bad reply")


def leaks(pid: int) -> dict[str, int]:
    maps = Path(f"/proc/{pid}/maps").read_text().count("/memfd:livesplice:")
    fds = sum("/memfd:livesplice:" in os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir())
    run = Path(os.environ.get("LIVESPLICE_RUN_DIR", "/run/livesplice"))
    locks = len(list(run.glob(f"{pid}.lock")))
    journal = len(list((run / "journal").glob(f"{pid}-*"))) if (run / "journal").is_dir() else 0
    # a thread livesplice left traced (TracerPid of each thread's status)
    traced = sum(
        (t / "status").read_text().split("TracerPid:")[1].split()[0] != "0"
        for t in Path(f"/proc/{pid}/task").iterdir()
    )
    return {"maps": maps, "fds": fds, "locks": locks, "journal": journal, "traced": traced}


def start_kvserver(
    tmp: Path, port: int, rt: list[str]
) -> tuple[Path, str, subprocess.Popen[bytes]]:
    """examples/kvserver built here, its fix.patch made into an update: (update, id, server)."""
    shutil.copytree(EXAMPLE, tmp / "src")
    shutil.copytree(EXAMPLE, tmp / "run")
    subprocess.run(["make", "-s", "-C", str(tmp / "run")], check=True)
    update = tmp / "fix.update"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "livesplice",
            "create",
            "--patch",
            str(EXAMPLE / "fix.patch"),
            "--id",
            "soak0001",
            "-o",
            str(update),
            str(tmp / "src"),
        ],
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        [*rt, str(tmp / "run" / "kvserver"), str(port)], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    server.stdout.readline()
    return update, "soak0001", server


def finish_redis(
    control: soak_redis.RedisControl | None,
    pid: int,
    rundir: Path,
    windows: list[tuple[float, float]],
) -> list[str]:
    """Stop the BGSAVEs, wait for the last child, and say what redis itself saw: forks (how
    many while apply/undo ran), saves, its log's trouble, children left behind."""
    if control is None:
        return ["redis: no control connection"]
    control.stop()
    try:
        info = control.info()
        for _ in range(100):  # the last BGSAVE child may still be writing
            if info.get("rdb_bgsave_in_progress") == "0":
                break
            time.sleep(0.1)
            info = control.info()
    except OSError as e:
        return [f"redis: the control connection failed: {e}"]
    saved, trouble = soak_redis.read_log(rundir)
    overlapping = sum(any(a <= e and s <= b for a, b in windows) for s, e in control.fork_spans)
    lines = [
        f"redis: {control.bgsaves} BGSAVE forks ({overlapping} while apply/undo ran; "
        f"{control.busy} BGSAVEs refused, the previous child still saving), "
        f"{saved} saves ended well, last save {info.get('rdb_last_bgsave_status')}, "
        f"total_forks {info.get('total_forks')}, {info.get('db0', '').split(',')[0]}, "
        f"rejected connections {info.get('rejected_connections')}, "
        f"children left {len(children_of(pid))}, log trouble lines {len(trouble)}"
    ]
    lines += [f"redis: {e}" for e in control.errors[:5]]
    lines += [f"redis log: {ln}" for ln in trouble[:10]]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--daemon",
        choices=("kvserver", "redis"),
        default="kvserver",
        help="examples/kvserver (thread per connection) or Debian's redis-server with its "
        "real security update (needs --rate)",
    )
    ap.add_argument(
        "--bgsave-every",
        type=float,
        default=0.5,
        metavar="S",
        help="redis: ask for a BGSAVE (a fork of the target) every S seconds; 0: never",
    )
    ap.add_argument(
        "--keys",
        type=int,
        default=200_000,
        help="redis: keys of 100 bytes loaded first, so each BGSAVE child works a while",
    )
    ap.add_argument(
        "--rt-main-only",
        action="store_true",
        help="redis with --rt-load: only the main thread SCHED_FIFO, its bio threads at "
        "normal priority (shows the window waiting for them on a busy machine)",
    )
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument(
        "--warm",
        action="store_true",
        help="apply/undo from one long-running process (as the agent does) instead "
        "of a livesplice command per step",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run livesplice (and the control command) at this nice level",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open-loop C clients, each sending this many requests/s (default: closed-loop "
        "Python clients)",
    )
    ap.add_argument(
        "--rt-load",
        type=int,
        default=0,
        metavar="PRIO",
        help="run the server and the --rate client SCHED_FIFO at PRIO (chrt): on a machine "
        "shared with other work, the latency then shows what livesplice does to the server, "
        "not what the other jobs do; livesplice itself runs as usual (SCHED_OTHER)",
    )
    args = ap.parse_args()
    if args.daemon == "redis" and not args.rate:
        ap.error("--daemon redis needs --rate (the open-loop client speaks RESP)")
    rt = ["chrt", "-f", str(args.rt_load)] if args.rt_load else []
    nice = ["nice", "-n", str(args.nice)] if args.nice else []
    redis = soak_redis.prepare() if args.daemon == "redis" else None
    control_conn: soak_redis.RedisControl | None = None
    tmp = Path(tempfile.mkdtemp(prefix="livesplice-soak-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        port = 18500 + os.getpid() % 500
        if redis is not None:
            print(redis.describe())
            update, update_id = redis.update, redis.update_id
            server = soak_redis.start(redis, tmp / "redis", port)
            control_conn = soak_redis.RedisControl(port)
            control_conn.connect()
            control_conn.populate(args.keys)
            if args.rt_load:  # its threads, once they all exist (see realtime_threads)
                soak_redis.realtime_threads(server.pid, args.rt_load, main_only=args.rt_main_only)
        else:
            update, update_id, server = start_kvserver(tmp, port, rt)
        mode = "redis" if redis is not None else "line"
        clients: PingClients | RateClients = (
            RateClients(port, args.clients, args.rate, tmp, rt, mode)
            if args.rate
            else PingClients(port, args.clients)
        )
        if control_conn is not None and args.bgsave_every > 0:
            control_conn.bgsave_every(args.bgsave_every)
        time.sleep(2.0)  # baseline: the same load, no tool
        base_end = time.perf_counter()
        windows: list[tuple[float, float]] = []
        pauses: dict[str, list[float]] = {"apply": [], "undo": []}
        stopped: dict[str, list[float]] = {"apply": [], "undo": []}
        staggered = {"apply": 0, "undo": 0}  # commands whose stop let quick threads run on
        others: dict[str, list[float]] = {"apply": [], "undo": []}
        host: dict[str, list[float]] = {"apply": [], "undo": []}
        failures: list[str] = []
        holds: list[tuple[float, float]] = []  # --warm: livesplice's stops of the target
        holds_known = args.warm
        warm = None
        if args.warm:
            # one long-running process applies and undoes (as the agent does): no
            # interpreter start-up or first imports inside the measured spans
            warm = subprocess.Popen(
                [*nice, sys.executable, "-c", WARM_WORKER, str(update), str(server.pid)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert warm.stdout is not None and warm.stdin is not None
            warm.stdout.readline()
        for _ in range(args.cycles):
            for verb, extra in (
                ("apply", [str(update), "--allow-unsigned"]),
                ("undo", [update_id]),
            ):
                t0 = time.perf_counter()
                if warm is not None:
                    assert warm.stdin is not None and warm.stdout is not None
                    warm.stdin.write(verb + "\n")
                    warm.stdin.flush()
                    answer = json.loads(warm.stdout.readline())
                    windows.append((t0, time.perf_counter()))
                    if "error" in answer:
                        failures.append(f"{verb}: {answer['error'][:200]}")
                        continue
                    rep = answer
                    if rep.get("holds") is not None:
                        holds.extend((a, b) for a, b in rep["holds"])
                    else:
                        holds_known = False
                else:
                    r = subprocess.run(
                        [
                            *nice,
                            sys.executable,
                            "-m",
                            "livesplice",
                            verb,
                            *extra,
                            "--pid",
                            str(server.pid),
                            "--json",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    windows.append((t0, time.perf_counter()))
                    if r.returncode != 0:
                        failures.append(f"{verb}: {r.returncode} {r.stderr.strip()[:200]}")
                        continue
                    [rep] = json.loads(r.stdout)["processes"]
                pauses[verb].append(rep["pause_us"])
                stopped[verb].append(rep["stopped_us"])
                others[verb].append(rep["others_stopped_us"])
                host[verb].append(rep["host_stopped_us"])
                staggered[verb] += rep.get("staggered", 0) > 0
            if server.poll() is not None:
                failures.append(f"server died: {server.returncode}")
                break
        # control: the same interpreter start-up and imports on this 2-core machine, but a
        # command that never touches the target -- the latency it causes is CPU contention,
        # not stops; what apply/undo add beyond it is theirs
        control: list[tuple[float, float]] = []
        for _ in range(min(2 * args.cycles, 40)):
            t0 = time.perf_counter()
            subprocess.run(
                [*nice, sys.executable, "-m", "livesplice", "inspect", str(update)],
                capture_output=True,
                timeout=120,
            )
            control.append((t0, time.perf_counter()))
        if warm is not None:
            warm.kill()
            warm.wait()
        time.sleep(0.5)
        clients.close()
        redis_lines = (
            finish_redis(control_conn, server.pid, tmp / "redis", windows) if redis else []
        )
        left = leaks(server.pid) if server.poll() is None else {}
        server.kill()
        server.wait()
    finally:
        if server is not None and server.poll() is None:  # the soak stopped half-way
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    def during(start: float, dt: float, spans: list[tuple[float, float]]) -> bool:
        return any(a <= start + dt and start <= b for a, b in spans)

    base_s = [(s, dt) for s, dt in clients.samples if s + dt < base_end]
    tool_s = [(s, dt) for s, dt in clients.samples if s >= base_end and during(s, dt, windows)]
    base = [dt * 1e3 for _, dt in base_s]
    tool = [dt * 1e3 for _, dt in tool_s]
    ctrl = [dt * 1e3 for s, dt in clients.samples if during(s, dt, control)]
    print(
        f"cycles {args.cycles}, tool failures {len(failures)}, "
        f"failed client requests {len(clients.failed)} of {len(clients.samples)}"
    )
    for f in failures[:5]:
        print("  ", f)
    rows = [
        ("without the tool", base),
        ("while `livesplice inspect` runs (CPU contention only)", ctrl),
        ("while apply/undo run", tool),
    ]
    if control_conn is not None and control_conn.fork_spans:
        # redis's own fork() for BGSAVE stalls its event loop (~2 ms for 200k keys, its
        # INFO latest_fork_usec): the same figures without the requests a fork overlapped
        # tell livesplice's stops from redis's forks
        forks = control_conn.fork_spans
        rows += [
            (
                "without the tool, no BGSAVE fork meanwhile",
                [d for (st, dt), d in zip(base_s, base, strict=True) if not during(st, dt, forks)],
            ),
            (
                "while apply/undo run, no BGSAVE fork meanwhile",
                [d for (st, dt), d in zip(tool_s, tool, strict=True) if not during(st, dt, forks)],
            ),
        ]
    for name, vals in rows:
        print(
            f"client latency {name}: p50 {pct(vals, 50):.2f} ms, p99 {pct(vals, 99):.2f} ms, "
            f"max {max(vals, default=float('nan')):.2f} ms ({len(vals)} requests, "
            f"{sum(v > 2 for v in vals)} over 2 ms)"
        )
    if holds_known:
        # every request the target's stops overlapped (a check that the intervals and the
        # client's clock agree: some always do), and which of the slow ones they explain
        hit = [dt * 1e3 for st, dt in tool_s if during(st, dt, holds)]
        free = [dt * 1e3 for st, dt in tool_s if dt > 0.002 and not during(st, dt, holds)]
        print(
            f"requests a stop of the target by livesplice overlapped: {len(hit)} (p99 "
            f"{pct(hit, 99):.2f} ms, max {max(hit, default=0):.2f} ms, "
            f"{sum(v > 2 for v in hit)} over 2 ms); over 2 ms with no such stop: {len(free)} "
            f"(max {max(free, default=0):.2f} ms: the machine's load, the daemon's own work)"
        )
    for verb in ("apply", "undo"):
        p, s, o, h = pauses[verb], stopped[verb], others[verb], host[verb]
        if p:
            ratio = [b / a for a, b in zip(p, o, strict=True) if a]
            print(
                f"{verb}: pause_us {spread(p)}; stopped_us (any thread) {spread(s)}; "
                f"others_stopped_us {spread(o)}; host_stopped_us {spread(h)}; "
                f"others/pause p50 {statistics.median(ratio):.2f} max {max(ratio):.2f}; "
                f"staggered (a thread slow to stop, the others ran on) {staggered[verb]}"
            )
    print(f"leaks after the last undo: {left}")
    for line in redis_lines:
        print(line)


if __name__ == "__main__":
    main()
