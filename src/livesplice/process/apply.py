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

:func:`apply_to_process` is that list: ``prepare`` (1-3), then :class:`_Splice`'s steps
``map`` / ``write`` / ``record`` (4), ``pre_hooks`` (5), ``switch`` (6), ``finish`` (7); the
``_Splice`` object holds what was mapped and takes it back on any failure before ``switch``.
Undo (:func:`_undo_locked`) reads the same way: find and trust the record, refuse a stacked
one, then :class:`_Unsplice`'s ``pre_hooks`` / ``switch`` / ``post_hooks`` / ``release``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from mmap import PROT_EXEC, PROT_READ, PROT_WRITE
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from livesplice.errors import (
    CodeBusy,
    HookFailed,
    LivespliceError,
    NoMatch,
    NoPermission,
    NotApplied,
    TargetGone,
    TargetStopped,
    UsageError,
)
from livesplice.faults import checkpoint
from livesplice.process import inherit, journal, procstat
from livesplice.process.journal import run_dir
from livesplice.process.state import (
    NAME_PREFIX,
    StateMapping,
    StateRecord,
    TrampolineRecord,
    read_records,
    trampoline_status,
)
from livesplice.text import printable
from livesplice.update.format import Manifest, Target

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from livesplice.process.image import MappedImage
    from livesplice.process.load import LoadImage, LoadPlan, Trampoline
    from livesplice.process.ptrace import Tracee
    from livesplice.process.stopwindow import PauseStats


@dataclass
class ApplyReport:
    """What apply did to one process: the functions replaced, how long the target was paused, how
    many attempts the stop window took; the CLI turns it into words."""

    pid: int
    id: str
    functions: list[str]
    pause_us: float
    attempts: int
    threads: int
    warnings: list[str] = field(default_factory=list)
    ran_out: int = 0  # busy threads let run out of the replaced functions
    # what the target felt over the WHOLE apply (pause_us is only the final window): the
    # longest time any of its threads was held stopped (remote mmap calls, hooks, the
    # window, detaching), the same for every thread but the one hosting livesplice's remote
    # calls (outside the window only that one stops), the host's, and the most threads held
    stopped_us: float = 0.0
    threads_stopped_max: int = 0
    others_stopped_us: float = 0.0
    host_stopped_us: float = 0.0
    # rounds the window's stop let quick threads run on while a thread not given a CPU
    # (a laggard) reached its stop (Tracee._stagger); pause_us starts after them
    staggered: int = 0
    # per patched image: which file it is and why it is the target (see identify())
    images: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    """One target image in the process, matched and planned, nothing touched yet."""

    target_name: str
    image: MappedImage
    plan: LoadPlan
    warnings: list[str]
    identity: str = ""


def check_process(pid: int) -> None:
    """Refuse, with the right exit code, what cannot be a target: no such pid, a zombie, a
    kernel thread (no user memory), a process we may not trace."""
    if pid <= 0 or not Path(f"/proc/{pid}").is_dir():
        raise TargetGone(f"no process with PID {pid}", advice="check the PID (ps -p PID)")
    states = task_states(pid)
    if not states - {"Z", "X"}:
        raise TargetGone(f"process {pid} has exited (a zombie waiting for its parent)")
    if not states - {"T", "Z", "X"}:
        raise TargetStopped(
            f"process {pid} is stopped (SIGSTOP/SIGTSTP): livesplice must run code in it to "
            "load or remove an update, and will not wake it",
            advice=f"continue it (kill -CONT {pid}) and run the command again; it was left stopped",
        )
    try:
        os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise TargetGone(
            f"process {pid} is a kernel thread (or exited): it has no program to patch"
        ) from None
    except PermissionError:
        pass  # another user's process as non-root: opening its memory decides below
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"process {pid} exited") from None
    except PermissionError:
        raise NoPermission(
            f"not allowed to trace process {pid}",
            advice="run livesplice as root or as the process's user "
            "(and check kernel.yama.ptrace_scope)",
        ) from None


@contextmanager
def _exit_wins(pid: int, what: str) -> Iterator[None]:
    """A target that dies half-way makes every later step fail (short reads look like a
    code mismatch, a failed syscall like REMOTE_FAILED): report it as what it is."""
    try:
        yield
    except LivespliceError as e:
        if isinstance(e, TargetGone) or task_states(pid) - {"Z", "X"}:
            raise
        raise TargetGone(
            f"process {pid} exited during {what}", details=[f"(then: {e.abort}: {e.reason})"]
        ) from e
    except (ProcessLookupError, FileNotFoundError) as e:
        # /proc/PID/mem or maps of a process that exited between two reads (a BGSAVE child
        # under --all): ESRCH/ENOENT, not a traceback; anything else is a real bug
        if task_states(pid) - {"Z", "X"}:
            raise
        raise TargetGone(f"process {pid} exited during {what}", details=[f"(then: {e})"]) from e


def task_states(pid: int) -> set[str]:
    """The state letters (R, S, D, T, t, Z, ...) of every thread of ``pid``."""
    from livesplice.process.ptrace import task_state

    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    return {task_state(pid, int(tid)) for tid in tids}


@contextmanager
def process_lock(pid: int) -> Iterator[None]:
    """One livesplice at a time per process (two patchers racing on one entry would corrupt).

    The lock file is removed when we are done. A second livesplice that opened it before we
    unlinked it finds, once it holds the lock, that the name now points elsewhere (or
    nowhere) and starts over on the new file.
    """
    try:
        lock_dir = run_dir()
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        yield  # no lock directory we can use (not root): proceed unlocked
        return
    path = lock_dir / f"{pid}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another livesplice is working on process {pid}",
                advice="wait for it to finish and try again",
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # unlinked by the previous holder meanwhile: lock the new file
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(path)
        os.close(fd)


