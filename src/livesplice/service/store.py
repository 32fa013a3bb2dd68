"""The machine's store of accepted updates: what stays applied across restarts and reboots.

``upgrade`` accepts updates from a repository into the store; the agent re-applies them to
processes that start later (and kernel updates at boot) from the store alone, with no
network. Layout, under ``$LIVESPLICE_STATE_DIR`` or ``/var/lib/livesplice`` (root only,
see :mod:`livesplice.private`)::

    accepted.json          the accepted updates, in apply order (ids, targets, labels)
    updates/ID.update      a copy of each accepted update file (signature inside: checked
                           again every time it is applied)
    inflight/ID@TARGET     crash guard: written before an apply starts, removed when it ends
    held.json              updates the crash guard holds back: never applied automatically
    repo/serial            the highest repository index serial seen (rollback protection)
    cache/                 downloaded files by SHA-256

Crash guard (as KernelCare and Canonical Livepatch do for kernels): an apply that never
ended -- the target crashed during it, or the machine, or the agent -- leaves its ``inflight``
entry behind. The next agent start finds it and holds the update back: it is not applied
automatically again until an operator says so (``livesplice upgrade --release ID``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from livesplice.errors import UsageError
from livesplice.private import PrivateFileError, private_dir, read_private, write_private
from livesplice.update.format import check_update_id

STATE_MAX = 4 << 20
Kind = Literal["process", "kernel"]
_TARGET_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


def state_dir() -> Path:
    """Where the machine's store lives: LIVESPLICE_STATE_DIR, else /var/lib/livesplice (kept
    across reboots: boot re-applies from it)."""
    return Path(os.environ.get("LIVESPLICE_STATE_DIR", "/var/lib/livesplice"))


@dataclass(frozen=True)
class Accepted:
    """One accepted update."""

    id: str
    kind: Kind
    build_ids: tuple[str, ...]  # targets' GNU build-ids (kernel: "RELEASE:BUILDID")
    targets: tuple[str, ...]  # target names, for people
    order: int  # position in the repository's order (stacked updates apply in order)
    effective_version: str = ""
    cves: tuple[str, ...] = ()
    supersedes: tuple[str, ...] = ()
    description: str = ""
    repo: str = ""  # where it came from
    sha256: str = ""

    @classmethod
    def from_json(cls, raw: Any) -> Accepted:
        """Strict: the store is root's, but a damaged file must not crash the agent."""
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        check_update_id(str(raw.get("id", "")))
        if raw.get("kind") not in ("process", "kernel"):
            raise ValueError("bad kind")
        tuples = ("build_ids", "targets", "cves", "supersedes")
        for k in tuples:
            if not isinstance(raw.get(k, []), list) or not all(
                isinstance(x, str) and len(x) <= 256 for x in raw.get(k, [])
            ):
                raise ValueError(f"bad {k}")
        if not isinstance(raw.get("order"), int) or isinstance(raw.get("order"), bool):
            raise ValueError("bad order")
        known = {f for f in cls.__dataclass_fields__}
        if set(raw) - known:
            raise ValueError(f"unknown fields {sorted(set(raw) - known)}")
        vals = {k: (tuple(v) if k in tuples else v) for k, v in raw.items()}
        for k in ("effective_version", "description", "repo", "sha256"):
            if not isinstance(vals.get(k, ""), str):
                raise ValueError(f"bad {k}")
        return cls(**vals)  # type: ignore[arg-type]  # each field checked above


