"""The lab's guest root file system: a busybox initramfs plus a per-run payload archive.

Both are cpio archives in the kernel's ``newc`` format, written here directly (no ``cpio``
binary, no root privileges needed for the ``/dev/console`` node). The kernel unpacks
concatenated archives in order, each optionally compressed
(Documentation/driver-api/early-userspace/buffer-format.rst), so a run's initrd is simply
``base.cpio.gz + payload.cpio.gz`` and the base is built once per kernel.

Guest protocol (the host side is :mod:`livesplice.kernel.guest`):

* ttyS0 is the kernel console; ttyS1 carries only the payload: ``@@LAB booted ID UPTIME@@``,
  ``@@LAB begin ID@@``, the output of ``/payload/run.sh`` (stdout and stderr), then
  ``@@LAB rc=N ID@@``. ``ID`` is a per-run nonce taken from ``lab.id=`` on the kernel command
  line, so output that happens to contain a marker cannot fake a result.
* The guest then powers QEMU off through ``isa-debug-exit`` (see :data:`LAB_EXIT_C`).
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from livesplice.errors import BuildFailed

#: Exit helper, compiled with ``gcc -static`` at prepare time (the initramfs has no libc).
LAB_EXIT_C = r"""/* livesplice lab: make QEMU exit with the payload's status.
 *
 * QEMU's isa-debug-exit device (-device isa-debug-exit,iobase=0xf4,iosize=0x04) makes QEMU
 * exit with status (v << 1) | 1 when the guest writes byte v to port 0xf4. Debian's kernel
 * is built without CONFIG_DEVPORT (no /dev/port), so the write needs ioperm() + outb().
 * QEMU stops at once, so first wait until the serial ports named on the command line have
 * sent everything (tcdrain), or the end of the payload output could be lost.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/io.h>
#include <termios.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int status = argc > 1 ? atoi(argv[1]) : 0;
	for (int i = 2; i < argc; i++) {
		int fd = open(argv[i], O_WRONLY | O_NOCTTY);
		if (fd >= 0) {
			tcdrain(fd);
			close(fd);
		}
	}
	if (ioperm(0xf4, 1, 1) != 0)
		return 1;
	outb((unsigned char)status, 0xf4);
	return 2; /* only reached when QEMU has no isa-debug-exit device */
}
"""

#: The guest's /init (busybox sh). It is PID 1: it must never exit (the kernel would panic).
LAB_INIT_SH = r"""#!/bin/sh
# livesplice kernel lab /init: mount the pseudo file systems, run /payload/run.sh with its
# output on ttyS1 between markers, then power off through isa-debug-exit with its status.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
id=$(sed -n 's/.*lab\.id=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
out=/dev/ttyS1
# raw: no "\n" -> "\r\n" translation, the host gets the payload's bytes unchanged
stty -F $out raw -echo 2>/dev/null
echo "@@LAB booted $id $(cut -d' ' -f1 /proc/uptime)@@" > $out
rc=127
if [ -x /payload/run.sh ]; then
  echo "@@LAB begin $id@@" > $out
  (cd /payload && exec /payload/run.sh) < /dev/null > $out 2>&1
  rc=$?
fi
echo "@@LAB rc=$rc $id@@" > $out
sync
/bin/lab-exit $rc $out /dev/console
poweroff -f
"""

_NEWC_MAGIC = b"070701"


@dataclass(frozen=True)
class GuestFile:
    """A host file (or directory, recursively) to place at ``guest_path`` in the guest."""

    source: Path
    guest_path: str


class ByteSink(Protocol):
    """Where the cpio writer puts bytes: a file, or a gzip stream over one."""

    def write(self, data: bytes, /) -> int:
        """Write ``data``; like a binary file's ``write``."""


class CpioWriter:
    """Writes a ``newc`` cpio archive (the only format the kernel's unpacker reads)."""

    def __init__(self, out: ByteSink) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()
        self._pos = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._pos += len(data)

    def _pad(self) -> None:
        # newc: the name and the data are each padded to a multiple of 4 bytes
        self._write(b"\0" * (-self._pos % 4))

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._write(_NEWC_MAGIC + b"".join(b"%08x" % f for f in fields))
        self._write(encoded)
        self._pad()

    def directory(self, name: str, mode: int = 0o755) -> None:
        """A directory entry (once per name; its parents first, as the kernel's unpacker needs
        them to exist)."""
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.parents(name)
        self._dirs.add(name)
        self._header(name, stat.S_IFDIR | mode, 0)

    def parents(self, name: str) -> None:
        """Directory entries for every parent of ``name``: the unpacker does not create them."""
        parent = str(PurePosixPath(name.strip("/")).parent)
        if parent != ".":
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with ``data`` as its contents."""
        self.parents(name)
        self._header(name.strip("/"), stat.S_IFREG | mode, len(data))
        self._write(data)
        self._pad()

    def host_file(self, name: str, source: Path) -> None:
        """A regular file copied from the host in chunks, with its permission bits (large .ko and
        Python files never sit in memory whole)."""
        st = source.stat()
        self.parents(name)
        self._header(name.strip("/"), stat.S_IFREG | (st.st_mode & 0o7777), st.st_size)
        with source.open("rb") as f:
            while chunk := f.read(1 << 20):
                self._write(chunk)
        self._pad()

    def symlink(self, name: str, target: str) -> None:
        """A symbolic link (busybox applets are links to busybox)."""
        self.parents(name)
        data = target.encode()
        self._header(name.strip("/"), stat.S_IFLNK | 0o777, len(data))
        self._write(data)
        self._pad()

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node: the guest has no udev, so /dev/console and friends are made
        here."""
        self.parents(name)
        self._header(name.strip("/"), stat.S_IFCHR | mode, 0, (major, minor))

    def tree(self, guest_path: str, source: Path) -> None:
        """``source`` (file or directory, recursively, symlinks kept) at ``guest_path``."""
        if source.is_symlink():
            self.symlink(guest_path, os.readlink(source))
        elif source.is_dir():
            self.directory(guest_path, source.stat().st_mode & 0o7777)
            for child in sorted(source.iterdir()):
                self.tree(f"{guest_path.rstrip('/')}/{child.name}", child)
        else:
            self.host_file(guest_path, source)

    def close(self) -> None:
        """The trailer entry and padding to a 512-byte block, so another archive can be appended
        (the per-run payload)."""
        self._header("TRAILER!!!", 0, 0)
        # the kernel skips zero padding between concatenated archives; keep 512-byte blocks
        self._write(b"\0" * (-self._pos % 512))


def busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox provides, each made a link in the guest's /bin."""
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(a for a in out.stdout.split() if a and a != "busybox")


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable with no program interpreter (PT_INTERP)."""
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        return not any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments())


def compile_lab_exit(workdir: Path) -> Path:
    """Compile the guest's exit helper statically: the guest has no libc to link against."""
    src = workdir / "lab-exit.c"
    exe = workdir / "lab-exit"
    src.write_text(LAB_EXIT_C)
    cmd = ["gcc", "-O2", "-static", "-o", str(exe), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildFailed(
            "cannot compile the guest's static exit helper",
            [" ".join(cmd), *done.stderr.splitlines()[-20:]],
            "install gcc and libc6-dev (scripts/bootstrap-kernel.sh)",
        )
    return exe


def write_base_initramfs(out: Path, busybox: Path, workdir: Path) -> None:
    """The guest's root: busybox + applet links, /init, /bin/lab-exit, gzip -1 compressed."""
    lab_exit = compile_lab_exit(workdir)
    tmp = out.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as gz:
        cpio = CpioWriter(gz)
        for d in (
            "bin",
            "sbin",
            "dev",
            "proc",
            "sys",
            "run",
            "root",
            "etc",
            "mnt",
            "payload",
            "usr/bin",
            "usr/sbin",
            "lib/modules",
        ):
            cpio.directory(d)
        cpio.directory("tmp", 0o1777)
        # /dev/console must exist in the initramfs: the kernel opens it for init's stdio
        # before /init can mount devtmpfs (init/main.c console_on_rootfs).
        cpio.char_device("dev/console", 5, 1)
        cpio.host_file("bin/busybox", busybox)
        for applet in busybox_applets(busybox):
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.host_file("bin/lab-exit", lab_exit)
        cpio.file("init", LAB_INIT_SH.encode(), 0o755)
        cpio.close()
    tmp.replace(out)


def write_payload(out: BinaryIO, run_script: str, files: Iterable[GuestFile]) -> None:
    """A gzip'd cpio with /payload/run.sh and the given files (relative paths under /payload)."""
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        cpio = CpioWriter(gz)
        cpio.directory("payload")
        for f in files:
            path = f.guest_path if f.guest_path.startswith("/") else f"payload/{f.guest_path}"
            cpio.tree(path, f.source)
        cpio.file("payload/run.sh", run_script.encode(), 0o755)
        cpio.close()