def prepare(manifest: Manifest, pid: int, *, by_code: bool = False) -> list[_Prepared]:
    """Steps 1-3: find targets, run-pre match, plan. Reads only; the process is untouched.

    ``by_code``: the user named this process (``--pid``): a program running under another
    name than the update's executable target is tried by its code. Never for processes
    found by a scan (``--all``, the agent): a program that merely shares code with the
    target must not be patched because some user runs it."""
    from livesplice.process.image import find_images, main_executable
    from livesplice.process.load import plan_load
    from livesplice.process.match import run_pre_match
    from livesplice.process.procmaps import read_maps
    from livesplice.process.state import read_memory

    def read(addr: int, size: int) -> bytes:
        try:
            return read_memory(pid, addr, size)
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone(f"process {pid} exited") from None

    maps = read_maps(pid)
    prepared: list[_Prepared] = []
    skipped: list[str] = []
    for target in manifest.targets:
        images = find_images(pid, target.name, maps, build_ids=target.build_ids, skipped=skipped)
        found_by_code = False
        if not images and target.kind == "executable" and by_code:
            # a program runs under any name (Debian's redis-server is a symlink to
            # redis-check-rdb): its code decides, not its name
            exe = main_executable(pid, maps)
            if exe is not None:
                images, found_by_code = [exe], True
        for image in images:
            # a binary verified at create has no .comment (dh_strip) but needs no warning:
            # its code was compared with the update's then, and is again now
            verified = image.build_id in {v.build_id for v in target.verified}
            try:
                match = run_pre_match(
                    read, image, target, maps, compiler="" if verified else manifest.compiler
                )
            except NoMatch as e:
                if not found_by_code:
                    raise
                skipped.append(
                    f"{image.path} in process {pid} is not named {target.name} and "
                    f"its code is not the update's pre code: {e.reason}"
                )
                continue
            warnings = list(match.warnings)
            plan = plan_load(target, image, match, read, pid, maps)
            prepared.append(
                _Prepared(
                    target.name,
                    image,
                    plan,
                    warnings,
                    identify(target, image, found_by_code, len(match.functions)),
                )
            )
    if not prepared:
        names = ", ".join(t.name for t in manifest.targets)
        raise NoMatch(
            f"process {pid} does not run any target of update {manifest.id} ({names})",
            details=skipped,
            advice="check the PID, or use --all to patch every process running a target",
        )
    return prepared


def identify(target: Target, image: MappedImage, by_code: bool, functions: int) -> str:
    """Why ``image`` is ``target``, in words for the apply report."""
    bid = image.build_id or "none"
    for v in target.verified:
        if v.build_id == image.build_id:
            origin = f" {v.origin}" if v.origin else ""
            return (
                f"{target.name}: {image.path} is the binary verified at create time"
                f"{origin} ({v.file}, build-id {bid})"
            )
    if image.build_id and image.build_id == target.build_id:
        return f"{target.name}: {image.path} is the update's own pre build (build-id {bid})"
    how = "by its code (its name differs)" if by_code else "by name"
    return (
        f"{target.name}: {image.path} found {how}; its {functions} pre function(s) matched "
        f"the update's (build-id {bid})"
    )


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
                details=[
                    *e.details,
                    "the update's memory stays mapped: the hook may have "
                    "left pointers into it; the process may be inconsistent",
                ],
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
    manifest: Manifest,
    pid: int,
    *,
    retries: int = 5,
    interval: float = 1.0,
    by_code: bool = False,
) -> ApplyReport:
    """Splice ``manifest`` into process ``pid``: the steps of this module's docstring.

    Steps 1-3 only read the process. From step 4 on, :class:`_Splice` holds what was mapped
    and undoes it on any failure, until the jumps are written (after that the update stays).
    """
    check_process(pid)
    with process_lock(pid), _exit_wins(pid, "apply"):
        existing = _clear_the_way(manifest, pid, retries=retries, interval=interval)
        prepared = prepare(manifest, pid, by_code=by_code)  # steps 1-3
        near = _reach(prepared)
        with _Splice(pid, manifest.id) as run:
            regions = run.map(prepared, near)  # step 4
            images = run.write(prepared, regions)
            run.record(manifest, prepared, images, regions, existing)
            run.pre_hooks()  # step 5
            stats = run.switch(retries=retries, interval=interval)  # step 6
            return run.finish(prepared, stats)  # step 7


def _clear_the_way(
    manifest: Manifest, pid: int, *, retries: int, interval: float
) -> list[StateRecord]:
    """Refuse what must not be applied again; clean up an interrupted apply of this very
    update. Returns the records of the other updates in the process (for the sequence)."""
    present = {u.id: u for u in updates_in(pid)}
    mine = present.get(manifest.id)
    if mine is not None and mine.record is not None and mine.record.reverted:
        raise UsageError(
            f"update {manifest.id} was undone in process {pid}, but its memory is still "
            "referenced by the program and stays mapped under that id",
            advice="apply it under a new id (`livesplice create --id NEW ...`)",
        )
    if mine is not None and not mine.verified:
        raise UsageError(
            f"process {pid} has a mapping named like update {manifest.id} that "
            "livesplice's journal does not know",
            details=[f"from the process: {mine.error or 'a record livesplice did not write'}"],
            advice=f"check it with `livesplice view --pid {pid}`; undo it with "
            f"`livesplice undo {manifest.id} --pid {pid} --from-target`, or restart the "
            "process",
        )
    if mine is not None and state_of(pid, mine, list(present.values())) == "applied":
        raise UsageError(
            f"update {manifest.id} is already applied to process {pid}",
            advice=f"see `livesplice view --pid {pid}`",
        )
    if mine is not None:
        # an interrupted apply of this very update (journal-backed): clean it up first
        _undo_locked(manifest.id, pid, retries=retries, interval=interval, from_target=None)
        present.pop(manifest.id)
    return [u.record for u in present.values() if u.record is not None]


