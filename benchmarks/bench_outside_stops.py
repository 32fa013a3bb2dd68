"""How long threads that livesplice does not need wait for it while it is attached.

Plain script (not pytest): ``nice .venv/bin/python benchmarks/bench_outside_stops.py
[--seconds S] [--rounds N] [--rt-load PRIO]``. ``--rt-load``: the target runs SCHED_FIFO at
PRIO (chrt), so that on a shared machine what shows is waiting for livesplice, not for a
CPU (the tool holds SCHED_FIFO 1 only inside windows and holds).

Target: tests/progs/ptrace_outside.c. Its "receiver" thread gets a SIGUSR1 every ms and
records send -> handler latency; its "joiner" thread creates and joins a short thread every
ms and records create -> join latency. Neither is ever the host of a remote call (the main
thread, asleep in read(), is). Two phases of ``--seconds`` each, ``--rounds`` times:

* ``none``: no tracer (what the machine gives);
* ``attached``: a Tracee attached doing what apply does between and around its stop window,
  in a loop: a named remote_mmap and a remote_munmap on the host thread, a journal-like
  write + fsync through serve_while, C work on the tracing thread (a 32 MiB sha256: no
  Python signal handler runs meanwhile -- like a long run-pre match or a descheduled tool),
  pure Python work, and a stop window (stop + resume).

Printed per phase: the longest signal and join latency (ms) and how many were seen, and for
``attached`` the Tracee's own figures (stopped_max, others_stopped_max, host_stopped_max);
at the end the stops that threads other than a held host reported to the Tracee outside a
window (each one waited for livesplice): interrupt traps (a stale PTRACE_INTERRUPT),
signal-delivery-stops, exit stops.
A thread that waits for livesplice outside the window shows as a latency of the length of
the C work (tens of ms); one that does not stays at what ``none`` shows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "progs"))

from ptrace_targets import Target, build

from livesplice.process import ptrace
from livesplice.process.ptrace import Tracee
from livesplice.process.remote import PROT_READ, remote_mmap, remote_munmap


def stats(tg: Target) -> tuple[float, int, float, int]:
    """(signal max ms, signals, join max ms, joins) since the last reset."""
    sig_max, sigs, join_max, joins = (int(x) for x in tg.cmd("stats").split())
    return sig_max / 1000, sigs, join_max / 1000, joins


def count_outside_stops() -> dict[str, int]:
    """Count, from now on, the stops traced threads report outside a stop window, by kind
    (the Tracee's wait-status bookkeeping is wrapped). Not counted: the stops of a held
    host, and of a thread livesplice is stopping on purpose (_stop_thread: the host-to-be,
    or one thread at a time in detach)."""
    counts = {"interrupt": 0, "signal": 0, "exit": 0}
    record, stop_thread = Tracee._on_status, Tracee._stop_thread
    stopping = [0]

    def stopping_one(self: Tracee, tid: int) -> bool:
        stopping[0] = tid
        try:
            return stop_thread(self, tid)
        finally:
            stopping[0] = 0

    def counting(self: Tracee, tid: int, status: int) -> list[int]:
        host = self._host[0] if self._host else 0
        if not self._stop_began and tid not in (host, stopping[0]) and os.WIFSTOPPED(status):
            event, sig = status >> 16, os.WSTOPSIG(status)
            if event == ptrace.PTRACE_EVENT_STOP and sig == 5:  # SIGTRAP: not a group stop
                counts["interrupt"] += 1
            elif event == 0 and sig != ptrace.SYSCALL_STOP_SIG:
                counts["signal"] += 1
            elif event == ptrace.PTRACE_EVENT_EXIT:
                counts["exit"] += 1
        return record(self, tid, status)

    Tracee._on_status = counting  # type: ignore[method-assign]
    Tracee._stop_thread = stopping_one  # type: ignore[method-assign]
    return counts


def work_attached(t: Tracee, seconds: float, scratch: Path) -> int:
    """Apply-like work with the Tracee attached, for ``seconds``; returns the loops done."""
    end = time.monotonic() + seconds
    blob = bytes(32 << 20)
    loops = 0
    while time.monotonic() < end:
        addr = remote_mmap(t, 4096, PROT_READ, name="livesplice-bench")
        remote_munmap(t, addr, 4096)

        def journal() -> None:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)

        t.serve_while(journal)
        hashlib.sha256(blob).digest()  # C work: no bytecode boundary for ~50-100 ms
        sum(i * i for i in range(100_000))  # Python work
        t.stop()
        t.resume()
        loops += 1
    return loops


def main() -> None:
    """Run the phases and print one line each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rt-load", type=int, default=0, metavar="PRIO")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        exe = build("ptrace_outside", Path(d))
        scratch = Path(d) / "journal"
        outside = count_outside_stops()
        tg = (
            Target(Path("chrt"), "-f", str(args.rt_load), str(exe)) if args.rt_load else Target(exe)
        )
        try:
            time.sleep(0.1)
            for rnd in range(args.rounds):
                assert tg.cmd("reset") == "ok"
                time.sleep(args.seconds)
                s = stats(tg)
                print(
                    f"round {rnd} none:     signal max {s[0]:7.2f} ms ({s[1]:5d})  "
                    f"join max {s[2]:7.2f} ms ({s[3]:5d})",
                    flush=True,
                )
                assert tg.cmd("reset") == "ok"
                with Tracee(tg.pid) as t:
                    loops = work_attached(t, args.seconds, scratch)
                s = stats(tg)
                print(
                    f"round {rnd} attached: signal max {s[0]:7.2f} ms ({s[1]:5d})  "
                    f"join max {s[2]:7.2f} ms ({s[3]:5d})  loops {loops}  "
                    f"tracee: stopped_max {t.stopped_max_us / 1000:.2f} ms "
                    f"others {t.others_stopped_max_us / 1000:.2f} ms "
                    f"host {t.host_stopped_max_us / 1000:.2f} ms",
                    flush=True,
                )
            print(f"stops outside a window that waited for livesplice: {outside}")
        finally:
            tg.stop()


if __name__ == "__main__":
    main()
