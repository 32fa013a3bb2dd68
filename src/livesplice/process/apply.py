"""apply / view / undo for running processes: the orchestration, as a flat list of steps.

Order of work (DESIGN.md): everything slow happens before the stop window --

1. find the update's targets in the process (/proc/PID/maps);
2. run-pre match every target (refuse before touching anything);
3. plan the load (resolve every symbol; refuse if one is missing);
4. attach; map code/data near each image; write code, data and the state record;
5. pre_apply hooks;
6. the stop window: check no thread is in a replaced function, run the apply hook, write the
   jumps; busy -> resume, retry, then abort (fail_apply hooks, unmap, process as before);
7. post_apply hooks; record the pause in the state record; detach.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livesplice.errors import (
    CodeBusy,
    ExitCode,
    HookFailed,
    LivespliceError,
    NoMatch,
    NoPermission,
    NotApplied,
    TargetGone,
    UsageError,
)
from livesplice.faults import checkpoint
from livesplice.process.state import (
    NAME_PREFIX,
    StateRecord,
    TrampolineRecord,
    read_records,
    trampoline_status,
)
from livesplice.update.archive import UpdateFile
from livesplice.update.format import Manifest

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from livesplice.process.image import MappedImage
    from livesplice.process.load import LoadImage
    from livesplice.process.ptrace import Tracee

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
LOCK_DIR = Path(os.environ.get("LIVESPLICE_RUN_DIR", "/run/livesplice"))


@dataclass
class ApplyReport:
    pid: int
    id: str
    functions: list[str]
    pause_us: float
    attempts: int
    threads: int
    warnings: list[str] = field(default_factory=list)
    ran_out: int = 0  # busy threads let run out of the replaced functions


@dataclass
class _Prepared:
    """One target image in the process, matched and planned, nothing touched yet."""

    target_name: str
    image: MappedImage
    plan: Any  # livesplice.process.load.LoadPlan
    warnings: list[str]


def check_process(pid: int) -> None:
    if not Path(f"/proc/{pid}").is_dir():
        raise TargetGone(f"no process with PID {pid}", advice="check the PID (ps -p PID)")
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        os.close(fd)
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    except PermissionError:
        raise NoPermission(
            f"not allowed to trace process {pid}",
            advice="run livesplice as root or as the process's user "
            "(and check kernel.yama.ptrace_scope)",
        ) from None


@contextmanager
def process_lock(pid: int) -> Iterator[None]:
    """One livesplice at a time per process (two patchers racing on one entry would corrupt)."""
    try:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{pid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield  # no lock directory we can use (not root): proceed unlocked
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another livesplice is working on process {pid}",
                advice="wait for it to finish and try again",
            ) from None
        yield
    finally:
        os.close(fd)


def prepare(manifest: Manifest, pid: int) -> list[_Prepared]:
    """Steps 1-3: find targets, run-pre match, plan. Reads only; the process is untouched."""
    from livesplice.process.image import find_images, read_maps
    from livesplice.process.load import plan_load
    from livesplice.process.match import run_pre_match
    from livesplice.process.state import read_memory

    def read(addr: int, size: int) -> bytes:
        try:
            return read_memory(pid, addr, size)
        except FileNotFoundError:
            raise TargetGone(f"process {pid} exited") from None

    maps = read_maps(pid)
    prepared: list[_Prepared] = []
    for target in manifest.targets:
        for image in find_images(pid, target.name):
            match = run_pre_match(read, image, target, maps, compiler=manifest.compiler)
            warnings = list(match.warnings)
            plan = plan_load(target, image, match, read, pid, maps)
            prepared.append(_Prepared(target.name, image, plan, warnings))
    if not prepared:
        names = ", ".join(t.name for t in manifest.targets)
        raise NoMatch(
            f"process {pid} does not run any target of update {manifest.id} ({names})",
            advice="check the PID, or use --all to patch every process running a target",
        )
    return prepared


def _run_hooks(t: Tracee, hooks: list[tuple[str, int]], kind: str) -> None:
    """Call each hook (``int fn(void)``) in the target; a non-zero return is a failure."""
    from livesplice.process.remote import remote_call

    for name, addr in hooks:
        try:
            rc = remote_call(t, addr)
        except HookFailed as e:
            # It crashed or hung half-way: whatever it did so far (a lock taken, a pointer
            # into the update stored somewhere) stays done. Keep the update's memory.
            raise UncleanHook(
                f"the {kind} hook {name}() did not finish: {e.reason}",
                details=[*e.details, "the update's memory stays mapped: the hook may have "
                         "left pointers into it; the process may be inconsistent"],
                advice="consider restarting the process; fix the hook",
            ) from None
        if rc != 0:
            raise HookFailed(
                f"the {kind} hook {name}() returned {rc}",
                details=[f"hook {name} at {addr:#x} in process {t.pid}"],
                advice="the update was not applied; the hook's author decides what "
                "a non-zero return means",
            )


class UncleanHook(HookFailed):
    """A hook crashed or timed out (as opposed to returning a failure code)."""


def _late_hooks(t: Tracee, hooks: list[tuple[str, int]], kind: str) -> list[str]:
    """post_apply/post_reverse run after the change is made: a failure cannot undo it, so it
    is reported as a warning instead of pretending a rollback."""
    try:
        _run_hooks(t, hooks, kind)
    except HookFailed as e:
        return [f"{e.reason} (the change itself is in place)"]
    return []


def apply_to_process(
    manifest: Manifest, pid: int, *, retries: int = 5, interval: float = 1.0
) -> ApplyReport:
    from livesplice.process.load import near_range
    from livesplice.process.ptrace import Tracee
    from livesplice.process.remote import remote_mmap, remote_munmap
    from livesplice.process.stopwindow import CodeChanged, StopWindow

    check_process(pid)
    with process_lock(pid):
        existing = [r for r, _ in read_records(pid) if r is not None]
        if any(r.id == manifest.id and r.reverted for r in existing):
            raise UsageError(
                f"update {manifest.id} was undone in process {pid}, but its memory is still "
                "referenced by the program and stays mapped under that id",
                advice="apply it under a new id (`livesplice create --id NEW ...`)",
            )
        if any(r.id == manifest.id for r in existing):
            raise UsageError(
                f"update {manifest.id} is already applied to process {pid}",
                advice=f"see `livesplice view --pid {pid}`",
            )
        prepared = prepare(manifest, pid)
        code_size = sum(p.plan.code_size for p in prepared)
        data_size = sum(p.plan.data_size for p in prepared)
        # One code region must reach every image it patches with rel32 jumps.
        lo = max(near_range(p.image)[0] for p in prepared)
        hi = min(near_range(p.image)[1] for p in prepared)
        if lo >= hi:
            raise NoMatch(
                "the patched images are too far apart for one update region",
                advice="split the update per library",
            )

        mapped: list[tuple[int, int]] = []
        t = Tracee(pid)
        try:
            code = remote_mmap(
                t, max(code_size, 1), PROT_READ | PROT_EXEC, near=(lo, hi),
                name=f"{NAME_PREFIX}{manifest.id}:code",
            )
            mapped.append((code, max(code_size, 1)))
            checkpoint("apply:mapped-code")
            data = 0
            if data_size:
                data = remote_mmap(
                    t, data_size, PROT_READ | PROT_WRITE, near=(lo, hi),
                    name=f"{NAME_PREFIX}{manifest.id}:data",
                )
                mapped.append((data, data_size))
            images: list[tuple[_Prepared, LoadImage]] = []
            functions: list[tuple[int, int, str]] = []
            c, d = code, data
            for p in prepared:
                functions.extend(
                    (c + off, c + off + s.size, s.name)
                    for s, off in p.plan.code_layout if s.executable
                )
                img = p.plan.build(c, d)
                t.write(c, img.code)
                if img.data:
                    t.write(d, img.data)
                images.append((p, img))
                c += p.plan.code_size
                d += p.plan.data_size
            checkpoint("apply:wrote-code")
            hooks = _hook_addresses(manifest, images)
            record = StateRecord(
                id=manifest.id,
                description=manifest.description,
                sequence=max((r.sequence for r in existing), default=0) + 1,
                applied_at=time.time(),
                trampolines=[
                    TrampolineRecord(
                        function=tr.function, target=p.target_name, address=tr.address,
                        original=tr.original.hex(), jump=tr.jump.hex(),
                        replacement=tr.target,
                        busy_start=_busy(p.plan, tr)[0], busy_end=_busy(p.plan, tr)[1],
                    )
                    for p, img in images
                    for tr in img.trampolines
                ],
                code=(code, code + max(code_size, 1)),
                data=(data, data + data_size) if data_size else (0, 0),
                hooks=hooks,
                targets=sorted({p.target_name for p in prepared}),
                tool_pid=os.getpid(),
                functions=functions,
            )
            blob = record.encode()
            state = remote_mmap(
                t, len(blob) + 4096, PROT_READ, name=f"{NAME_PREFIX}{manifest.id}"
            )
            mapped.append((state, len(blob) + 4096))
            t.write(state, blob)
            checkpoint("apply:wrote-state")

            _run_hooks(t, hooks.get("pre_apply", []), "pre_apply")
            window = StopWindow(
                t,
                [(tr.busy_start, tr.busy_end, tr.function) for tr in record.trampolines],
                retries=retries,
                interval=interval,
            )
            apply_hooks = hooks.get("apply", [])
            try:
                stats = window.run(
                    [(tr.address, bytes.fromhex(tr.jump)) for tr in record.trampolines],
                    inside=(lambda: _run_hooks(t, apply_hooks, "apply")) if apply_hooks else None,
                    expect=[bytes.fromhex(tr.original) for tr in record.trampolines],
                )
            except (CodeBusy, HookFailed, CodeChanged):
                _safe_hooks(t, hooks.get("fail_apply", []))
                raise
            # The jumps are in: from here on, nothing may unmap what they point to.
            mapped.clear()
            checkpoint("apply:after-stop")
            record.pause_us = stats.pause_us
            t.write(state, record.encode())
            warnings = _late_hooks(t, hooks.get("post_apply", []), "post_apply")
            return ApplyReport(
                pid=pid, id=manifest.id,
                functions=[tr.function for tr in record.trampolines],
                pause_us=stats.pause_us, attempts=stats.attempts, threads=stats.threads,
                ran_out=stats.ran_out,
                warnings=[w for p in prepared for w in p.warnings] + warnings,
            )
        except UncleanHook:
            mapped.clear()  # see UncleanHook: never unmap what a half-run hook may use
            raise
        finally:
            try:
                for addr, size in reversed(mapped):
                    remote_munmap(t, addr, size)
            except LivespliceError:
                pass  # the process is gone; nothing left to clean
            finally:
                t.detach()


def _busy(plan: Any, tr: Any) -> tuple[int, int]:
    """The running code a trampoline replaces (for the stack check): the matched body.

    With stacking the body is the earlier update's replacement, not the original entry. The
    running body may be longer or shorter than the pre code (alternate jump encodings, nops),
    so the matcher's extent is used, not the pre section's size.
    """
    lo, hi = plan.match.extents.get(tr.key, (tr.address, tr.address + len(tr.original)))
    return (int(lo), int(max(hi, lo + len(tr.original))))


def _hook_addresses(
    manifest: Manifest, images: list[tuple[_Prepared, LoadImage]]
) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for h in manifest.hooks:
        for p, img in images:
            if p.target_name == h.target and h.key in img.addresses:
                out.setdefault(h.kind, []).append((h.function, img.addresses[h.key]))
    return out


def _safe_hooks(t: Tracee, hooks: list[tuple[str, int]]) -> None:
    """fail/undo mirrors run best-effort: the abort itself must not be masked."""
    from livesplice.process.remote import remote_call

    for _name, addr in hooks:
        with suppress(LivespliceError):
            remote_call(t, addr)


# ---------------------------------------------------------------- undo


def undo_in_process(
    update_id: str, pid: int, *, retries: int = 5, interval: float = 1.0
) -> float:
    """Restore the original bytes of every trampoline, then unmap the update. Returns pause."""
    from livesplice.process.ptrace import Tracee
    from livesplice.process.remote import remote_munmap
    from livesplice.process.stopwindow import StopWindow

    check_process(pid)
    with process_lock(pid):
        records = read_records(pid)
        mine = [(r, sm) for r, sm in records if sm.id == update_id]
        if not mine:
            raise NotApplied(f"update {update_id} is not applied to process {pid}")
        rec, sm = mine[0]
        if rec is None and sm.record is None:
            # An apply was interrupted before it wrote its record: trampolines are only ever
            # written after the record, so nothing points into these mappings. Unmap them.
            t = Tracee(pid)
            try:
                for rng in (sm.code, sm.data):
                    if rng:
                        remote_munmap(t, rng[0], rng[1] - rng[0])
                close_stale_descriptors(t, update_id)
            finally:
                t.detach()
            return 0.0
        if rec is None:
            raise NotApplied(
                f"update {update_id} in process {pid} has an unreadable state record",
                advice="the process may be corrupted; restart it to be safe",
            )
        later = [r for r, _ in records if r is not None and r.sequence > rec.sequence]
        mine_addrs = {tr.address for tr in rec.trampolines}
        blocking = [r.id for r in later if mine_addrs & {tr.address for tr in r.trampolines}]
        if blocking:
            raise UsageError(
                f"update {update_id} has later updates stacked on it: {', '.join(blocking)}",
                advice="undo those first (undo in reverse order of apply)",
            )
        from livesplice.process.state import read_memory

        writes: list[tuple[int, bytes]] = []
        for tr in rec.trampolines:
            now = read_memory(pid, tr.address, len(bytes.fromhex(tr.jump))).hex()
            if now == tr.jump:
                writes.append((tr.address, bytes.fromhex(tr.original)))
            elif now != tr.original:
                raise UsageError(
                    f"the entry of {tr.function} at {tr.address:#x} was changed by someone "
                    "else since the update was applied",
                    details=[f"expected {tr.jump} or {tr.original}, found {now}"],
                    advice="refusing to overwrite code livesplice did not write",
                )
        t = Tracee(pid)
        try:
            _run_hooks(t, rec.hooks.get("pre_reverse", []), "pre_reverse")
            # the loaded functions, decoded as code; an old record without them: the whole
            # code mapping (conservatively)
            busy = [(lo, hi, f"{name} (update {update_id})") for lo, hi, name in rec.functions] \
                or [(rec.code[0], rec.code[1], f"update {update_id} replacement code")]
            window = StopWindow(t, busy, retries=retries, interval=interval)
            reverse_hooks = rec.hooks.get("reverse", [])
            try:
                stats = window.run(
                    writes,
                    expect=[bytes.fromhex(tr.jump) for tr in rec.trampolines
                            if (tr.address, bytes.fromhex(tr.original)) in writes],
                    inside=(lambda: _run_hooks(t, reverse_hooks, "reverse"))
                    if reverse_hooks else None,
                )
            except (CodeBusy, HookFailed):
                _safe_hooks(t, rec.hooks.get("fail_reverse", []))
                raise
            for w in _late_hooks(t, rec.hooks.get("post_reverse", []), "post_reverse"):
                print(f"livesplice: warning: pid {pid}: {w}")
            ours = [r for r in (rec.code, rec.data) if r[1] > r[0]]
            t.stop()
            try:
                sps = [int(t.get_regs(tid).rsp) for tid in t.threads()]
            finally:
                t.resume()
            held = pointers_into(pid, ours, exclude=[*ours, *([sm.record] if sm.record else [])],
                                 stack_pointers=sps)
            if held is None or held:
                # The program still holds pointers into the update (a string the new code
                # stored in a global, a callback registered with a new function): unmapping
                # would crash it later. Keep the memory; the jumps are gone all the same.
                rec.reverted = True
                if sm.record:
                    t.write(sm.record[0], rec.encode())
                why = ("the program's writable memory is too large to scan" if held is None
                       else "the program still holds pointers into it, e.g. at "
                       + ", ".join(f"{a:#x}" for a in held[:3]))
                print(f"livesplice: warning: pid {pid}: undo kept update {update_id}'s memory "
                      f"mapped: {why}")
            else:
                for rng in (rec.code, rec.data, sm.record):
                    if rng and rng[1] > rng[0]:
                        remote_munmap(t, rng[0], rng[1] - rng[0])
            close_stale_descriptors(t, update_id)
            return stats.pause_us
        finally:
            t.detach()


POINTER_SCAN_LIMIT = int(os.environ.get("LIVESPLICE_POINTER_SCAN_LIMIT", str(4 << 30)))


def pointers_into(
    pid: int,
    ranges: list[tuple[int, int]],
    exclude: list[tuple[int, int]],
    stack_pointers: Sequence[int] = (),
) -> list[int] | None:
    """Addresses of 8-byte-aligned words in the process's writable memory that point into
    ``ranges`` (first 16 found); None when there is more writable memory than we scan.

    On a thread's stack only the live part (from its rsp up) is read: the dead area below
    rsp is full of stale words (return addresses and arguments of finished calls into the
    update) that the program can never use again.
    """
    import numpy as np

    from livesplice.process.image import read_maps

    if not ranges:
        return []
    areas = []
    for m in read_maps(pid):
        if "w" not in m.perms or any(lo <= m.start < hi for lo, hi in exclude):
            continue
        live_from = min((sp for sp in stack_pointers if m.start <= sp < m.end), default=None)
        lo = m.start if live_from is None else live_from & ~7
        areas.append((lo, m.end))
    if sum(hi - lo for lo, hi in areas) > POINTER_SCAN_LIMIT:
        return None
    hits: list[int] = []
    chunk = 16 << 20
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for lo, hi in areas:
            for start in range(lo, hi, chunk):
                try:
                    blob = os.pread(fd, min(chunk, hi - start), start)
                except OSError:
                    break  # e.g. a guard page or a mapping that went away
                words = np.frombuffer(blob[: len(blob) // 8 * 8], dtype=np.uint64)
                mask = np.zeros(len(words), dtype=bool)
                for rlo, rhi in ranges:
                    mask |= (words >= np.uint64(rlo)) & (words < np.uint64(rhi))
                for i in np.flatnonzero(mask)[:16]:
                    hits.append(start + 8 * int(i))
                if len(hits) >= 16:
                    return hits
    finally:
        os.close(fd)
    return hits


def close_stale_descriptors(t: Tracee, update_id: str) -> None:
    """Close memfd descriptors an interrupted apply left open in the target.

    apply closes each memfd right after mapping it; a tool killed between memfd_create and
    close leaves one open ("/memfd:livesplice:ID (deleted)" in /proc/PID/fd).
    """
    from livesplice.process.remote import SYS_CLOSE, remote_syscall
    from livesplice.process.state import update_mappings

    sm = update_mappings(t.pid).get(update_id)
    for fd in sm.fds if sm else []:
        remote_syscall(t, SYS_CLOSE, fd)


# ---------------------------------------------------------------- view


def view_process(pid: int) -> list[dict[str, Any]]:
    records = read_records(pid)
    good = [r for r, _ in records if r is not None]
    out: list[dict[str, Any]] = []
    for rec, sm in records:
        if rec is None:
            state = "unreadable" if sm.record else "incomplete (interrupted apply; undo cleans up)"
            out.append({"pid": pid, "id": sm.id, "state": state})
            continue
        later = [r for r in good if r.sequence > rec.sequence]
        state = trampoline_status(pid, rec, later)
        if rec.reverted:
            state = "undone (memory kept: still referenced)"
        out.append(
            {
                "pid": pid,
                "id": rec.id,
                "description": rec.description,
                "state": state,
                "sequence": rec.sequence,
                "functions": [tr.function for tr in rec.trampolines],
                "targets": rec.targets,
                "pause_us": rec.pause_us,
                "applied_at": rec.applied_at,
            }
        )
    return out


def patched_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if "/memfd:livesplice:" in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


# ---------------------------------------------------------------- CLI glue


def _target_pids(args: argparse.Namespace, manifest: Manifest | None) -> list[int]:
    if args.pid:
        return list(dict.fromkeys(args.pid))
    if manifest is None:
        return patched_pids()
    from livesplice.process.image import processes_running

    pids: set[int] = set()
    for t in manifest.targets:
        pids.update(processes_running(t.name))
    pids.discard(os.getpid())
    if not pids:
        raise NoMatch(
            "no running process uses a target of this update: "
            + ", ".join(t.name for t in manifest.targets)
        )
    return sorted(pids)


def cli_apply(args: argparse.Namespace, update: UpdateFile) -> int:
    """Apply ``update`` -- the object whose signature the CLI verified, never the path again."""
    manifest = update.manifest
    if any(t.kind in ("kernel", "kernel_module") for t in manifest.targets):
        raise UsageError("this is a kernel update; apply it without --pid on the patched machine")
    pids = _target_pids(args, manifest)
    reports: list[dict[str, Any]] = []
    worst: LivespliceError | None = None
    for pid in pids:
        try:
            r = apply_to_process(manifest, pid, retries=args.retries, interval=args.retry_interval)
            reports.append({"pid": pid, "status": "applied", "pause_us": round(r.pause_us, 1),
                            "attempts": r.attempts, "threads": r.threads,
                            "ran_out": r.ran_out,
                            "functions": r.functions, "warnings": r.warnings})
            if not args.json:
                ran = f", {r.ran_out} run out of replaced code" if r.ran_out else ""
                print(f"livesplice: applied {manifest.id} to pid {pid}: "
                      f"{len(r.functions)} function(s) replaced, pause {r.pause_us:.0f} us "
                      f"({r.threads} threads{ran}, attempt {r.attempts})")
                for w in r.warnings:
                    print(f"livesplice: warning: {w}")
        except LivespliceError as e:
            worst = worst or e
            reports.append({"pid": pid, "status": "failed", "abort": e.abort, "reason": e.reason,
                            "details": e.details})
            if not args.json:
                print(e.render().replace("livesplice:", f"livesplice: pid {pid}:", 1),
                      file=sys.stderr)
    if args.json:
        print(json.dumps({"id": manifest.id, "processes": reports}, indent=1))
    return int(worst.code) if worst else ExitCode.OK


def cli_view(args: argparse.Namespace) -> int:
    pids = list(dict.fromkeys(args.pid)) if args.pid else patched_pids()
    rows: list[dict[str, Any]] = []
    for pid in pids:
        check_process(pid)
        rows.extend(view_process(pid))
    if args.json:
        print(json.dumps({"processes": rows}, indent=1))
        return ExitCode.OK
    if not rows:
        print("livesplice: no updates applied" + (f" to pid {', '.join(map(str, pids))}"
                                                 if args.pid else ""))
    for r in rows:
        if "functions" not in r:
            print(f"pid {r['pid']}: {r['id']} [{r['state']}]")
            continue
        pause = f", pause {r['pause_us']:.0f} us" if r.get("pause_us") is not None else ""
        print(f"pid {r['pid']}: {r['id']} [{r['state']}] {r['description']}{pause}")
        for fn in r["functions"]:
            print(f"    replaced: {fn}")
    return ExitCode.OK


def cli_undo(args: argparse.Namespace) -> int:
    if args.all:
        pids = [p for p in patched_pids()
                if any(sm.id == args.update_id for _, sm in read_records(p))]
        if not pids:
            raise NotApplied(f"update {args.update_id} is not applied to any process")
    else:
        pids = list(dict.fromkeys(args.pid))
    worst: LivespliceError | None = None
    results = []
    for pid in pids:
        try:
            pause = undo_in_process(args.update_id, pid, retries=args.retries,
                                    interval=args.retry_interval)
            results.append({"pid": pid, "status": "undone", "pause_us": round(pause, 1)})
            if not args.json:
                print(f"livesplice: undid {args.update_id} in pid {pid} (pause {pause:.0f} us)")
        except LivespliceError as e:
            worst = worst or e
            results.append({"pid": pid, "status": "failed", "abort": e.abort, "reason": e.reason})
            if not args.json:
                print(e.render().replace("livesplice:", f"livesplice: pid {pid}:", 1),
                      file=sys.stderr)
    if args.json:
        print(json.dumps({"id": args.update_id, "processes": results}, indent=1))
    return int(worst.code) if worst else ExitCode.OK
