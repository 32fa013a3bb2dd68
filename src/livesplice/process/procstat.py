"""``/proc/PID/stat`` read as proc(5) says, and the process tree built from it.

The command name (field 2) may hold spaces and parentheses, so fields are split after its
last ``)``. One place for this: the ptrace layer (thread states, exit codes), the journal
(start times), fork-child trust (parents, descendants) and the workloads all read it.
"""

from __future__ import annotations

import os


def stat_fields(path: str) -> list[bytes]:
    """The fields of a /proc stat file from field 3 (the state) on: ``[0]`` the state,
    ``[1]`` the parent pid, ``[19]`` the start time; [] when it cannot be read (gone)."""
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rfind(b")") + 2 :].split()


def pid_stat(pid: int) -> list[bytes]:
    """:func:`stat_fields` of process ``pid``."""
    return stat_fields(f"/proc/{pid}/stat")


def parent_of(pid: int) -> int | None:
    """The parent pid (field 4); None if gone or at the root."""
    fields = pid_stat(pid)
    ppid = int(fields[1]) if len(fields) > 1 else 0
    return ppid if ppid > 0 else None


def process_table() -> dict[int, tuple[str, int]]:
    """Every process: pid -> (state letter, parent pid), one pass over /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and len(fields := pid_stat(int(name))) > 1:
            table[int(name)] = (fields[0].decode(), int(fields[1]))
    return table


def children_of(pid: int) -> dict[int, str]:
    """The children of ``pid`` (zombies too) and their state letters, by pid."""
    return {kid: state for kid, (state, ppid) in sorted(process_table().items()) if ppid == pid}


def descendants(pid: int) -> list[int]:
    """The live (not zombie) descendants of ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for kid, (state, ppid) in sorted(process_table().items()):
        if state not in ("Z", "X"):
            children.setdefault(ppid, []).append(kid)
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out.extend(kids)
        todo.extend(kids)
    return out
