"""Boot a prepared Debian kernel in a throwaway QEMU VM, run one command, collect the result.

One boot per command: the initrd is the base initramfs plus a payload archive holding
``/payload/run.sh`` and the requested files; the guest's /init runs the script and powers off
with its exit status (protocol in :mod:`livesplice.kernel.initramfs`). Facts behind the QEMU
command line:

* ``-accel tcg -cpu qemu64``, never KVM: on these machines KVM hangs instead of failing.
* ``panic=-1 oops=panic`` + ``-no-reboot``: any oops becomes a panic, the panic an immediate
  reboot, and the reboot makes QEMU exit, so a crash ends the run at once instead of hanging.
* ``nokaslr``: /proc/kallsyms addresses equal System.map, useful to the kernel target.
* The Debian cloud kernel has the 16550 UARTs built in; ttyS0 is the console, ttyS1 the payload.

Usage from Python (the kernel tests)::

    lab = prepare_lab()
    result = Guest(lab).run("cat /proc/version", files=[GuestFile(ko, "fix.ko")])
    assert result.status == 0, result.output
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import ExitCode, LivespliceError
from livesplice.kernel.initramfs import GuestFile, write_payload
from livesplice.kernel.lab import LabKernel

DEFAULT_TIMEOUT = 180.0
CONSOLE_TAIL_LINES = 40

# First lines of the kernel's crash reports (lib/bug.c, arch/x86/kernel/dumpstack.c,
# kernel/panic.c, arch/x86/mm/fault.c): the excerpt starts at the first one.
_CRASH_START = re.compile(
    r"\] (BUG: |Oops: |general protection fault|WARNING: |Kernel panic - |"
    r"kernel BUG at |Unable to handle kernel )"
)


def console_excerpt(console: str, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
    """The part of the console a person needs: from the first crash report, else the tail.

    A panic's stack trace can be longer than the tail, and the tail would then miss the
    one line that says what happened.
    """
    all_lines = console.splitlines()
    for i, line in enumerate(all_lines):
        if _CRASH_START.search(line):
            return all_lines[max(0, i - 3) : i + 2 * lines]
    return all_lines[-lines:]


class GuestCrashed(LivespliceError):
    """The guest kernel panicked, hung or QEMU failed before the command's status came back."""

    code = ExitCode.TARGET_GONE
    abort = "GUEST_CRASHED"


@dataclass
class GuestResult:
    """What one guest run produced."""

    status: int  # the command's exit status
    output: str  # its stdout and stderr, interleaved as the guest wrote them
    console: str  # the kernel console (ttyS0)
    uptime_at_init: float | None  # guest seconds from kernel start to /init (boot time)
    wall_seconds: float  # host seconds for the whole run (boot, command, power-off)
    qemu_status: int | None = None
    workdir: Path | None = None  # kept only with keep_dir