def _reach(prepared: list[_Prepared]) -> tuple[int, int]:
    """Where the update's code may go: within rel32 reach of every image it patches."""
    from livesplice.process.load import near_range

    lo = max(near_range(p.image)[0] for p in prepared)
    hi = min(near_range(p.image)[1] for p in prepared)
    if lo >= hi:
        raise NoMatch(
            "the patched images are too far apart for one update region",
            advice="split the update per library",
        )
    return lo, hi


@dataclass
class _Regions:
    """The update's memory in the process: code (r-x) and data (rw-), one block each."""

    code: int
    code_size: int
    data: int = 0
    data_size: int = 0


class _Splice:
    """One apply, from attaching to detaching, and everything it must undo on failure.

    What is mapped is remembered until the jumps are written (:meth:`switch`); any failure
    before that unmaps it, closes descriptors left open and removes the journal entry, so
    the process is as it was. A hook that crashed half-way (:class:`UncleanHook`) keeps the
    memory (the hook may have stored pointers into it). A target that died is detached
    first, so that how it ended (a crash signal: the service's crash guard) is known.
    """

    def __init__(self, pid: int, update_id: str) -> None:
        self.pid = pid
        self.id = update_id
        self.mapped: list[tuple[int, int]] = []
        self.keep = False  # the update must stay: jumps written, or a hook half-ran
        self.hooks: dict[str, list[tuple[str, int]]] = {}
        self.state_addr = 0
        self._record: StateRecord | None = None
        self.report: ApplyReport | None = None
        self.t: Tracee

    def __enter__(self) -> _Splice:
        from livesplice.process.ptrace import Tracee

        self.t = Tracee(self.pid)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        from livesplice.process.ptrace import CRASH_SIGNALS
        from livesplice.process.remote import remote_munmap_all

        t = self.t
        if isinstance(exc, UncleanHook):
            self.mapped.clear()  # never unmap what a half-run hook may use
            self.keep = True
        try:
            if isinstance(exc, TargetGone):
                t.detach()  # collects the end of the process, and with it how it ended
                # a process killed by a crash signal while it was being patched may have
                # been harmed by it
                if t.killed_by in CRASH_SIGNALS:
                    exc.crash_signal = t.killed_by  # the service's crash guard holds it
                    exc.details.append(
                        f"it crashed ({signal.Signals(t.killed_by).name}) "
                        "while it was being patched"
                    )
            remote_munmap_all(t, self.mapped[::-1])
            if not self.keep:  # rolled back: nothing of the update is left in the process
                close_stale_descriptors(t, self.id)
                t.serve_while(lambda: journal.remove_entry(self.pid, self.id))
        except LivespliceError:
            pass  # the process is gone; nothing left to clean
        finally:
            t.detach()
            if self.report is not None:  # detaching stops each thread once more: count it
                _note_stops(self.report, t)

    def _mmap(self, size: int, prot: int, name: str, near: tuple[int, int] | None) -> int:
        from livesplice.process.remote import remote_mmap

        addr = remote_mmap(self.t, size, prot, near=near, name=name)
        self.mapped.append((addr, size))
        return addr

    def map(self, prepared: list[_Prepared], near: tuple[int, int]) -> _Regions:
        """Step 4a: the journal entry first (undo's authority), then code and data memory."""
        _journal(self.pid, self.id, "mapping", None, self.t)
        code_size = sum(p.plan.code_size for p in prepared)
        data_size = sum(p.plan.data_size for p in prepared)
        regions = _Regions(
            self._mmap(
                max(code_size, 1), PROT_READ | PROT_EXEC, f"{NAME_PREFIX}{self.id}:code", near
            ),
            code_size,
        )
        checkpoint("apply:mapped-code")
        if data_size:
            regions.data = self._mmap(
                data_size, PROT_READ | PROT_WRITE, f"{NAME_PREFIX}{self.id}:data", near
            )
            regions.data_size = data_size
        return regions

    def write(
        self, prepared: list[_Prepared], regions: _Regions
    ) -> list[tuple[_Prepared, LoadImage]]:
        """Step 4b: each image's code and data, relocated for where they were mapped."""
        images: list[tuple[_Prepared, LoadImage]] = []
        c, d = regions.code, regions.data
        for p in prepared:
            img = p.plan.build(c, d)
            self.t.write(c, img.code)
            if img.data:
                self.t.write(d, img.data)
            images.append((p, img))
            c += p.plan.code_size
            d += p.plan.data_size
        checkpoint("apply:wrote-code")
        return images

    def record(
        self,
        manifest: Manifest,
        prepared: list[_Prepared],
        images: list[tuple[_Prepared, LoadImage]],
        regions: _Regions,
        existing: list[StateRecord],
    ) -> StateRecord:
        """Step 4c: the state record, in the journal and in the process (view and undo read
        it): every trampoline with its original bytes, hooks, what was loaded where."""
        self.hooks = _hook_addresses(manifest, images)
        functions: list[tuple[int, int, str]] = []
        c = regions.code
        for p in prepared:
            functions.extend(
                (c + off, c + off + s.size, s.name) for s, off in p.plan.code_layout if s.executable
            )
            c += p.plan.code_size
        record = StateRecord(
            id=manifest.id,
            description=manifest.description,
            sequence=max((r.sequence for r in existing), default=0) + 1,
            applied_at=time.time(),
            trampolines=[
                TrampolineRecord(
                    function=tr.function,
                    target=p.target_name,
                    address=tr.address,
                    original=tr.original.hex(),
                    jump=tr.jump.hex(),
                    replacement=tr.target,
                    busy_start=_busy(p.plan, tr)[0],
                    busy_end=_busy(p.plan, tr)[1],
                )
                for p, img in images
                for tr in img.trampolines
            ],
            code=(regions.code, regions.code + max(regions.code_size, 1)),
            data=(regions.data, regions.data + regions.data_size) if regions.data_size else (0, 0),
            hooks=self.hooks,
            targets=sorted({p.target_name for p in prepared}),
            tool_pid=os.getpid(),
            functions=functions,
        )
        _journal(self.pid, self.id, "recorded", record, self.t)
        blob = record.encode()
        self.state_addr = self._mmap(len(blob) + 4096, PROT_READ, f"{NAME_PREFIX}{self.id}", None)
        self.t.write(self.state_addr, blob)
        checkpoint("apply:wrote-state")
        self._record = record
        return record

    def pre_hooks(self) -> None:
        """Step 5: pre_apply hooks (a non-zero return refuses the update)."""
        _run_hooks(self.t, self.hooks.get("pre_apply", []), "pre_apply")

    def switch(self, *, retries: int, interval: float) -> PauseStats:
        """Step 6: the stop window -- no thread in replaced code, the apply hooks, the jumps.
        Busy -> resume and retry, then abort (fail_apply hooks; everything unmapped)."""
        from livesplice.process.stopwindow import CodeChanged, StopWindow

        assert self._record is not None
        record, t = self._record, self.t
        window = StopWindow(
            t,
            [(tr.busy_start, tr.busy_end, tr.function) for tr in record.trampolines],
            retries=retries,
            interval=interval,
        )
        apply_hooks = self.hooks.get("apply", [])
        try:
            stats = window.run(
                [(tr.address, bytes.fromhex(tr.jump)) for tr in record.trampolines],
                inside=(lambda: _run_hooks(t, apply_hooks, "apply")) if apply_hooks else None,
                expect=[bytes.fromhex(tr.original) for tr in record.trampolines],
            )
        except (CodeBusy, HookFailed, CodeChanged):
            _safe_hooks(t, self.hooks.get("fail_apply", []))
            raise
        # The jumps are in: from here on, nothing may unmap what they point to.
        self.mapped.clear()
        self.keep = True
        checkpoint("apply:after-stop")
        return stats

    def finish(self, prepared: list[_Prepared], stats: PauseStats) -> ApplyReport:
        """Step 7: the pause into the record, post_apply hooks (a failure is a warning: the
        change is in place), the report."""
        assert self._record is not None
        record = self._record
        record.pause_us = stats.pause_us
        self.t.write(self.state_addr, record.encode())
        _journal(self.pid, self.id, "recorded", record, self.t)
        warnings = _late_hooks(self.t, self.hooks.get("post_apply", []), "post_apply")
        self.report = ApplyReport(
            pid=self.pid,
            id=self.id,
            functions=[tr.function for tr in record.trampolines],
            pause_us=stats.pause_us,
            attempts=stats.attempts,
            threads=stats.threads,
            ran_out=stats.ran_out,
            staggered=stats.staggered,
            warnings=[w for p in prepared for w in p.warnings] + warnings,
            images=[p.identity for p in prepared],
        )
        return self.report


