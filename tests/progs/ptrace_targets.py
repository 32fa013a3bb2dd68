"""Running the C targets of the ptrace / stop-window tests and benchmarks.

Used by tests/test_ptrace.py, tests/test_stopwindow.py and benchmarks/bench_*.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(name: str, outdir: Path, *flags: str) -> Path:
    """Compile tests/progs/NAME.c with gcc into OUTDIR (PIE, -O2 -g, pthreads)."""
    out = outdir / name
    src = HERE / f"{name}.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(
            ["gcc", "-O2", "-g", "-pthread", "-Wall", *flags, "-o", str(out), str(src)],
            check=True,
        )
    return out


class Target:
    """A target process with line-based stdin/stdout."""

    def __init__(self, exe: Path, *args: str) -> None:
        self.exe = exe
        self.proc = subprocess.Popen(
            [str(exe), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.readline(10) == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def readline(self, timeout: float = 10.0) -> str:
        return self.lines.get(timeout=timeout)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def cmd(self, line: str, timeout: float = 10.0) -> str:
        self.send(line)
        return self.readline(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def threads(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))

    def wait_threads(self, n: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while len(self.threads()) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.threads())} threads, expected {n}")
            time.sleep(0.01)

    def base(self) -> int:
        """Load address of the executable (PIE): its mapping at file offset 0."""
        real = os.path.realpath(self.exe)
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                    return int(parts[0].split("-")[0], 16)
        raise LookupError("executable not mapped")

    def symbol(self, name: str) -> tuple[int, int]:
        """(running address, size) of a function of the executable."""
        from elftools.elf.elffile import ELFFile

        with open(self.exe, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            for sym in symtab.iter_symbols():
                if sym.name == name:
                    bias = self.base() if elf.header.e_type == "ET_DYN" else 0
                    return bias + sym.entry.st_value, sym.entry.st_size
        raise LookupError(name)

    def stop(self) -> None:
        if self.alive():
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def jmp_rel32(at: int, to: int) -> bytes:
    """The 5-byte ``jmp rel32`` (e9) written at ``at`` that lands on ``to``."""
    return b"\xe9" + (to - (at + 5)).to_bytes(4, "little", signed=True)
