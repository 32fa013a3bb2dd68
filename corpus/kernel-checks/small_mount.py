"""Mount a filesystem type on a zeroed loop device with 4096-byte logical blocks.

Used by the kernel checks of the ``*_fill_super`` fixes that handle ``sb_set_blocksize()``
failing: a filesystem that wants 512-byte blocks cannot have them on a device whose
logical block is 4096 bytes. The fixed code gives up silently there; the old code carries
on with the wrong block size and reaches its "not my filesystem" message, which tells the
two apart. A filesystem whose wanted block size fits (4096) reaches its own checks either
way: the check then only exercises the fixed function.

usage: small_mount.py FSTYPE [REGEX]  -- REGEX: a kernel message only the old code prints
Exit 0 when the mount failed as it must (an empty image is no filesystem), 1 otherwise.
"""

import ctypes
import fcntl
import os
import re
import subprocess
import sys

LOOP_SET_FD, LOOP_CLR_FD, LOOP_SET_BLOCK_SIZE = 0x4C00, 0x4C01, 0x4C09
LOOP_CTL_GET_FREE = 0x4C82
MS_RDONLY = 1

fstype = sys.argv[1]
vulnerable = re.compile(sys.argv[2]) if len(sys.argv) > 2 else None
libc = ctypes.CDLL(None, use_errno=True)

subprocess.run(["modprobe", "loop"], check=False)
image = "/tmp/kcheck-%s.img" % fstype
with open(image, "wb") as f:
    f.truncate(4 << 20)
ctl = os.open("/dev/loop-control", os.O_RDWR)
n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
os.close(ctl)
dev = "/dev/loop%d" % n
if not os.path.exists(dev):
    os.mknod(dev, 0o600 | 0o060000, os.makedev(7, n))
loop = os.open(dev, os.O_RDWR)
backing = os.open(image, os.O_RDWR)
fcntl.ioctl(loop, LOOP_SET_FD, backing)
fcntl.ioctl(loop, LOOP_SET_BLOCK_SIZE, 4096)
os.makedirs("/tmp/kcheck-mnt", exist_ok=True)
nonce = "kcheck-%d-%s" % (os.getpid(), fstype)
with open("/dev/kmsg", "w") as k:
    k.write(nonce + "\n")
r = libc.mount(dev.encode(), b"/tmp/kcheck-mnt", fstype.encode(), MS_RDONLY, None)
err = ctypes.get_errno()
mounted = r == 0
if mounted:
    libc.umount(b"/tmp/kcheck-mnt")
fcntl.ioctl(loop, LOOP_CLR_FD, 0)
os.close(loop)
os.close(backing)
os.unlink(image)
log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
after = log.split(nonce, 1)[-1].splitlines()[1:]
for line in after:
    print("kernel:", line)
print("mount -t %s on a 4096-byte-block device: %s" % (fstype, "mounted" if mounted else os.strerror(err)))
if mounted:
    sys.exit(1)
if vulnerable is not None:
    old = any(vulnerable.search(line) for line in after)
    print("STATE: %s" % ("vulnerable" if old else "fixed"))