def _journal(
    pid: int,
    update_id: str,
    stage: journal.Stage,
    record: StateRecord | None,
    t: Tracee | None = None,
) -> None:
    """Write the journal entry; without it undo would have no authority, so do not go on.

    ``t``: the process is attached: its fsync must not keep the program's new threads
    waiting (:meth:`Tracee.serve_while`)."""
    try:
        if t is None:
            journal.write_entry(pid, update_id, stage, record)
        else:
            t.serve_while(lambda: journal.write_entry(pid, update_id, stage, record))
    except OSError as e:
        raise NoPermission(
            f"cannot write livesplice's journal in {run_dir()}: {e.strerror or e}",
            advice="run as root (the journal lives in /run/livesplice), or set "
            "LIVESPLICE_RUN_DIR to a private directory",
        ) from None


def _busy(plan: LoadPlan, tr: Trampoline) -> tuple[int, int]:
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


# ---------------------------------------------------------------- what is in a process

INCOMPLETE = "incomplete: NOT protecting (interrupted apply; run undo or apply again)"


@dataclass
class Present:
    """One update found in a process, and where each piece of knowledge about it comes from.

    The journal (root's own record) is the authority; the record inside the process is
    evidence, shown and cross-checked. Without a journal entry the target's record is all
    there is: view shows it as unverified, undo acts on it only with ``--from-target``.
    """

    id: str
    mapping: StateMapping | None  # what /proc/PID/maps shows under the update's name
    entry: journal.JournalEntry | None
    target_record: StateRecord | None  # decoded (strictly) from the process
    error: str = ""  # why the process's record is unusable

    @property
    def verified(self) -> bool:
        """Whether root's journal knows the update (not only the process's own record)."""
        return self.entry is not None

    @property
    def record(self) -> StateRecord | None:
        """What undo may act on: the journal's record, else the process's."""
        return self.entry.record if self.entry is not None else self.target_record

    def disagreement(self) -> str:
        """How the process's record differs from the journal's ("" when it does not)."""
        if self.entry is None or self.entry.record is None or self.mapping is None:
            return ""
        if self.target_record is None:
            return (
                "the record inside the process is " + (self.error or "missing")
                if self.mapping.record is not None
                else ""
            )
        j, t = self.entry.record, self.target_record
        if (j.trampolines, j.code, j.data, j.hooks) != (t.trampolines, t.code, t.data, t.hooks):
            return "the record inside the process differs from livesplice's journal"
        return ""


