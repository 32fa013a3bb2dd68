"""upgrade / show / remove / uname: keep THIS machine patched from a repository.

``upgrade`` reads the repository's signed index, finds what runs here -- every process
mapping an executable or library whose GNU build-id an update targets, and the running
kernel -- accepts what applies into the store (:mod:`livesplice.service.store`) and applies
it in order. Targets are matched by build-id only: the service never guesses by file name
(``livesplice apply --pid`` does, with run-pre matching, for an operator who chose the
process). Every apply still runs the full engine: signature of the file, run-pre matching,
the stop window.

The engine is reached through :func:`apply_one`, :func:`undo_one` and :func:`apply_kernel`
only (one adapter), so changes to the engine's interfaces touch one place here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livesplice.errors import LivespliceError, TargetGone, UsageError
from livesplice.service.index import INDEX, INDEX_MAX, SIGNATURE, BadIndex, Index, IndexEntry
from livesplice.service.store import Accepted, Store

if TYPE_CHECKING:
    from livesplice.update.archive import UpdateFile

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------ what runs here


def running_build_ids(pids: Iterable[int] | None = None) -> dict[str, set[int]]:
    """GNU build-id -> pids that map an ELF file with it (executable or library).

    Files are read through ``/proc/PID/map_files`` (deleted-and-upgraded files and other
    mount namespaces included); build-ids are cached by device and inode.
    """
    from livesplice.process.image import gnu_build_id
    from livesplice.process.procmaps import read_maps

    out: dict[str, set[int]] = {}
    me = os.getpid()
    for pid in pids if pids is not None else _all_pids():
        if pid == me:
            continue
        try:
            maps = read_maps(pid)
        except OSError:
            continue
        seen: set[str] = set()
        for m in maps:
            if m.offset != 0 or not m.path.startswith("/") or m.path in seen:
                continue
            seen.add(m.path)
            bid = gnu_build_id(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}")
            if bid:
                out.setdefault(bid, set()).add(pid)
    return out


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def kernel_release() -> str:
    """The running kernel's release: which kernel updates of an index are for this machine."""
    return os.uname().release


# ------------------------------------------------------------------ the repository


@dataclass
class Repo:
    """A repository as opened: its URL, verified index and who signed it."""

    url: str
    index: Index
    signer: str


def open_repo(url: str, store: Store, trusted: list[Path] | None = None) -> Repo:
    """Fetch the index and its signature, verify, decode, and refuse a rollback."""
    from livesplice.service.fetch import fetch
    from livesplice.service.index import decode_index, verify_index

    data = fetch(url, INDEX, INDEX_MAX)
    sig = fetch(url, SIGNATURE, 4096)
    signer = verify_index(data, sig, trusted)
    index = decode_index(data)
    seen = store.serial(url)
    if index.serial < seen:
        raise BadIndex(
            f"the repository's index (serial {index.serial}) is older than one this machine "
            f"already saw (serial {seen}): an old index replayed would hide newer fixes",
            advice="check the repository or the mirror; nothing was changed",
        )
    if index.serial > seen:
        store.set_serial(url, index.serial)
    return Repo(url, index, signer)


def download(repo: Repo, entry: IndexEntry, store: Store) -> Path:
    """Fetch an update file into the cache, checked against the size and sha256 the signed index
    gives."""
    from livesplice.service.fetch import fetch_verified

    return fetch_verified(repo.url, entry.file, entry.sha256, entry.size, store.cache_dir())


def accepted_from(entry: IndexEntry, repo: str) -> Accepted:
    """The store's record of an index entry the machine accepts: what the agent and boot re-apply
    later without the repository."""
    return Accepted(
        id=entry.id,
        kind=entry.kind,
        build_ids=entry.build_ids,
        targets=tuple(t.name for t in entry.targets),
        order=entry.order,
        effective_version=entry.effective_version,
        cves=entry.cves,
        supersedes=entry.supersedes,
        description=entry.description,
        repo=repo,
        sha256=entry.sha256,
    )


# ------------------------------------------------------------------ the engine adapter

_LOADED: dict[tuple[str, int, int, int, str], UpdateFile] = {}


