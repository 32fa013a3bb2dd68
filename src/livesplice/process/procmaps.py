"""The one reader of ``/proc/PID/maps``: a process's mappings as :class:`Mapping` objects.

Image discovery, run-pre matching, the loader's placement, the state record's mappings and
``view``'s scan all read the same file; they parse it here, once, and each decides what a
process that is gone means to it (an OSError from :func:`read_maps`).

Line format (proc(5)): ``start-end perms offset dev inode [path]``; the path may contain
spaces and ends with `` (deleted)`` for a removed file or a memfd.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str  # "r-xp"
    offset: int
    path: str  # "" for anonymous memory; "[stack]", "/memfd:name (deleted)", ...
    dev: str = ""  # "00:01": with the inode, which file (a memfd's own inode) is mapped
    inode: int = 0

    @property
    def executable(self) -> bool:
        """Mapped with PROT_EXEC."""
        return "x" in self.perms

    def contains(self, addr: int) -> bool:
        """Whether ``addr`` lies in [start, end)."""
        return self.start <= addr < self.end


def parse_maps(text: str) -> list[Mapping]:
    """Every mapping in the text of a maps file (lines that are not mappings are skipped)."""
    out: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        path = parts[5].strip() if len(parts) > 5 else ""
        out.append(
            Mapping(
                int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), path, parts[3], int(parts[4])
            )
        )
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The memory map of process ``pid``.

    :raises OSError: FileNotFoundError when the process is gone, PermissionError when it
        belongs to someone we may not inspect.
    """
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def mapping_at(maps: list[Mapping], addr: int) -> Mapping | None:
    """The mapping containing ``addr`` (None: unmapped)."""
    for m in maps:
        if m.start <= addr < m.end:
            return m
    return None