def updates_in(pid: int) -> list[Present]:
    """Every update in ``pid`` -- from the journal and from the process -- in stacking order."""
    entries = journal.entries_for(pid)
    found: dict[str, Present] = {}
    for rec, sm in read_records(pid):
        # no entry of its own: a fork child whose ancestor's entry vouches for it (inherit.py)
        entry = entries.pop(sm.id, None) or inherit.adopt(pid, sm.id)
        found[sm.id] = Present(sm.id, sm, entry, rec, sm.error)
    for uid, e in entries.items():
        # journal only: nothing of the update is mapped any more (an undo killed after
        # unmapping) or the process unmapped it; stale unless its jumps are still there
        found[uid] = Present(uid, None, e, None)
    return sorted(found.values(), key=lambda u: (u.record.sequence if u.record else 1 << 30, u.id))


def state_of(pid: int, u: Present, others: list[Present]) -> str:
    """The honest word for an update: ``applied`` only when every jump is in place."""
    rec = u.record
    if rec is None:
        if u.entry is not None or (
            u.mapping is not None and u.mapping.record is None and not u.error
        ):
            return INCOMPLETE
        return f"invalid: {u.error}"
    if rec.reverted:
        return "undone (memory kept: still referenced)"
    later = [o.record for o in others if o.record is not None and o.record.sequence > rec.sequence]
    status = trampoline_status(pid, rec, later)
    if status == "applied":
        return "applied"
    if u.mapping is None and status == "loaded":
        return "gone"  # nothing mapped, no jump: a finished undo whose entry was left
    return INCOMPLETE


# ---------------------------------------------------------------- undo


def check_record_against_update(rec: StateRecord, manifest: Manifest, pid: int) -> None:
    """Without the journal, a record read from the process is acted on only if the update
    the operator names (signature-checked by the CLI) vouches for every field undo uses.

    :raises NoPermission: the first field the update does not vouch for.
    """
    from livesplice.process.procmaps import read_maps

    def refuse(why: str) -> NoReturn:
        raise NoPermission(
            f"the record of update {rec.id} in process {pid} does not match the update file",
            details=[why],
            advice="this record was not written by livesplice for this update; "
            "do not act on it (restart the process to be rid of it)",
        )

    code = [
        (m.start, m.end)
        for m in read_maps(pid)
        if m.executable and m.path.startswith("/") and "/memfd:" not in m.path
    ]
    for tr in rec.trampolines:
        target = next((t for t in manifest.targets if t.name == tr.target), None)
        pre = next(
            (
                s
                for s in (target.sections if target else [])
                if s.role == "pre" and s.name == tr.function and s.executable
            ),
            None,
        )
        if pre is None:
            refuse(f"{tr.target}:{tr.function} is not a function the update replaces")
        original, jump = bytes.fromhex(tr.original), bytes.fromhex(tr.jump)
        wild = {o for r in pre.relocs for o in range(r.offset, r.offset + 4)}
        body = pre.bytes
        if len(original) > len(body) or any(
            i not in wild and original[i] != body[i] for i in range(len(original))
        ):
            refuse(f"original bytes of {tr.function} ({tr.original}) are not its pre code")
        want = (
            b"\xe9" + (tr.replacement - tr.address - 5).to_bytes(4, "little", signed=True)
            if -(1 << 31) <= tr.replacement - tr.address - 5 < 1 << 31
            else b""
        )
        if jump != want or len(original) != len(jump):
            refuse(f"the jump at {tr.address:#x} ({tr.jump}) does not go to the replacement")
        if not any(lo <= tr.address and tr.address + len(jump) <= hi for lo, hi in code):
            refuse(f"{tr.function} at {tr.address:#x} is not in the program's code")
    names = {(h.kind, h.function) for h in manifest.hooks}
    for kind, entries in rec.hooks.items():
        for name, _addr in entries:
            if (kind, name) not in names:
                refuse(f"{kind} hook {name} is not a hook of the update")


@dataclass
class UndoReport:
    """What undo did to one process: the pause it cost and the stop figures, as in ApplyReport."""

    pid: int
    id: str
    pause_us: float
    warnings: list[str] = field(default_factory=list)
    stopped_us: float = 0.0  # these four as in ApplyReport
    threads_stopped_max: int = 0
    others_stopped_us: float = 0.0
    host_stopped_us: float = 0.0
    staggered: int = 0


