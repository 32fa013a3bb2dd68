"""Fork children of a patched process: trusted through the journal entry they inherited from.

``fork`` copies a process's mappings, the update's ``MAP_PRIVATE`` memfd mappings included, so
a child of a patched process (redis's BGSAVE child, a prefork server's worker) runs the
patched code -- but the journal (process/journal.py, the authority for view and undo) has an
entry only for the process livesplice patched. Without more, the child's update would look
like a record livesplice did not write: ``view`` calls it unverified and ``undo --all`` fails.

A child is trusted for update ID when a process with a *recorded* journal entry for ID (its
ancestors first, along the PPid chain) maps the very same memfd inodes (device and inode of
``/proc/PID/maps``) at the same addresses as the child does. Why that is proof:
livesplice creates each memfd inside the target, maps it and closes the descriptor at once,
so the only way another process gets a mapping of that inode is to inherit it by fork (or
``/proc/PID/map_files``, which needs CAP_SYS_ADMIN). A local user who fills a file named
``/memfd:livesplice:ID`` in their own process has another inode; one who re-maps the child's
memory loses the inode. What livesplice then acts on is the ancestor's journal record (the
bytes livesplice itself recorded), never the child's; the child gets its own journal entry
(``inherited_from``), so it stays trusted after the ancestor is undone or exits.

The trust is the ancestor's, no more: the owner of the ancestor could already rewrite the
private copy of the update's memory in the ancestor itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from livesplice.process import journal
from livesplice.process.procstat import descendants, parent_of
from livesplice.process.state import StateRecord, read_memory

MAX_DEPTH = 64  # ancestors looked at: prefork masters and BGSAVE children are 1-2 deep
_Maps = frozenset[tuple[int, int, str, int, str]]


def update_memfds(pid: int, update_id: str) -> _Maps:
    """(start, end, device, inode, kind) of every mapping of ``update_id``'s memfds in ``pid``;
    empty if none or the process is gone."""
    from livesplice.process.procmaps import read_maps

    name = re.compile(rf"^/memfd:livesplice:{re.escape(update_id)}(?::(code|data))? \(deleted\)$")
    try:
        maps = read_maps(pid)
    except OSError:
        return frozenset()
    return frozenset(
        (m.start, m.end, m.dev, m.inode, match.group(1) or "record")
        for m in maps
        if (match := name.match(m.path)) and m.inode
    )


def _vouches(entry: journal.JournalEntry | None, mine: _Maps) -> bool:
    """Whether ``entry``'s process maps every memfd of ``mine`` (same device, inode and
    addresses) and its recorded code lies in one of them."""
    if entry is None or entry.stage != "recorded" or entry.record is None:
        return False
    lo, hi = entry.record.code
    code_ok = any(k == "code" and a <= lo and hi <= b for a, b, _d, _i, k in mine)
    return code_ok and mine <= update_memfds(entry.pid, entry.id)


def vouching_ancestor(pid: int, update_id: str) -> journal.JournalEntry | None:
    """The journal entry that vouches for ``update_id`` in ``pid`` (the module docstring's
    rule), or None. The PPid chain is looked at first (the ancestor to name); then every
    other entry of the update: a grandchild whose parent exited is re-parented (to init or
    a subreaper) but still maps the very memfds of the process livesplice patched."""
    mine = update_memfds(pid, update_id)
    if not any(kind == "code" for *_, kind in mine):
        return None
    anc = parent_of(pid)
    for _ in range(MAX_DEPTH):
        if anc is None:
            break
        entry = journal.read_entry(anc, update_id)
        if _vouches(entry, mine):
            return entry
        anc = parent_of(anc)
    for entry in journal.entries_of(update_id):
        if entry.pid != pid and _vouches(entry, mine):
            return entry
    return None


def adopt(pid: int, update_id: str) -> journal.JournalEntry | None:
    """A journal entry for a fork child that inherited ``update_id`` (written to the journal
    when it can be, so the child stays trusted after its ancestor is undone or exits); None
    when no ancestor vouches for it."""
    start = journal.process_start(pid)
    if start is None:
        return None
    entry = vouching_ancestor(pid, update_id)
    if entry is None or entry.record is None or journal.process_start(pid) != start:
        return None
    record = entry.record
    if record.reverted and _jumps_in_place(pid, record):
        # forked before the ancestor's undo (which kept the memory): the child still jumps
        record = dataclasses.replace(record, reverted=False)
    with contextlib.suppress(OSError, ValueError):
        journal.write_entry(
            pid, update_id, "recorded", record, inherited_from=entry.pid, start=start
        )
    return journal.JournalEntry(pid, start, update_id, "recorded", record, entry.pid)


def adopt_descendants(pid: int, update_id: str, carried: _Maps, record: StateRecord) -> int:
    """Give every descendant of ``pid`` that maps ``carried`` (the update's memfds in ``pid``
    just before undo unmapped them) a journal entry of its own, before ``pid``'s entry goes:
    a child forked while ``pid`` was being undone still runs the update, and nothing else
    would vouch for it afterwards. After the unmap no process can newly get these inodes
    (fork copies only what the parent still maps). Returns how many were adopted."""
    if not any(kind == "code" for *_, kind in carried):
        return 0
    adopted = 0
    for kid in descendants(pid):
        start = journal.process_start(kid)
        mine = update_memfds(kid, update_id)
        if start is None or not mine or not mine <= carried:
            continue
        if journal.read_entry(kid, update_id) is not None:
            continue
        rec = record
        if rec.reverted and _jumps_in_place(kid, rec):
            rec = dataclasses.replace(rec, reverted=False)
        with contextlib.suppress(OSError, ValueError):
            journal.write_entry(kid, update_id, "recorded", rec, inherited_from=pid, start=start)
            adopted += 1
    return adopted


def _jumps_in_place(pid: int, record: StateRecord) -> bool:
    """Whether any of the record's jumps is at its address in ``pid``."""
    for tr in record.trampolines:
        with contextlib.suppress(OSError):
            if read_memory(pid, tr.address, len(tr.jump) // 2).hex() == tr.jump:
                return True
    return False