class Store:
    """The store (see the module docstring). Every method re-reads the files: the CLI and
    the agent may both use it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()

    # -------------------------------------------------------------- files

    def _dir(self, *parts: str, create: bool = True) -> Path:
        d = private_dir(self.root, create=create)
        for p in parts:
            d = private_dir(d / p, create=create)
        return d

    def private_path(self, name: str) -> Path:
        """Where the store keeps a root-only file of its own (its directory made private)."""
        return self._dir() / name

    def _read_json(self, name: str, default: Any) -> Any:
        try:
            raw = read_private(self._dir(create=False) / name, STATE_MAX)
        except FileNotFoundError:
            return default
        except PrivateFileError as e:
            if not self.root.exists():
                return default
            raise UsageError(f"the livesplice store is not usable: {e}") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise UsageError(f"the livesplice store's {name} is damaged ({e})") from None

    def _write_json(self, name: str, value: Any) -> None:
        data = json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"
        write_private(self._dir() / name, data)

    # -------------------------------------------------------------- accepted updates

    def accepted(self) -> list[Accepted]:
        """The accepted updates, in apply order."""
        raw = self._read_json("accepted.json", [])
        if not isinstance(raw, list):
            raise UsageError("the livesplice store's accepted.json is damaged")
        out = []
        for item in raw:
            try:
                out.append(Accepted.from_json(item))
            except (ValueError, TypeError) as e:
                raise UsageError(f"the livesplice store's accepted.json is damaged ({e})") from None
        return sorted(out, key=lambda a: (a.order, a.id))

    def file(self, update_id: str) -> Path:
        """The stored update file of ``update_id`` (the id is checked: it becomes a file name)."""
        check_update_id(update_id)
        return self.root / "updates" / f"{update_id}.update"

    def accept(self, update_file: Path, entry: Accepted) -> Accepted:
        """Keep a copy of the (already verified) update file and list it."""
        check_update_id(entry.id)
        d = self._dir("updates")
        tmp = d / f".{entry.id}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        shutil.copyfile(update_file, tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, d / f"{entry.id}.update")
        rest = [a for a in self.accepted() if a.id != entry.id]
        self._write_json("accepted.json", [asdict(a) for a in [*rest, entry]])
        return entry

    def forget(self, update_id: str) -> None:
        """Drop ``update_id`` from the store: not accepted, not held, its file removed."""
        rest = [a for a in self.accepted() if a.id != update_id]
        self._write_json("accepted.json", [asdict(a) for a in rest])
        with contextlib.suppress(FileNotFoundError):
            self.file(update_id).unlink()
        held = self.held()
        if held.pop(update_id, None) is not None:
            self._write_json("held.json", held)

    # -------------------------------------------------------------- crash guard

    def _inflight_name(self, update_id: str, target: str) -> str:
        check_update_id(update_id)
        if not _TARGET_KEY.fullmatch(target):
            raise ValueError(f"bad target key {target!r}")
        return f"{update_id}@{target}"

    def begin(self, update_id: str, target: str) -> None:
        """An apply of ``update_id`` to ``target`` (e.g. ``pid:START``) starts now."""
        d = self._dir("inflight")
        write_private(d / self._inflight_name(update_id, target), b"")

    def done(self, update_id: str, target: str) -> None:
        """... and ended (applied or refused: either way the target survived it)."""
        with contextlib.suppress(FileNotFoundError, PrivateFileError):
            (self._dir("inflight", create=False) / self._inflight_name(update_id, target)).unlink()

    def suspect(self) -> set[tuple[str, str]]:
        """(update id, target) of applies that began and never ended."""
        try:
            names = os.listdir(self._dir("inflight", create=False))
        except (FileNotFoundError, PrivateFileError):
            return set()
        out = set()
        for n in names:
            uid, _, target = n.partition("@")
            if target and not n.startswith("."):
                out.add((uid, target))
        return out

    def hold(self, update_id: str, why: str) -> None:
        """Never apply ``update_id`` automatically again (until released)."""
        held = self.held()
        held[update_id] = why
        self._write_json("held.json", held)

    def release(self, update_id: str) -> None:
        """Allow ``update_id`` again, and forget the interrupted applies that made it held."""
        held = self.held()
        held.pop(update_id, None)
        self._write_json("held.json", held)
        for uid, target in self.suspect():
            if uid == update_id:
                self.done(uid, target)

    def held(self) -> dict[str, str]:
        """Updates held back from automatic apply, with why (the store refuses a damaged file
        rather than guess)."""
        raw = self._read_json("held.json", {})
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise UsageError("the livesplice store's held.json is damaged")
        return dict(raw)

    def guard_after_crash(self) -> list[str]:
        """Hold back every update whose apply never ended; returns the ids held now."""
        newly = []
        held = self.held()
        for uid, target in sorted(self.suspect()):
            if uid not in held:
                why = (
                    f"an apply to {target} began and never ended (the process, the agent "
                    "or the machine crashed during it)"
                )
                self.hold(uid, why)
                held[uid] = why
                newly.append(uid)
        return newly

    # -------------------------------------------------------------- repository serial

    def serial(self, repo: str) -> int:
        """The highest index serial seen from ``repo`` (0: none): an index with a lower one is a
        rollback."""
        raw = self._read_json("serials.json", {})
        value = raw.get(repo, 0) if isinstance(raw, dict) else 0
        return value if isinstance(value, int) else 0

    def set_serial(self, repo: str, serial: int) -> None:
        """Remember the serial of ``repo``'s index just accepted."""
        raw = self._read_json("serials.json", {})
        raw = raw if isinstance(raw, dict) else {}
        raw[repo] = serial
        self._write_json("serials.json", raw)

    def cache_dir(self) -> Path:
        """The private download cache of update files."""
        return self._dir("cache")