@dataclass
class Guest:
    """A QEMU VM configuration for a prepared kernel; each :meth:`run` is a fresh boot."""

    lab: LabKernel
    memory_mb: int = 512
    cpus: int = 1
    timeout: float = DEFAULT_TIMEOUT
    append: str = ""  # extra kernel command line
    qemu_args: Sequence[str] = field(default_factory=tuple)
    # more gzip'd cpio archives unpacked after the base (e.g. the livesplice overlay)
    extra_initrds: Sequence[Path] = field(default_factory=tuple)

    def qemu_command(self, initrd: Path, console: Path, out: Path, run_id: str) -> list[str]:
        """The QEMU command line: the lab kernel with this run's initramfs, the serial console to
        a file, and a kernel command line that makes a panic or oops end the run at once."""
        cmdline = (
            f"console=ttyS0 loglevel=6 panic=-1 oops=panic nokaslr lab.id={run_id} {self.append}"
        )
        return [
            "qemu-system-x86_64",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-kernel",
            str(self.lab.vmlinuz),
            "-initrd",
            str(initrd),
            "-append",
            cmdline.strip(),
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
            "-serial",
            f"file:{console}",
            "-serial",
            f"file:{out}",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            *self.qemu_args,
        ]

    def run(
        self,
        command: str,
        files: Iterable[GuestFile] = (),
        *,
        keep_dir: Path | None = None,
    ) -> GuestResult:
        """Boot, run ``command`` with ``sh`` in /payload as root, power off.

        :param files: placed in the guest before boot (relative paths are under /payload).
        :param keep_dir: keep the initrd and the logs there instead of a temporary directory.
        :raises GuestCrashed: no exit status came back (panic, hang past the timeout, QEMU
            failure); the details carry the command's output so far and the console tail.
        """
        if shutil.which("qemu-system-x86_64") is None:
            from livesplice.kernel.debian import LabUnavailable

            raise LabUnavailable(
                "qemu-system-x86_64 is not installed",
                advice="run scripts/bootstrap-kernel.sh (as root)",
            )
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            return self._run_in(keep_dir, command, list(files), keep=True)
        with tempfile.TemporaryDirectory(prefix="livesplice-guest-") as tmp:
            return self._run_in(Path(tmp), command, list(files), keep=False)

    def _run_in(self, work: Path, command: str, files: list[GuestFile], keep: bool) -> GuestResult:
        run_id = secrets.token_hex(8)
        initrd, console, out = work / "initrd.img", work / "console.log", work / "payload.log"
        for f in (console, out):
            f.unlink(missing_ok=True)
        with initrd.open("wb") as w:
            with self.lab.initramfs.open("rb") as base:
                shutil.copyfileobj(base, w)
            for extra in self.extra_initrds:
                with extra.open("rb") as part:
                    shutil.copyfileobj(part, w)
            write_payload(w, f"#!/bin/sh\n{command}\n", files)
        cmd = self.qemu_command(initrd, console, out, run_id)
        t0 = time.monotonic()
        hung = False
        with (work / "qemu.log").open("wb") as qlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
            qemu_status: int | None = None
            try:
                qemu_status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                hung = True
            finally:  # also on KeyboardInterrupt: never leave a VM running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        wall = time.monotonic() - t0
        data = out.read_bytes() if out.exists() else b""
        console_text = console.read_text(errors="replace") if console.exists() else ""
        booted = re.search(rb"@@LAB booted %s ([0-9.]+)@@" % run_id.encode(), data)
        begin = re.search(rb"@@LAB begin %s@@\n" % run_id.encode(), data)
        end = re.search(rb"@@LAB rc=(\d+) %s@@" % run_id.encode(), data)
        output = data[begin.end() : end.start() if end else len(data)] if begin else b""
        text = output.decode(errors="replace")
        if end is None:
            qemu_text = (work / "qemu.log").read_text(errors="replace").strip()
            raise GuestCrashed(
                f"guest hung: no exit status after {self.timeout:.0f} s"
                if hung
                else "guest crashed or hung: the command's exit status never came back",
                [
                    f"command: {command}",
                    f"qemu exit status: {qemu_status}" + (f" ({qemu_text})" if qemu_text else ""),
                    f"booted: {'yes' if booted else 'no'}",
                    "--- command output so far:",
                    *text.splitlines()[-20:],
                    "--- kernel console:",
                    *console_excerpt(console_text),
                ]
                + ([f"--- logs kept in {work}"] if keep else []),
                "a panic or oops in the console above means the command crashed the kernel; "
                "otherwise raise the timeout (--timeout)",
            )
        return GuestResult(
            status=int(end.group(1)),
            output=text,
            console=console_text,
            uptime_at_init=float(booted.group(1)) if booted else None,
            wall_seconds=wall,
            qemu_status=qemu_status,
            workdir=work if keep else None,
        )


def run_in_guest(
    command: str,
    files: Iterable[GuestFile] = (),
    *,
    lab: LabKernel | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> GuestResult:
    """Run ``command`` in a fresh VM of ``lab`` (default: the default kernel, prepared now)."""
    if lab is None:
        from livesplice.kernel.lab import prepare_lab

        lab = prepare_lab()
    return Guest(lab, timeout=timeout).run(command, files)