def load_accepted(store: Store, update_id: str, trusted: list[Path] | None) -> UpdateFile:
    """The accepted update, signature checked; kept while its file is unchanged (the agent
    applies the same few updates over and over)."""
    from livesplice.update.archive import load_update

    path = store.file(update_id)
    st = os.stat(path)
    key = (str(path), st.st_dev, st.st_ino, st.st_mtime_ns, repr(trusted))
    if key not in _LOADED:
        if len(_LOADED) > 256:
            _LOADED.clear()
        _LOADED[key] = load_update(path, trusted)
    return _LOADED[key]


def process_build_ids(accepted: list[Accepted]) -> set[str]:
    """Build-ids of the accepted process updates' targets."""
    return {b for a in accepted if a.kind == "process" for b in a.build_ids}


def is_applied(pid: int, update_id: str) -> bool:
    """Whether ``update_id`` is applied to ``pid`` as the root-owned journal says (recorded and
    not reverted): the journal, not the process, is trusted -- a fork child's through the
    entry of the ancestor it inherited the update from (process/inherit.py)."""
    from livesplice.process import inherit, journal

    e = journal.read_entry(pid, update_id) or inherit.adopt(pid, update_id)
    return (
        e is not None and e.record is not None and not e.record.reverted and e.stage == "recorded"
    )


def apply_one(store: Store, acc: Accepted, pid: int, trusted: list[Path] | None) -> dict[str, Any]:
    """Apply one accepted update to one process, under the crash guard."""
    from livesplice.process.apply import apply_to_process, stop_figures
    from livesplice.process.journal import process_start

    start = process_start(pid)
    key = f"{pid}:{start}"
    update = load_accepted(store, acc.id, trusted)
    store.begin(acc.id, key)
    try:
        rep = apply_to_process(update.manifest, pid)
    except LivespliceError as e:
        if isinstance(e, TargetGone) and e.crash_signal:
            # crash guard: never again automatically (the inflight mark stays as evidence)
            store.hold(
                acc.id,
                f"process {pid} crashed (signal {e.crash_signal}) while it was being patched",
            )
            return {
                "pid": pid,
                "id": acc.id,
                "status": "held",
                "abort": e.abort,
                "reason": e.reason,
                "details": e.details,
            }
        store.done(acc.id, key)  # refused or failed cleanly: the process survived it
        return {"pid": pid, "id": acc.id, "status": "failed", "abort": e.abort, "reason": e.reason}
    store.done(acc.id, key)
    return {
        "pid": pid,
        "id": acc.id,
        "status": "applied",
        "functions": rep.functions,
        **stop_figures(rep),
    }


def undo_one(update_id: str, pid: int) -> dict[str, Any]:
    """Undo ``update_id`` in ``pid``, as a result row (a failure is a row too, so one process
    does not stop the others)."""
    from livesplice.process.apply import undo_in_process

    try:
        rep = undo_in_process(update_id, pid)
    except LivespliceError as e:
        return {
            "pid": pid,
            "id": update_id,
            "status": "failed",
            "abort": e.abort,
            "reason": e.reason,
        }
    return {"pid": pid, "id": update_id, "status": "undone", "pause_us": round(rep.pause_us, 1)}


def kernel_applied(update_id: str) -> bool:
    """Whether the kernel update is loaded (imported lazily: most machines never touch the kernel
    target)."""
    from livesplice.kernel.target import is_applied_to_kernel

    return is_applied_to_kernel(update_id)


def apply_kernel(store: Store, acc: Accepted, trusted: list[Path] | None) -> dict[str, Any]:
    """Apply an accepted kernel update through the livepatch path (crash guard: the whole
    machine is the target -- a crash during the transition holds the update at boot)."""
    from livesplice.kernel.target import apply_to_kernel

    update = load_accepted(store, acc.id, trusted)
    store.begin(acc.id, "kernel")
    try:
        apply_to_kernel(update)
    except LivespliceError as e:
        store.done(acc.id, "kernel")
        return {
            "kernel": kernel_release(),
            "id": acc.id,
            "status": "failed",
            "abort": e.abort,
            "reason": e.reason,
        }
    store.done(acc.id, "kernel")
    return {"kernel": kernel_release(), "id": acc.id, "status": "applied"}


def undo_kernel(update_id: str) -> dict[str, Any]:
    """Undo a kernel update, as a result row (a failure is a row too)."""
    from livesplice.kernel import target

    try:
        target.undo_kernel(update_id)
    except LivespliceError as e:
        return {
            "kernel": kernel_release(),
            "id": update_id,
            "status": "failed",
            "abort": e.abort,
            "reason": e.reason,
        }
    return {"kernel": kernel_release(), "id": update_id, "status": "undone"}