def _note_stops(report: ApplyReport | UndoReport, t: Tracee) -> None:
    """What the target felt, from the Tracee's accounting (after detach); the window is a
    stop of every thread, so no figure is below it."""
    report.stopped_us = max(t.stopped_max_us, report.pause_us)
    report.others_stopped_us = max(t.others_stopped_max_us, report.pause_us)
    report.host_stopped_us = t.host_stopped_max_us
    report.threads_stopped_max = t.threads_stopped_max


def stop_figures(report: ApplyReport | UndoReport) -> dict[str, Any]:
    """The stop figures of a report for --json."""
    return {
        "pause_us": round(report.pause_us, 1),
        "stopped_us": round(report.stopped_us, 1),
        "others_stopped_us": round(report.others_stopped_us, 1),
        "host_stopped_us": round(report.host_stopped_us, 1),
        "threads_stopped_max": report.threads_stopped_max,
        "staggered": report.staggered,
    }


def stop_words(report: ApplyReport | UndoReport) -> str:
    """The stop figures of a report in words."""
    lag = (
        f" (the others ran on while a thread waited {report.staggered} time(s) for a CPU)"
        if report.staggered
        else ""
    )
    return (
        f"other threads held stopped up to {report.others_stopped_us:.0f} us in all{lag}, the "
        f"thread hosting livesplice's calls up to {report.host_stopped_us:.0f} us"
    )


def undo_in_process(
    update_id: str,
    pid: int,
    *,
    retries: int = 5,
    interval: float = 1.0,
    from_target: Manifest | None = None,
) -> UndoReport:
    """Restore the original bytes of every trampoline, then unmap the update.

    What is written and called comes from the journal. ``from_target``: no journal entry
    (``/run`` was cleared): act on the record inside the process after it passed the strict
    checks of :meth:`StateRecord.decode` and :meth:`StateRecord.check_mappings` AND matches
    this (signature-checked) update: same id, every trampoline's original bytes are the start
    of that function's pre code, every jump goes to the recorded replacement, every hook is
    one the update has (:func:`check_record_against_update`).
    """
    check_process(pid)
    with process_lock(pid), _exit_wins(pid, "undo"):
        return _undo_locked(
            update_id, pid, retries=retries, interval=interval, from_target=from_target
        )


def _undo_locked(
    update_id: str, pid: int, *, retries: int, interval: float, from_target: Manifest | None
) -> UndoReport:
    """Undo as a list of steps: find and trust the record; an apply interrupted before it
    recorded anything is only unmapped; refuse if a later update is stacked on this one;
    then, stopped once: pre_reverse hooks, the original bytes back (stop window), post_reverse
    hooks, and the memory released unless the program still points into it."""
    present = updates_in(pid)
    report = UndoReport(pid, update_id, 0.0)
    u = _trusted_entry(present, update_id, pid, from_target, report)
    rec = u.record
    if rec is None:
        _unmap_unrecorded(u, update_id, pid)
        return report
    _refuse_stacked_on(rec, present, update_id)
    writes = _restoring_writes(rec, pid)
    if u.mapping is None and not writes:
        journal.remove_entry(pid, update_id)  # nothing mapped, nothing written: stale entry
        raise NotApplied(f"update {update_id} is not applied to process {pid}")
    with _Unsplice(pid, update_id, rec, u.mapping, report) as run:
        run.pre_hooks()
        run.switch(writes, retries=retries, interval=interval)
        run.post_hooks()
        run.release()
    return report


def _trusted_entry(
    present: list[Present],
    update_id: str,
    pid: int,
    from_target: Manifest | None,
    report: UndoReport,
) -> Present:
    """The update's entry, if livesplice may act on it: journal-backed, or (``from_target``)
    a record inside the process that the signed update vouches for."""
    u = next((x for x in present if x.id == update_id), None)
    if u is None:
        raise NotApplied(f"update {update_id} is not applied to process {pid}")
    if not u.verified and from_target is None:
        raise NoPermission(
            f"update {update_id} in process {pid} is not in livesplice's journal "
            f"({run_dir()}/journal): the record inside the process is not trusted",
            details=[f"from the process: {u.error}"] if u.error else [],
            advice="if /run was cleared after a real apply, run undo again with "
            "--from-target UPDATE (the signed update file): the record is then checked "
            "against the process's mappings and the update's pre code",
        )
    if not u.verified and from_target is not None:
        if from_target.id != update_id:
            raise UsageError(f"--from-target names update {from_target.id}, not {update_id}")
        if u.target_record is not None:
            check_record_against_update(u.target_record, from_target, pid)
    if disagree := u.disagreement():
        report.warnings.append(f"{disagree}; acting on the journal")
    if u.record is None and u.entry is None and (u.mapping is None or u.mapping.record is not None):
        raise NotApplied(
            f"update {update_id} in process {pid} has an unusable state record: {u.error}",
            advice="the process may be corrupted; restart it to be safe",
        )
    return u


def _unmap_unrecorded(u: Present, update_id: str, pid: int) -> None:
    """An apply interrupted before it recorded anything: trampolines are only ever written
    after the record, so nothing points into these mappings. Unmap them."""
    from livesplice.process.ptrace import Tracee
    from livesplice.process.remote import remote_munmap_all

    sm = u.mapping
    with Tracee(pid) as t:
        ranges = [r for r in ((sm.code, sm.data, sm.record) if sm else ()) if r]
        remote_munmap_all(t, [(a, b - a) for a, b in ranges])
        close_stale_descriptors(t, update_id)
    journal.remove_entry(pid, update_id)


