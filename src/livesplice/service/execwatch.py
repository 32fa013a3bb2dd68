"""Learning of every exec on the machine, as it happens: the kernel's proc connector.

The connector (``NETLINK_CONNECTOR``, ``CN_IDX_PROC``; include/uapi/linux/cn_proc.h) sends a
``PROC_EVENT_EXEC`` message from inside execve, before the new program runs its first
instruction, with the pid and a CLOCK_MONOTONIC timestamp -- so the agent can patch a
restarted service before it serves anyone, and measure how long that took. Root only (it
needs CAP_NET_ADMIN). When the socket buffer overflows (``ENOBUFS``: events were lost) the
watcher says so and the agent rescans /proc. Where the connector is unavailable (a container
without it), :class:`ProcPoller` lists /proc every few milliseconds instead -- slower and
with no exec timestamp (it uses the process start time instead).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXEC = struct.Struct("=II")  # process_pid, process_tgid


@dataclass(frozen=True)
class Exec:
    """One exec: which process, and when (to measure exec to patched)."""

    pid: int  # the thread group (process) that exec'd
    at_ns: int  # CLOCK_MONOTONIC when it exec'd (time.monotonic_ns() scale)


class Overflow(Exception):
    """Events were lost (the socket buffer overflowed): rescan."""


class ExecWatcher:
    """Exec events from the proc connector. Use as a context manager."""

    kind = "proc connector"

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind((0, CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
        except OSError:
            self.sock.close()
            raise

    def _control(self, op: int) -> None:
        body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0) + struct.pack("=I", op)
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body)

    def events(self, timeout: float) -> Iterator[Exec]:
        """Exec events that arrive within ``timeout`` seconds (fewer if none arrive).

        :raises Overflow: events were lost.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                raise Overflow from None
            raise
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length = _NLMSGHDR.unpack_from(data, off)[0]
            if length < _NLMSGHDR.size:
                break
            body = off + _NLMSGHDR.size
            if body + _CN_MSG.size + _EVENT.size + _EXEC.size <= len(data):
                idx, val = _CN_MSG.unpack_from(data, body)[:2]
                what, _cpu, ts = _EVENT.unpack_from(data, body + _CN_MSG.size)
                if (idx, val, what) == (CN_IDX_PROC, CN_VAL_PROC, PROC_EVENT_EXEC):
                    _tid, tgid = _EXEC.unpack_from(data, body + _CN_MSG.size + _EVENT.size)
                    yield Exec(tgid, ts)
            off += (length + 3) & ~3

    def close(self) -> None:
        """Unsubscribe from the proc connector and close the socket."""
        with contextlib.suppress(OSError):
            self._control(PROC_CN_MCAST_IGNORE)
        self.sock.close()

    def __enter__(self) -> ExecWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcPoller:
    """The fallback: new pids seen by listing /proc (exec in an existing pid is missed;
    the agent's periodic rescan catches those)."""

    kind = "/proc poller"

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.known = set(_pids())
        self.ticks = os.sysconf("SC_CLK_TCK")

    def events(self, timeout: float) -> Iterator[Exec]:
        """New pids since the last look, as Exec events stamped with each process's start time."""
        time.sleep(min(self.interval, timeout))
        now = set(_pids())
        fresh, self.known = now - self.known, now
        uptime = Path("/proc/uptime").read_text().split()[0]
        boot_ns = time.monotonic_ns() - int(float(uptime) * 1e9)
        for pid in sorted(fresh):
            try:
                stat = Path(f"/proc/{pid}/stat").read_bytes()
                start = int(stat[stat.rfind(b")") + 2 :].split()[19])
            except (OSError, ValueError, IndexError):
                continue
            yield Exec(pid, boot_ns + start * 1_000_000_000 // self.ticks)

    def close(self) -> None:
        """Nothing to release: the poller holds no descriptors."""
        pass

    def __enter__(self) -> ProcPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def watcher(force_poll: bool = False) -> ExecWatcher | ProcPoller:
    """The proc connector when available, else the poller."""
    if not force_poll:
        try:
            return ExecWatcher()
        except OSError:
            pass
    return ProcPoller()
