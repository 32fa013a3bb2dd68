"""A small livesplice "tool" for tests/test_remote_robust.py, run as its own process so that
the test can SIGKILL it (LIVESPLICE_KILL_AT=<checkpoint>, or a plain kill at a random time).

usage: python ptrace_robust_tool.py PID THREAD_NAME OP [ADDRESS]
  OP: syscall (getpid) | mmap (a named mapping, then munmap) | call ADDRESS | loop ADDRESS
      (forever: getpid, mmap + munmap, call, on the named thread)
Prints "done" when the operation finished without being killed.
"""

from __future__ import annotations

import os
import sys

from livesplice.process.ptrace import Tracee
from livesplice.process.remote import (
    PROT_READ,
    remote_call,
    remote_mmap,
    remote_munmap,
    remote_syscall,
)


def thread_named(pid: int, name: str) -> int:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() == name:
                return int(tid)
    raise LookupError(name)


def main() -> None:
    pid, name, op = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    func = int(sys.argv[4], 0) if len(sys.argv) > 4 else 0
    tid = thread_named(pid, name)
    with Tracee(pid) as t:
        while True:
            if op in ("syscall", "loop"):
                assert remote_syscall(t, 39, thread=tid) == pid
            if op in ("mmap", "loop"):
                addr = remote_mmap(t, 4096, PROT_READ, name="robust-test", thread=tid)
                remote_munmap(t, addr, 4096)
            if op in ("call", "loop"):
                print("result", remote_call(t, func, thread=tid), flush=True)
            if op != "loop":
                break
    print("done", flush=True)


if __name__ == "__main__":
    main()
