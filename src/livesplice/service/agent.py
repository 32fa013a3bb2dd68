"""``livesplice agent``: keep every running and future process patched, and the kernel at boot.

At start: the kill-switch (:func:`livesplice.service.config.disabled`) is honoured; the crash
guard holds back every update whose apply never ended (:meth:`Store.guard_after_crash`);
every running process mapping a target of an accepted update is brought up to date. Then,
for every exec on the machine (:mod:`livesplice.service.execwatch`), the new process's
accepted updates are applied before it has run for long: the program is at its very first
instructions when the event arrives; the agent waits only for the dynamic loader to map the
libraries an update targets or needs. Each patch logs the window from exec to patched.

``--boot`` applies the accepted kernel updates for the running kernel from the store (no
network; Uptrack's install_on_reboot) and exits -- the early boot unit runs it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from livesplice.errors import LivespliceError, NoMatch
from livesplice.service.client import (
    apply_kernel,
    kernel_applied,
    kernel_release,
    load_accepted,
    patch_process,
    process_build_ids,
    running_build_ids,
)
from livesplice.service.config import disabled, load_config
from livesplice.service.store import Accepted, Store

LOADER_WAIT = 0.5  # seconds the agent waits for ld.so to map an update's target library
RESCAN = 30.0  # a full /proc rescan this often (and after lost events)
TICK = 0.002  # how often processes waiting for their loader are looked at again


class Agent:
    """The agent: applies the accepted updates to every process that execs a matching image, and
    rescans now and then for what it missed; each event is logged as JSON."""

    def __init__(
        self,
        store: Store,
        trusted: list[Path] | None = None,
        *,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.trusted = trusted
        self.log = log or _log_stderr
        self.stopping = False
        self.windows_ms: list[float] = []
        self.pending: dict[int, tuple[int, float]] = {}  # pid -> (exec ns, give up at)
        # what earlier attempts for a pending process did (reported when it is finished)
        self.done_so_far: dict[int, list[dict[str, Any]]] = {}

    # -------------------------------------------------------------- steps

    def start(self) -> bool:
        """Kill-switch and crash guard; False if the agent must not apply anything."""
        why = disabled()
        if why:
            self.log({"event": "disabled", "why": why})
            return False
        for uid in self.store.guard_after_crash():
            self.log({"event": "held", "id": uid, "why": self.store.held()[uid]})
        return True

    def sweep(self) -> None:
        """Every running process with an accepted update's target, brought up to date."""
        accepted = self.store.accepted()
        for a in accepted:  # verified and decoded once, before any exec needs them
            try:
                load_accepted(self.store, a.id, self.trusted)
            except (LivespliceError, OSError) as e:
                self.log({"event": "unusable", "id": a.id, "reason": str(e)})
        wanted = process_build_ids(accepted)
        if not wanted:
            return
        running = running_build_ids()
        pids = sorted({pid for b in wanted for pid in running.get(b, set())})
        held = self.store.held()
        for pid in pids:
            bids = {b for b, ps in running.items() if pid in ps}
            try:
                results = patch_process(self.store, pid, bids, self.trusted, accepted, held)
            except Exception as e:  # one process (any user's) must never stop the agent
                results = [_unexpected(pid, e)]
            for r in results:
                self.log({"event": "sweep", **r})

    def on_exec(self, pid: int, at_ns: int) -> None:
        """A process exec'd: patch it now if it runs a target, else watch it for a moment
        while the dynamic loader maps libraries (never blocking the other events)."""
        if pid == os.getpid():
            return
        accepted = self.store.accepted()
        if not process_build_ids(accepted):
            return
        self.pending[pid] = (at_ns, time.monotonic() + LOADER_WAIT)
        self._try(pid, accepted)

    def _try(self, pid: int, accepted: list[Accepted] | None = None) -> None:
        at_ns, give_up = self.pending[pid]
        late = time.monotonic() >= give_up
        accepted = self.store.accepted() if accepted is None else accepted
        wanted = process_build_ids(accepted)
        try:
            mapped = set(running_build_ids([pid]))
        except Exception:  # gone, or files no ELF parser should choke the agent on
            mapped = set()
        found = mapped & wanted
        if not found:
            # Nothing mapped may be a process caught inside execve (its old mm going, the
            # new one not there yet; the /proc poller sees a pid between fork and exec):
            # kept while its executable is dynamic, like one whose loader is at work.
            if late or not _dynamic(pid):
                self.pending.pop(pid, None)  # not a target (or gone, or a kernel thread)
                self.done_so_far.pop(pid, None)
            return
        try:
            results = patch_process(self.store, pid, mapped, self.trusted, accepted)
        except LivespliceError as e:
            results = [{"pid": pid, "status": "failed", "abort": e.abort, "reason": e.reason}]
        except Exception as e:  # one process (any user's) must never stop the agent
            results = [_unexpected(pid, e)]
        waiting = [
            r
            for r in results
            if r.get("abort") == NoMatch.abort and "cannot find symbol" in r.get("reason", "")
        ]
        if waiting and not late:
            # the loader has not mapped what the new code calls yet: next tick (what this
            # attempt applied is reported with the rest)
            self.done_so_far.setdefault(pid, []).extend(
                r for r in results if r["status"] != "failed"
            )
            return
        self.pending.pop(pid, None)
        results = [*self.done_so_far.pop(pid, []), *results]
        window = (time.monotonic_ns() - at_ns) / 1e6
        for r in results:
            if r["status"] == "applied":
                self.windows_ms.append(window)
            self.log({"event": "exec", "exec_to_patched_ms": round(window, 2), **r})

    def run(self, *, force_poll: bool = False, once: bool = False) -> int:
        """Run until stopped (or one pass with ``once``): listen for execs (the proc connector,
        or polling /proc when not allowed) and patch what matches; returns the exit code."""
        if not self.start():
            return 0
        from livesplice.process.ptrace import release_orphans
        from livesplice.service.execwatch import Overflow, watcher

        _warm_up()
        with watcher(force_poll) as w:
            self.log(
                {
                    "event": "started",
                    "watcher": w.kind,
                    "pid": os.getpid(),
                    "accepted": [a.id for a in self.store.accepted()],
                }
            )
            self.sweep()
            self.log({"event": "ready"})  # running processes done; now each exec as it comes
            if once:
                return 0
            last = time.monotonic()
            while not self.stopping:
                try:
                    for ev in w.events(TICK if self.pending else 0.5):
                        self.on_exec(ev.pid, ev.at_ns)
                    for pid in list(self.pending):
                        self._try(pid)
                    release_orphans()  # a thread an apply had to leave traced (vfork)
                except Overflow:
                    self.log({"event": "lost-events", "action": "rescan"})
                    self.sweep()
                if time.monotonic() - last > RESCAN:
                    self.sweep()
                    last = time.monotonic()
        self.log({"event": "stopped"})
        return 0

    def boot(self) -> int:
        """Re-apply accepted kernel updates for the running kernel (no network)."""
        if not self.start():
            return 0
        if not load_config().install_on_reboot:
            self.log({"event": "boot", "status": "install_on_reboot is off"})
            return 0
        release = kernel_release()
        rc = 0
        for a in self.store.accepted():
            if a.kind != "kernel" or not any(b.startswith(f"{release}:") for b in a.build_ids):
                continue
            if a.id in self.store.held():
                self.log({"event": "boot", "id": a.id, "status": "held"})
                continue
            if kernel_applied(a.id):
                continue
            r = apply_kernel(self.store, a, self.trusted)
            self.log({"event": "boot", **r})
            rc = rc or (1 if r["status"] == "failed" else 0)
        return rc


