"""The root-owned journal of applies: the authority for view and undo.

A patched process carries a record of each update (process/state.py), but that memory belongs
to whoever owns the process: any local user can map a file named ``/memfd:livesplice:ID`` in
their own process and fill it with anything. So what undo writes and calls comes from here --
one file per (process, update) in a directory only the tool's user can write
(``/run/livesplice/journal`` for root) -- and the record inside the target is evidence that is
cross-checked and shown, never an instruction.

Entries are keyed by pid *and* the process's start time (field 22 of ``/proc/PID/stat``, in
clock ticks since boot), so a recycled pid never matches an old entry. Each entry is written
atomically (temporary file, fsync, rename), opened with ``O_NOFOLLOW`` and accepted only when
owned by the tool's own user, so a planted symlink or a file of another user is ignored.

Stages: ``mapping`` (apply has started to map memory into the process; no record yet -- undo
may unmap this update's mappings), ``recorded`` (the full record: trampolines with original
bytes, hooks, mappings).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from livesplice.private import PrivateFileError, private_dir, read_private, write_private
from livesplice.process.procstat import pid_stat
from livesplice.process.state import BadStateRecord, StateRecord
from livesplice.update.format import ID_PATTERN

Stage = Literal["mapping", "recorded"]
ENTRY_MAX = 2 << 20  # bytes; a real entry is a few KiB


def run_dir() -> Path:
    """Where locks and the journal live: ``$LIVESPLICE_RUN_DIR``, else ``/run/livesplice``
    for root and ``$XDG_RUNTIME_DIR/livesplice`` (or ``/tmp/livesplice-UID``) for others."""
    env = os.environ.get("LIVESPLICE_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/livesplice")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "livesplice" if xdg else Path(f"/tmp/livesplice-{os.geteuid()}")


JournalUnavailable = PrivateFileError  # the journal directory is missing or not ours


def journal_dir(*, create: bool = False) -> Path:
    """The root-private journal directory (under the run directory), refused if anyone else could
    write it."""
    base = private_dir(run_dir(), create=create)
    return private_dir(base / "journal", create=create)


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot; None if it is gone."""
    fields = pid_stat(pid)
    return int(fields[19]) if len(fields) > 19 else None  # field 22


@dataclass
class JournalEntry:
    """One apply as root recorded it: the process (pid and start time, so a reused pid is not
    mistaken for it), the update, how far apply got, and the record written into the process."""

    pid: int
    start: int
    id: str
    stage: Stage
    record: StateRecord | None
    # the ancestor whose entry vouched for this one: a fork child inherits the update's
    # mappings (process/inherit.py); None for a process livesplice patched itself
    inherited_from: int | None = None


def _name(pid: int, start: int, update_id: str) -> str:
    if not ID_PATTERN.fullmatch(update_id):
        raise ValueError(f"invalid update id {update_id!r}")
    return f"{pid}-{start}-{update_id}.json"


def write_entry(
    pid: int,
    update_id: str,
    stage: Stage,
    record: StateRecord | None,
    *,
    inherited_from: int | None = None,
    start: int | None = None,
) -> None:
    """Record (atomically) what apply did to ``pid``. Raises OSError if it cannot.

    ``start``: the start time the caller checked the process against (a fork child adopted
    by :mod:`livesplice.process.inherit`), so a pid recycled meanwhile is never recorded."""
    now = process_start(pid)
    if now is None or (start is not None and now != start):
        raise FileNotFoundError(f"process {pid} is gone")
    start = now
    d = journal_dir(create=True)
    name = _name(pid, start, update_id)
    body = json.dumps(
        {
            "pid": pid,
            "start": start,
            "id": update_id,
            "stage": stage,
            "record": asdict(record) if record else None,
            **({"inherited_from": inherited_from} if inherited_from is not None else {}),
        },
        sort_keys=True,
    )
    write_private(d / name, body.encode())


def _load(path: Path) -> JournalEntry:
    try:
        raw = json.loads(read_private(path, ENTRY_MAX))
    except PrivateFileError as e:
        raise BadStateRecord(str(e)) from None
    except (ValueError, RecursionError) as e:
        raise BadStateRecord(f"{path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("stage") not in ("mapping", "recorded"):
        raise BadStateRecord(f"{path}: not a journal entry")
    rec = None if raw.get("record") is None else StateRecord.from_json(raw["record"])
    if rec is None and raw["stage"] == "recorded":
        raise BadStateRecord(f"{path}: recorded entry without a record")
    parent = raw.get("inherited_from")
    return JournalEntry(
        int(raw["pid"]),
        int(raw["start"]),
        str(raw["id"]),
        raw["stage"],
        rec,
        parent if isinstance(parent, int) and not isinstance(parent, bool) else None,
    )


def read_entry(pid: int, update_id: str) -> JournalEntry | None:
    """The journal's entry for this update in this very process (start time checked)."""
    start = process_start(pid)
    if start is None:
        return None
    try:
        path = journal_dir() / _name(pid, start, update_id)
        return _load(path)
    except (OSError, ValueError):
        return None


def entries_for(pid: int) -> dict[str, JournalEntry]:
    """Every journal entry of this process (this start time), by update id."""
    start = process_start(pid)
    out: dict[str, JournalEntry] = {}
    if start is None:
        return out
    try:
        d = journal_dir()
        names = os.listdir(d)
    except OSError:
        return out
    prefix = f"{pid}-{start}-"
    for n in names:
        if n.startswith(prefix) and n.endswith(".json"):
            with contextlib.suppress(OSError, ValueError):
                e = _load(d / n)
                out[e.id] = e
    return out


def entries_of(update_id: str) -> list[JournalEntry]:
    """Every entry of ``update_id`` whose process still runs (start time checked)."""
    suffix = f"-{update_id}.json"
    try:
        d = journal_dir()
        names = [n for n in os.listdir(d) if n.endswith(suffix)]
    except OSError:
        return []
    out: list[JournalEntry] = []
    for n in names:
        with contextlib.suppress(OSError, ValueError):
            e = _load(d / n)
            if e.id == update_id and process_start(e.pid) == e.start:
                out.append(e)
    return out


def remove_entry(pid: int, update_id: str) -> None:
    """Forget the entry of ``update_id`` in ``pid`` (gone already, or the process is: nothing to
    do)."""
    start = process_start(pid)
    if start is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.unlink(journal_dir() / _name(pid, start, update_id))


def prune() -> int:
    """Delete entries of processes that no longer exist (or whose pid was recycled)."""
    try:
        d = journal_dir()
        names = os.listdir(d)
    except OSError:
        return 0
    gone = 0
    for n in names:
        parts = n.split("-", 2)
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue
        if process_start(int(parts[0])) != int(parts[1]):
            with contextlib.suppress(OSError):
                os.unlink(d / n)
                gone += 1
    return gone
