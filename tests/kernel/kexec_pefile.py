"""Runs in the lab guest: verify the PE signature of a kernel image through kexec_file_load.

kexec_file_load(2) of a bzImage runs verify_pefile_signature (pefile_digest_pe_contents
inlined, crypto/asymmetric_keys/verify_pefile.c). With dynamic debug on for that file, the
digest check prints "The digests match!" from whichever code runs: after a live update, the
new code, through its own __jump_table entries and the kernel's descriptors. Then unload.
Usage: kexec_pefile.py VMLINUZ
"""

import ctypes
import os
import sys

SYS_KEXEC_FILE_LOAD = 320  # x86-64
KEXEC_FILE_UNLOAD, KEXEC_FILE_NO_INITRAMFS = 1, 4

with open("/proc/dynamic_debug/control", "w") as f:
    f.write("file verify_pefile.c +p")
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY)
rc = libc.syscall(SYS_KEXEC_FILE_LOAD, fd, -1, 1, b"\0", KEXEC_FILE_NO_INITRAMFS)
print(f"kexec_file_load rc={rc} errno={ctypes.get_errno()}")
libc.syscall(SYS_KEXEC_FILE_LOAD, -1, -1, 0, None, KEXEC_FILE_UNLOAD)
