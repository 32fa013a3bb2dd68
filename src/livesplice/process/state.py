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
import math
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Literal

from livesplice.update.format import HOOK_KINDS, ID_PATTERN

MAGIC = b"LIVESPLICE-STATE"  # 16 bytes
HEADER = struct.Struct("<16sII")  # magic, version, length of the JSON that follows
VERSION = 1
NAME_PREFIX = "livesplice:"
# /proc/PID/maps shows a memfd mapping as "/memfd:<name> (deleted)"
_MAPS_NAME = re.compile(r"^/memfd:livesplice:([a-z0-9_-]+)(?::(code|data))?(?: \(deleted\))?$")

Status = Literal["applied", "loaded", "partial"]


@dataclass
class TrampolineRecord:
    """One jump written into the process, with the bytes it replaced and the running code it
    stands for (the stack check's busy range)."""

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
    """The record an apply leaves inside the process: the update, its trampolines and its
    mappings. Evidence that travels with the process, cross-checked against the journal, never
    trusted alone."""

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
        """The record as the bytes written into the process: header (magic, version, length) and
        JSON."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return HEADER.pack(MAGIC, VERSION, len(payload)) + payload

    @classmethod
    def decode(cls, blob: bytes) -> StateRecord:
        """Parse a record read from a target, strictly.

        The bytes come from memory the process's owner controls (any local user can map a
        file named ``/memfd:livesplice:ID``): every field is checked for type, range and
        size before anything uses it.

        :raises BadStateRecord: with what is wrong.
        """
        if len(blob) < HEADER.size:
            raise BadStateRecord("shorter than the record header")
        magic, version, length = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise BadStateRecord("no livesplice state record magic")
        if version != VERSION:
            raise BadStateRecord(f"unknown record version {version}")
        if length > RECORD_MAX or HEADER.size + length > len(blob):
            raise BadStateRecord(f"record length {length} out of range")
        try:
            raw = json.loads(blob[HEADER.size : HEADER.size + length])
        except (ValueError, RecursionError) as e:
            raise BadStateRecord(f"record is not JSON: {e}") from None
        return cls.from_json(raw)

    @classmethod
    def from_json(cls, raw: object) -> StateRecord:
        """Build a record from decoded JSON, checking every field (see :meth:`decode`)."""
        r = _Fields(raw, "record")
        trampolines = [
            TrampolineRecord(
                function=t.text("function"),
                target=t.text("target"),
                address=t.address("address"),
                original=t.hexbytes("original"),
                jump=t.hexbytes("jump"),
                replacement=t.address("replacement"),
                busy_start=t.address("busy_start"),
                busy_end=t.address("busy_end"),
            )
            for t in r.objects("trampolines", MAX_TRAMPOLINES)
        ]
        hooks_raw = r.mapping("hooks")
        hooks: dict[str, list[tuple[str, int]]] = {}
        for kind, entries in hooks_raw.items():
            if kind not in HOOK_KINDS:
                raise BadStateRecord(f"unknown hook kind {kind!r}")
            if not isinstance(entries, list) or len(entries) > MAX_HOOKS:
                raise BadStateRecord(f"hooks[{kind}]: not a list of at most {MAX_HOOKS}")
            hooks[kind] = [_pair_name_addr(e, f"hooks[{kind}]") for e in entries]
        functions = []
        for f in r.seq("functions", MAX_FUNCTIONS):
            if not (isinstance(f, list) and len(f) == 3):
                raise BadStateRecord("functions: entries must be [start, end, name]")
            functions.append(
                (_addr(f[0], "functions"), _addr(f[1], "functions"), _text(f[2], "functions"))
            )
        pause = r.get("pause_us", None)
        if pause is not None and not (isinstance(pause, int | float) and _is_number(pause)):
            raise BadStateRecord("pause_us: not a number")
        rec = cls(
            id=r.text("id"),
            description=r.text("description", MAX_DESCRIPTION),
            sequence=r.integer("sequence", 1, 1 << 20),
            applied_at=r.number("applied_at"),
            trampolines=trampolines,
            code=r.span("code"),
            data=r.span("data"),
            hooks=hooks,
            targets=[_text(x, "targets") for x in r.seq("targets", MAX_TARGETS)],
            pause_us=None if not isinstance(pause, int | float) else float(pause),
            tool_pid=r.integer("tool_pid", 0, 1 << 22),
            reverted=r.boolean("reverted"),
            functions=functions,
        )
        if not ID_PATTERN.fullmatch(rec.id):
            raise BadStateRecord(f"invalid update id {rec.id!r}")
        return rec

    def check_mappings(self, sm: StateMapping) -> None:
        """Cross-check the record with where the process really has this update's mappings.

        A record may only point into the ``code`` mapping that ``/proc/PID/maps`` shows for
        its own id: replacement code, hooks and loaded functions outside it are lies.

        :raises BadStateRecord: the first inconsistency.
        """
        if sm.id != self.id:
            raise BadStateRecord(f"record of {self.id!r} in the mapping of {sm.id!r}")
        if sm.code is None:
            raise BadStateRecord("no code mapping for this update")
        lo, hi = sm.code

        def inside(addr: int, what: str) -> None:
            if not lo <= addr < hi:
                raise BadStateRecord(
                    f"{what} at {addr:#x} is outside the update's code mapping [{lo:#x}, {hi:#x})"
                )

        if not (self.code[0] >= lo and self.code[1] <= hi and self.code[0] < self.code[1]):
            raise BadStateRecord("recorded code range differs from the code mapping")
        for t in self.trampolines:
            inside(t.replacement, f"replacement of {t.function}")
            if len(t.jump) != len(t.original) or not t.jump:
                raise BadStateRecord(
                    f"trampoline of {t.function}: jump and original differ in size"
                )
        for kind, entries in self.hooks.items():
            for name, addr in entries:
                inside(addr, f"{kind} hook {name}")
        for start, end, name in self.functions:
            inside(start, f"function {name}")
            if not start < end <= hi:
                raise BadStateRecord(f"function {name}: bad extent")


class BadStateRecord(ValueError):
    """A state record read from a target (or the journal) is malformed or inconsistent."""


RECORD_MAX = 1 << 20  # bytes of JSON a record may have (a real one is a few KiB)
MAX_TRAMPOLINES = 4096
MAX_FUNCTIONS = 8192
MAX_HOOKS = 16  # per kind
MAX_TARGETS = 64
MAX_DESCRIPTION = 4096
MAX_TEXT = 512
USER_ADDR_END = 1 << 47  # x86-64 user space (4-level paging; 5-level: 1 << 56)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _addr(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < USER_ADDR_END:
        raise BadStateRecord(f"{what}: not a user-space address: {v!r:.40}")
    return v


def _text(v: object, what: str, cap: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > cap:
        raise BadStateRecord(f"{what}: not a string of at most {cap} characters")
    return v


def _pair_name_addr(v: object, what: str) -> tuple[str, int]:
    if not (isinstance(v, list) and len(v) == 2):
        raise BadStateRecord(f"{what}: entries must be [name, address]")
    return _text(v[0], what), _addr(v[1], what)


class _Fields:
    """Typed access to one JSON object; every getter raises BadStateRecord on a wrong type."""

    def __init__(self, raw: object, what: str) -> None:
        if not isinstance(raw, dict):
            raise BadStateRecord(f"{what}: not an object")
        self.raw: dict[str, object] = raw
        self.what = what

    def get(self, key: str, default: object = ...) -> object:
        if key in self.raw:
            return self.raw[key]
        if default is ...:
            raise BadStateRecord(f"{self.what}: missing {key!r}")
        return default

    def text(self, key: str, cap: int = MAX_TEXT) -> str:
        return _text(self.get(key), f"{self.what}.{key}", cap)

    def address(self, key: str) -> int:
        return _addr(self.get(key), f"{self.what}.{key}")

    def integer(self, key: str, lo: int, hi: int) -> int:
        v = self.get(key, lo)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise BadStateRecord(f"{self.what}.{key}: not an integer in [{lo}, {hi}]")
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if not isinstance(v, int | float) or not _is_number(v):
            raise BadStateRecord(f"{self.what}.{key}: not a number")
        return float(v)

    def boolean(self, key: str) -> bool:
        v = self.get(key, False)
        if not isinstance(v, bool):
            raise BadStateRecord(f"{self.what}.{key}: not true/false")
        return v

    def hexbytes(self, key: str) -> str:
        v = self.text(key, 64)
        if len(v) % 2 or not re.fullmatch(r"[0-9a-f]*", v):
            raise BadStateRecord(f"{self.what}.{key}: not lowercase hex bytes")
        return v

    def span(self, key: str) -> tuple[int, int]:
        v = self.get(key)
        if not (isinstance(v, list) and len(v) == 2):
            raise BadStateRecord(f"{self.what}.{key}: not [start, end]")
        lo, hi = _addr(v[0], key), _addr(v[1], key)
        if hi < lo:
            raise BadStateRecord(f"{self.what}.{key}: end before start")
        return lo, hi

    def seq(self, key: str, cap: int) -> list[object]:
        v = self.get(key, [])
        if not isinstance(v, list) or len(v) > cap:
            raise BadStateRecord(f"{self.what}.{key}: not a list of at most {cap}")
        return v

    def objects(self, key: str, cap: int) -> list[_Fields]:
        return [_Fields(x, f"{self.what}.{key}[{i}]") for i, x in enumerate(self.seq(key, cap))]

    def mapping(self, key: str) -> dict[str, object]:
        v = self.get(key, {})
        if not isinstance(v, dict):
            raise BadStateRecord(f"{self.what}.{key}: not an object")
        return v


@dataclass
class StateMapping:
    """Where one update's mappings are in a process (from /proc/PID/maps)."""

    id: str
    record: tuple[int, int] | None = None
    code: tuple[int, int] | None = None
    data: tuple[int, int] | None = None
    # memfd descriptors still open in the process (only after an interrupted apply)
    fds: list[int] = field(default_factory=list)
    # why the record could not be used (unreadable, malformed, inconsistent); "" when fine
    error: str = ""