def _refuse_stacked_on(rec: StateRecord, present: list[Present], update_id: str) -> None:
    later = [x.record for x in present if x.record is not None and x.record.sequence > rec.sequence]
    mine_addrs = {tr.address for tr in rec.trampolines}
    blocking = [r.id for r in later if mine_addrs & {tr.address for tr in r.trampolines}]
    if blocking:
        raise UsageError(
            f"update {update_id} has later updates stacked on it: {', '.join(blocking)}",
            advice="undo those first (undo in reverse order of apply)",
        )


def _restoring_writes(rec: StateRecord, pid: int) -> list[tuple[int, bytes]]:
    """The original bytes to put back where our jump still is; refuse if someone else
    changed an entry since (never overwrite code livesplice did not write)."""
    from livesplice.process.ptrace import process_alive, process_dying
    from livesplice.process.state import read_memory

    writes: list[tuple[int, bytes]] = []
    for tr in rec.trampolines:
        try:
            now = read_memory(pid, tr.address, len(bytes.fromhex(tr.jump))).hex()
        except OSError:
            now = ""
        if not now and (not process_alive(pid) or process_dying(pid)):
            # a process exiting while it is read has no code left to check: gone, not
            # "changed by someone else" (undo --all met a fork child exiting: BAD_INPUT)
            raise TargetGone(f"process {pid} exited")
        if now == tr.jump:
            writes.append((tr.address, bytes.fromhex(tr.original)))
        elif now != tr.original:
            raise UsageError(
                f"the entry of {tr.function} at {tr.address:#x} was changed by someone "
                "else since the update was applied",
                details=[f"expected {tr.jump} or {tr.original}, found {now or 'nothing'}"],
                advice="refusing to overwrite code livesplice did not write",
            )
    return writes