# ------------------------------------------------------------------ planning


def relevant(accepted: list[Accepted], build_ids: set[str]) -> list[Accepted]:
    """The accepted process updates for a process mapping ``build_ids``, in order, without
    those a later accepted one supersedes."""
    mine = [a for a in accepted if a.kind == "process" and set(a.build_ids) & build_ids]
    superseded = {s for a in mine for s in a.supersedes}
    return [a for a in mine if a.id not in superseded]


def patch_process(
    store: Store,
    pid: int,
    build_ids: set[str],
    trusted: list[Path] | None,
    accepted: list[Accepted] | None = None,
    held: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Bring one process up to date with the accepted updates (the agent's step too):
    undo what a newer accepted update supersedes, apply what is missing, in order."""
    accepted = store.accepted() if accepted is None else accepted
    held = store.held() if held is None else held
    results: list[dict[str, Any]] = []
    wanted = relevant(accepted, build_ids)
    # what a cumulative update replaces comes out first, the latest first (stacked order)
    order = {a.id: a.order for a in accepted}
    replaced = {old for a in wanted for old in a.supersedes if is_applied(pid, old)}
    for old in sorted(replaced, key=lambda u: order.get(u, 0), reverse=True):
        results.append(undo_one(old, pid))
        if results[-1]["status"] != "undone":
            return results  # never stack a cumulative update on what it replaces
    for a in wanted:
        if is_applied(pid, a.id):
            continue
        if a.id in held:
            results.append({"pid": pid, "id": a.id, "status": "held", "reason": held[a.id]})
            continue
        results.append(apply_one(store, a, pid, trusted))
        if results[-1]["status"] != "applied":
            break  # a stacked update needs the ones before it
    return results


@dataclass
class Planned:
    """One index entry and what upgrade will do with it: the processes to apply it to, the
    kernel, or why not (``why``)."""

    entry: IndexEntry
    pids: list[int] = field(default_factory=list)
    kernel: bool = False
    why: str = ""  # empty: to apply


def plan(index: Index, channel: str, store: Store, running: dict[str, set[int]]) -> list[Planned]:
    """What an upgrade would do here: index entries of the channel whose targets run here
    (and are not yet applied everywhere), in order."""
    held = store.held()
    accepted = {a.id for a in store.accepted()}
    entries = index.in_channel(channel)
    superseded = {s for e in entries for s in e.supersedes}
    out: list[Planned] = []
    release = kernel_release()
    for e in entries:
        if e.kind == "kernel":
            if not any(t.release == release for t in e.targets):
                continue
            p = Planned(e, kernel=True)
            if kernel_applied(e.id):
                p.why = "already applied to the running kernel"
            out.append(p)
            continue
        # accepted even when no process runs its target now: the agent applies it to the
        # processes that start later (targets are recognised by build-id, never by name)
        pids = sorted({pid for b in e.build_ids for pid in running.get(b, set())})
        p = Planned(e, pids=[pid for pid in pids if not is_applied(pid, e.id)])
        if e.id in superseded:
            p.why = "superseded by a later update"
        elif e.id in held:
            p.why = f"held by the crash guard: {held[e.id]}"
        elif pids and not p.pids and e.id in accepted:
            p.why = "already applied to every process running its target"
        elif not pids and e.id in accepted:
            p.why = "accepted; no process runs its target now"
        out.append(p)
    return out


@dataclass
class UpgradeReport:
    """What upgrade planned and did, for the CLI and ``--json``."""

    repo: str
    signer: str
    serial: int
    planned: list[dict[str, Any]]
    results: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def failed(self) -> int:
        """Results that failed: upgrade's exit code says whether all went well."""
        return sum(r["status"] == "failed" for r in self.results)

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON document."""
        return asdict(self)


def upgrade(
    url: str,
    *,
    store: Store,
    channel: str = "stable",
    trusted: list[Path] | None = None,
    dry_run: bool = False,
    confirm: Callable[[list[Planned]], bool] | None = None,
    progress: Progress = _quiet,
) -> UpgradeReport:
    """Fetch, verify, plan, accept and apply (see the module docstring)."""
    progress(f"reading the index of {url}")
    repo = open_repo(url, store, trusted)
    progress(
        f"index serial {repo.index.serial}, signed by key {repo.signer}; "
        "looking for targets on this machine"
    )
    running = running_build_ids()
    todo = plan(repo.index, channel, store, running)
    report = UpgradeReport(
        url,
        repo.signer,
        repo.index.serial,
        [
            {
                "id": p.entry.id,
                "kind": p.entry.kind,
                "pids": p.pids,
                "kernel": p.kernel,
                "cves": list(p.entry.cves),
                "effective_version": p.entry.effective_version,
                "action": "skip" if p.why else "apply" if p.pids or p.kernel else "accept",
                "why": p.why,
            }
            for p in todo
        ],
        dry_run=dry_run,
    )
    go = [p for p in todo if not p.why]
    if dry_run or not go:
        return report
    if confirm is not None and not confirm(go):
        report.dry_run = True
        return report
    accepted_ids = {a.id for a in store.accepted()}
    for n, p in enumerate(go, 1):
        progress(f"[{n}/{len(go)}] {p.entry.id}: downloading and checking")
        path = download(repo, p.entry, store)
        from livesplice.update.archive import load_update

        load_update(path, trusted)  # its own signature, before it enters the store
        if p.entry.id not in accepted_ids:
            store.accept(path, accepted_from(p.entry, url))
    accepted = store.accepted()
    acc = {a.id: a for a in accepted}
    for p in go:
        if p.kernel:
            progress(f"{p.entry.id}: applying to the running kernel")
            report.results.append(apply_kernel(store, acc[p.entry.id], trusted))
    pids = sorted({pid for p in go for pid in p.pids})
    for pid in pids:
        progress(f"pid {pid}: applying")
        bids = {b for b, ps in running.items() if pid in ps}
        report.results.extend(patch_process(store, pid, bids, trusted, accepted))
    return report


# ------------------------------------------------------------------ show / remove / uname


def show(store: Store, repo: Repo | None = None, channel: str = "stable") -> dict[str, Any]:
    """Accepted updates with where each is applied; available ones from ``repo``."""
    running = running_build_ids()
    held = store.held()
    accepted = []
    for a in store.accepted():
        pids = sorted({pid for b in a.build_ids for pid in running.get(b, set())})
        row: dict[str, Any] = {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(a).items()},
            "held": held.get(a.id, ""),
        }
        if a.kind == "kernel":
            row["applied_to_kernel"] = kernel_applied(a.id)
        else:
            row["applied_to"] = [pid for pid in pids if is_applied(pid, a.id)]
            row["not_applied_to"] = [pid for pid in pids if not is_applied(pid, a.id)]
        accepted.append(row)
    out: dict[str, Any] = {"accepted": accepted, "effective_kernel": effective_kernel(store)}
    if repo is not None:
        ids = {a.id for a in store.accepted()}
        out["available"] = [
            {
                "id": p.entry.id,
                "kind": p.entry.kind,
                "pids": p.pids,
                "why": p.why,
                "cves": list(p.entry.cves),
                "effective_version": p.entry.effective_version,
            }
            for p in plan(repo.index, channel, store, running)
            if p.entry.id not in ids or p.pids
        ]
    return out


def remove(store: Store, ids: list[str]) -> list[dict[str, Any]]:
    """Undo accepted updates everywhere (latest first) and forget them."""
    from livesplice.process.apply import processes_with

    accepted = {a.id: a for a in store.accepted()}
    for uid in ids:
        if uid not in accepted:
            raise UsageError(
                f"update {uid} is not accepted on this machine", advice="see `livesplice show`"
            )
    results: list[dict[str, Any]] = []
    for uid in sorted(ids, key=lambda u: accepted[u].order, reverse=True):
        if accepted[uid].kind == "kernel":
            if kernel_applied(uid):
                results.append(undo_kernel(uid))
        else:
            for pid in processes_with(uid):
                results.append(undo_one(uid, pid))
        if not any(r["id"] == uid and r["status"] == "failed" for r in results):
            store.forget(uid)
    return results


def effective_kernel(store: Store) -> str:
    """The running kernel's release, or the effective-version label of the latest accepted
    kernel update applied to it (Uptrack's ``uptrack-uname -r``)."""
    label = ""
    for a in store.accepted():
        if a.kind == "kernel" and a.effective_version and kernel_applied(a.id):
            label = a.effective_version
    return label or kernel_release()