def update_mappings(pid: int) -> dict[str, StateMapping]:
    """Every livesplice mapping of a process, grouped by update id."""
    from livesplice.process.procmaps import read_maps

    found: dict[str, StateMapping] = {}
    try:
        maps = read_maps(pid)
    except FileNotFoundError:
        return found
    for mapping in maps:
        m = _MAPS_NAME.match(mapping.path)
        if not m:
            continue
        uid, kind = m.group(1), m.group(2)
        lo, hi = mapping.start, mapping.end
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
    """Every update present in the process, in stacking order.

    None: no usable record; ``StateMapping.error`` says why (none mapped yet, unreadable,
    malformed, or pointing outside its own mappings -- see :meth:`StateRecord.decode`).
    """
    out: list[tuple[StateRecord | None, StateMapping]] = []
    for sm in update_mappings(pid).values():
        rec: StateRecord | None = None
        if sm.record is not None:
            try:
                size = min(sm.record[1] - sm.record[0], HEADER.size + RECORD_MAX)
                rec = StateRecord.decode(read_memory(pid, sm.record[0], size))
                rec.check_mappings(sm)
            except BadStateRecord as e:
                rec, sm.error = None, str(e)
            except OSError as e:
                rec, sm.error = None, f"unreadable: {e.strerror or e}"
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
        try:
            now = read_memory(pid, tr.address, len(bytes.fromhex(tr.jump))).hex()
        except OSError:
            continue  # nothing readable there: not our jump
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
