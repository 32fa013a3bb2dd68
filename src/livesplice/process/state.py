"""The state record that lives inside a patched process.

"The target is the source of truth": what is applied to a process is read from the process
itself, never from a file on the host that can go stale. Each applied update owns three
mappings in the target, all backed by ``memfd_create`` so that their names show in
``/proc/PID/maps`` (the visible mark of a patched process)::

    /memfd:livesplice:ID (deleted)        r--  this record (JSON, below)
    /memfd:livesplice:ID:code (deleted)   r-x  replacement code, hooks, copied read-only data
    /memfd:livesplice:ID:data (deleted)   rw-  new data

The record is written BEFORE the stop window, with everything undo needs (every trampoline's
address, original bytes and jump bytes). If the tool dies at any point after that, ``view``
still tells the truth by comparing the bytes at each trampoline address with the record, and
``undo`` can restore the original bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MAGIC = b"LIVESPLICE-STATE"  # 16 bytes
HEADER = struct.Struct("<16sII")  # magic, version, length of the JSON that follows
VERSION = 1
NAME_PREFIX = "livesplice:"
# /proc/PID/maps shows a memfd mapping as "/memfd:<name> (deleted)"
_MAPS_NAME = re.compile(r"^/memfd:livesplice:([a-z0-9_-]+)(?::(code|data))?(?: \(deleted\))?$")

Status = Literal["applied", "loaded", "partial"]


@dataclass
class TrampolineRecord:
    function: str
    target: str  # target (image) name
    address: int  # running entry address of the replaced function
    original: str  # hex of the bytes that were there before
    jump: str  # hex of the jmp we write
    replacement: int  # address of the replacement function
    busy_start: int  # [busy_start, busy_end): the running code being replaced
    busy_end: int


@dataclass
class StateRecord:
    id: str
    description: str
    sequence: int  # stacking order inside this process (1 = first applied)
    applied_at: float  # unix time of the apply
    trampolines: list[TrampolineRecord]
    code: tuple[int, int]  # [start, end) of the code mapping
    data: tuple[int, int]  # [start, end) of the data mapping, (0, 0) if none
    # hook kind -> [(function name, address)] (undo runs the reverse hooks from here)
    hooks: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    pause_us: float | None = None
    tool_pid: int = 0
    # undone, but its memory stays mapped because the program still points into it
    reverted: bool = False
    # [start, end, name] of every function loaded (replacements, new functions, hooks):
    # undo's busy check decodes these as code; the rest of the code mapping is data
    functions: list[tuple[int, int, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return HEADER.pack(MAGIC, VERSION, len(payload)) + payload

    @classmethod
    def decode(cls, blob: bytes) -> StateRecord:
        magic, version, length = HEADER.unpack_from(blob)
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a livesplice state record")
        raw: dict[str, Any] = json.loads(blob[HEADER.size : HEADER.size + length])
        raw["trampolines"] = [TrampolineRecord(**t) for t in raw["trampolines"]]
        raw["code"] = tuple(raw["code"])
        raw["data"] = tuple(raw["data"])
        raw["functions"] = [(int(a), int(b), str(n)) for a, b, n in raw.get("functions", [])]
        hooks = raw.get("hooks", {})
        raw["hooks"] = {k: [(str(n), int(a)) for n, a in v] for k, v in hooks.items()}
        return cls(**raw)


@dataclass
class StateMapping:
    """Where one update's mappings are in a process (from /proc/PID/maps)."""

    id: str
    record: tuple[int, int] | None = None
    code: tuple[int, int] | None = None
    data: tuple[int, int] | None = None
    # memfd descriptors still open in the process (only after an interrupted apply)
    fds: list[int] = field(default_factory=list)


def update_mappings(pid: int) -> dict[str, StateMapping]:
    """Every livesplice mapping of a process, grouped by update id."""
    found: dict[str, StateMapping] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        m = _MAPS_NAME.match(parts[5])
        if not m:
            continue
        uid, kind = m.group(1), m.group(2)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        sm = found.setdefault(uid, StateMapping(uid))
        if kind == "code":
            sm.code = (lo, hi) if sm.code is None else (min(sm.code[0], lo), max(sm.code[1], hi))
        elif kind == "data":
            sm.data = (lo, hi) if sm.data is None else (min(sm.data[0], lo), max(sm.data[1], hi))
        else:
            sm.record = (lo, hi)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = _MAPS_NAME.match(link)
        if m:
            found.setdefault(m.group(1), StateMapping(m.group(1))).fds.append(int(fd))
    return found


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Read target memory without attaching (needs ptrace access: root or same user)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def read_records(pid: int) -> list[tuple[StateRecord | None, StateMapping]]:
    """Every update present in the process, in stacking order; None: unreadable record."""
    out: list[tuple[StateRecord | None, StateMapping]] = []
    for sm in update_mappings(pid).values():
        rec: StateRecord | None = None
        if sm.record is not None:
            try:
                blob = read_memory(pid, sm.record[0], sm.record[1] - sm.record[0])
                rec = StateRecord.decode(blob)
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                rec = None
        out.append((rec, sm))
    out.sort(key=lambda p: (p[0].sequence if p[0] else 1 << 30, p[1].id))
    return out


def trampoline_status(pid: int, rec: StateRecord, later: list[StateRecord]) -> Status:
    """Compare the bytes at every trampoline address with the record.

    A trampoline whose bytes equal our jump is in place. One whose bytes are the jump of a later
    update that was stacked on top of ours (its recorded original equals our jump) is
    superseded but still ours underneath.
    """
    present = 0
    for tr in rec.trampolines:
        now = read_memory(pid, tr.address, len(bytes.fromhex(tr.jump))).hex()
        expected = tr.jump
        for r in sorted(later, key=lambda r: r.sequence):
            for t in r.trampolines:
                if t.address == tr.address and t.original == expected:
                    expected = t.jump
        if now == expected:
            present += 1
    if present == len(rec.trampolines) and present > 0:
        return "applied"
    if present == 0:
        return "loaded"
    return "partial"