def _warm_up() -> None:
    """Import now what applying needs (numpy, capstone, pyelftools, the engine): a first
    import inside the first exec's window used to cost it ~150 ms."""
    import capstone  # noqa: F401
    import numpy  # noqa: F401

    import livesplice.process.apply
    import livesplice.process.match
    import livesplice.process.remote
    import livesplice.process.stopwindow  # noqa: F401


def _unexpected(pid: int, e: Exception) -> dict[str, Any]:
    """An error livesplice did not foresee, while handling one process: reported for that
    process (a bug to report), and the agent goes on with the others."""
    return {
        "pid": pid,
        "status": "failed",
        "abort": "FAILED",
        "reason": f"unexpected {type(e).__name__}: {e}"[:300],
    }


def _dynamic(pid: int) -> bool:
    """Does the program have an interpreter (ld.so) that maps libraries after exec?"""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = b"\x03\0\0\0"
    return any(table[i * phentsize : i * phentsize + 4] == pt_interp for i in range(phnum))


def _log_stderr(event: dict[str, Any]) -> None:
    print("livesplice-agent: " + json.dumps(event, sort_keys=True), file=sys.stderr, flush=True)


def run_agent(
    store: Store,
    trusted: list[Path] | None,
    *,
    force_poll: bool = False,
    once: bool = False,
    boot: bool = False,
    log_json: bool = False,
    http: tuple[str, int] | None = None,
) -> int:
    """The ``livesplice agent`` command; SIGTERM/SIGINT stop it cleanly."""
    log = None
    if log_json:

        def log(event: dict[str, Any]) -> None:
            print(json.dumps(event, sort_keys=True), flush=True)

    agent = Agent(store, trusted, log=log)
    if boot:
        return agent.boot()

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    manager = None
    if http is not None:
        from livesplice.service.manager import Manager

        cfg = load_config()
        manager = Manager(store, http[0], http[1], cfg.repo, cfg.channel, trusted)
        manager.start()
        agent.log(
            {
                "event": "manager",
                "url": manager.url,
                "token": f"in {store.root / 'manager-token'} (open URL#token=TOKEN)",
            }
        )
    try:
        return agent.run(force_poll=force_poll, once=once)
    finally:
        if manager is not None:
            manager.stop()