class _Unsplice:
    """One undo, from attaching to detaching (the stop figures counted at the end)."""

    def __init__(
        self,
        pid: int,
        update_id: str,
        rec: StateRecord,
        sm: StateMapping | None,
        report: UndoReport,
    ) -> None:
        self.pid, self.id, self.rec, self.sm, self.report = pid, update_id, rec, sm, report
        self.sps: list[int] = []  # every thread's stack pointer, read inside the window
        self.t: Tracee

    def __enter__(self) -> _Unsplice:
        from livesplice.process.ptrace import Tracee

        self.t = Tracee(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.t.detach()
        _note_stops(self.report, self.t)

    def pre_hooks(self) -> None:
        _run_hooks(self.t, self.rec.hooks.get("pre_reverse", []), "pre_reverse")

    def switch(self, writes: list[tuple[int, bytes]], *, retries: int, interval: float) -> None:
        """The stop window: no thread in the update's code, the reverse hooks, the original
        bytes back. Busy -> retry, then abort (fail_reverse hooks; the update stays)."""
        from livesplice.process.stopwindow import StopWindow

        rec, t = self.rec, self.t
        # the loaded functions, decoded as code; an old record without them: the whole
        # code mapping (conservatively)
        busy = [(lo, hi, f"{name} (update {self.id})") for lo, hi, name in rec.functions] or [
            (rec.code[0], rec.code[1], f"update {self.id} replacement code")
        ]
        window = StopWindow(t, busy, retries=retries, interval=interval)
        reverse_hooks = rec.hooks.get("reverse", [])

        def inside() -> None:
            # every thread's stack pointer for the pointer scan of release(), read while the
            # window holds them all (no second stop of the whole process for it)
            from livesplice.process.ptrace import REG_INDEX

            self.sps[:] = t.stopped_regs()[1][:, REG_INDEX["rsp"]].tolist()
            _run_hooks(t, reverse_hooks, "reverse")

        try:
            stats = window.run(
                writes,
                expect=[
                    bytes.fromhex(tr.jump)
                    for tr in rec.trampolines
                    if (tr.address, bytes.fromhex(tr.original)) in writes
                ],
                inside=inside,
            )
        except (CodeBusy, HookFailed):
            _safe_hooks(t, rec.hooks.get("fail_reverse", []))
            raise
        self.report.pause_us = stats.pause_us
        self.report.staggered = stats.staggered
        checkpoint("undo:after-stop")

    def post_hooks(self) -> None:
        """post_reverse hooks: a failure is a warning (the original code is back)."""
        self.report.warnings.extend(
            _late_hooks(self.t, self.rec.hooks.get("post_reverse", []), "post_reverse")
        )

    def release(self) -> None:
        """Unmap the update -- unless the program still holds pointers into it (a string
        the new code stored in a global, a callback it registered): unmapping would crash it
        later, so the memory stays, marked reverted; the jumps are gone all the same."""
        from livesplice.process.remote import remote_munmap_all

        rec, t = self.rec, self.t
        ours = [r for r in (rec.code, rec.data) if r[1] > r[0]]
        record_map = self.sm.record if self.sm else None
        held = t.serve_while(
            lambda: pointers_into(
                self.pid,
                ours,
                exclude=[*ours, *([record_map] if record_map else [])],
                stack_pointers=self.sps,
            )
        )
        if held is None or held:
            rec.reverted = True
            _journal(self.pid, self.id, "recorded", rec, t)
            blob = rec.encode()
            if record_map and len(blob) <= record_map[1] - record_map[0]:
                t.write(record_map[0], blob)
            why = (
                "the program's writable memory is too large to scan"
                if held is None
                else "the program still holds pointers into it, e.g. at "
                + ", ".join(f"{a:#x}" for a in held[:3])
            )
            self.report.warnings.append(f"undo kept update {self.id}'s memory mapped: {why}")
        else:
            ranges = [r for r in (rec.code, rec.data, record_map) if r and r[1] > r[0]]
            carried = inherit.update_memfds(self.pid, self.id)
            remote_munmap_all(t, [(a, b - a) for a, b in ranges])
            checkpoint("undo:unmapped")

            def forget() -> None:
                # children forked before the unmap still carry the update: they get their
                # own entries before this one, which vouched for them, goes
                inherit.adopt_descendants(self.pid, self.id, carried, rec)
                journal.remove_entry(self.pid, self.id)

            t.serve_while(forget)
        close_stale_descriptors(t, self.id)


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

    from livesplice.process.procmaps import read_maps

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
    """What is applied to ``pid``, from the journal, cross-checked with the process."""
    present = updates_in(pid)
    out: list[dict[str, Any]] = []
    for u in present:
        state = state_of(pid, u, present)
        if state == "gone":
            continue
        row: dict[str, Any] = {"pid": pid, "id": u.id, "state": state, "verified": u.verified}
        if not u.verified:
            row["note"] = "not in livesplice's journal: read from the process only"
        elif u.entry is not None and u.entry.inherited_from is not None:
            row["inherited_from"] = u.entry.inherited_from
            row["note"] = f"inherited by fork from pid {u.entry.inherited_from}"
        if disagree := u.disagreement():
            row["warning"] = disagree
        rec = u.record
        if rec is not None:
            row.update(
                description=rec.description,
                sequence=rec.sequence,
                functions=[tr.function for tr in rec.trampolines],
                targets=rec.targets,
                pause_us=rec.pause_us,
                applied_at=rec.applied_at,
            )
        out.append(row)
    return out


# ---------------------------------------------------------------- which processes


def target_processes(manifest: Manifest) -> list[int]:
    """Every other process running a target of ``manifest`` (``apply --all``).

    :raises NoMatch: when none does.
    """
    from livesplice.process.image import processes_running

    pids: set[int] = set()
    for t in manifest.targets:
        pids.update(processes_running(t.name, t.build_ids))
    pids.discard(os.getpid())
    if not pids:
        raise NoMatch(
            "no running process uses a target of this update: "
            + ", ".join(printable(t.name) for t in manifest.targets)
        )
    return sorted(pids)


def patched_pids() -> tuple[list[int], list[int]]:
    """(pids with a livesplice mapping or a journal entry, pids we could not inspect)."""
    from livesplice.process.procmaps import read_maps

    pids: set[int] = set()
    hidden: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if any(m.path.startswith(f"/memfd:{NAME_PREFIX}") for m in read_maps(int(entry))):
                pids.add(int(entry))
        except PermissionError:
            hidden.append(int(entry))
        except OSError:
            continue
    journal.prune()  # entries of processes that ended while patched
    try:
        for name in os.listdir(journal.journal_dir()):
            head = name.split("-", 1)[0]
            if head.isdigit() and Path(f"/proc/{head}").is_dir():
                pids.add(int(head))
    except OSError:
        pass
    return sorted(pids), sorted(hidden)


def view_rows(pids: list[int] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of every update, problems per process) for the given pids, or every patched
    process. Processes that exit during the scan are left out when no pid was named."""
    hidden: list[int] = []
    if pids is None:
        pids_, hidden = patched_pids()
        named = False
    else:
        pids_, named = pids, True
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for pid in pids_:
        start = journal.process_start(pid)
        try:
            check_process(pid)
            found = view_process(pid)
            if named or not exited(pid, start):
                rows.extend(found)  # one that exited while read (a fork child) is left out
        except TargetGone as e:
            if named:
                problems.append({"pid": pid, "abort": e.abort, "reason": e.reason})
        except LivespliceError as e:
            problems.append({"pid": pid, "abort": e.abort, "reason": e.reason})
    if hidden:
        problems.append(
            {
                "pids": hidden,
                "abort": "NO_PERMISSION",
                "reason": f"could not inspect {len(hidden)} process(es) of other "
                "users (run as root to see every patched process)",
            }
        )
    return rows, problems


def inherited_applied(pid: int, update_id: str) -> int | None:
    """The ancestor ``pid`` inherited ``update_id`` from by fork, when it is applied in
    ``pid`` (``apply --all`` leaves such a child alone: it already runs the update)."""
    present = updates_in(pid)
    u = next((x for x in present if x.id == update_id), None)
    if u is None or u.entry is None or u.entry.inherited_from is None:
        return None
    return u.entry.inherited_from if state_of(pid, u, present) == "applied" else None


def exited(pid: int, start: int | None) -> bool:
    """Whether the process that had ``start`` as its start time is gone (or a zombie): what
    ``--all`` calls "exited meanwhile" rather than a failure."""
    fields = procstat.pid_stat(pid)
    if start is None or len(fields) < 20 or int(fields[19]) != start:
        return True
    if fields[0] in (b"Z", b"X"):
        return True
    try:
        os.readlink(f"/proc/{pid}/exe")  # dropped early in exit, before the zombie state
    except FileNotFoundError:
        return True
    except OSError:
        pass
    return False


def processes_with(update_id: str) -> list[int]:
    """Pids in which ``update_id`` is present (journal or mapping)."""
    out = []
    for pid in patched_pids()[0]:
        with suppress(OSError):
            if any(u.id == update_id for u in updates_in(pid)):
                out.append(pid)
    return out
