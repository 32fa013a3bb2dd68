"""Runs in the lab guest: park a thread inside copy_page_from_iter (lib/iov_iter.c) until killed.

A write(2) to a pipe copies the user buffer with copy_page_from_iter; when that buffer is
userfaultfd-registered memory nobody ever fills, the copy faults and the writing thread
sleeps in handle_userfault, with copy_page_from_iter's return address on its kernel stack
(pipe_write -> copy_page_from_iter -> _copy_from_iter -> page fault -> handle_userfault).
Prints "blocked PID TID" once the thread is asleep there, then waits to be killed (a fatal
signal wakes a userfault sleeper).
"""

import ctypes
import fcntl
import os
import struct
import threading
import time

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register): 32 bytes
UFFDIO_REGISTER_MODE_MISSING = 1
PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.gettid.restype = ctypes.c_int

uffd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC)
if uffd < 0:
    raise OSError(ctypes.get_errno(), "userfaultfd")
fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)))
addr = libc.mmap(None, PAGE, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
fcntl.ioctl(
    uffd,
    UFFDIO_REGISTER,
    bytearray(struct.pack("QQQQ", addr, PAGE, UFFDIO_REGISTER_MODE_MISSING, 0)),
)
rfd, wfd = os.pipe()
tids: list[int] = []


def writer() -> None:
    tids.append(libc.gettid())
    libc.write(wfd, addr, PAGE)  # faults on the unfilled page: sleeps in the kernel


threading.Thread(target=writer, daemon=True).start()
while not tids:
    time.sleep(0.01)
for _ in range(1000):  # until the thread sleeps in the fault (its wchan says where)
    with open(f"/proc/{os.getpid()}/task/{tids[0]}/wchan") as f:
        if f.read().strip() == "handle_userfault":
            break
    time.sleep(0.01)
else:
    raise SystemExit("the writer never slept in handle_userfault")
print(f"blocked {os.getpid()} {tids[0]}", flush=True)
while True:
    time.sleep(60)
