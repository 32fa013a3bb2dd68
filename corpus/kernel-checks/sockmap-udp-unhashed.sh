#!/bin/sh
# CVE-2026-68386 (net/core/sock_map.c): a UDP socket that is not bound (not hashed) must not
# enter a sockmap. Old kernel: the update succeeds; fixed: EOPNOTSUPP. A bound UDP socket
# is accepted by both (the code path still works).
PY=${PY:-$(ls /opt/livesplice/bin/python3* | head -1)}
exec "$PY" - <<'PYEOF'
import ctypes, errno, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_bpf = 321
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM = 0, 2
BPF_MAP_TYPE_SOCKMAP = 15


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_bpf, cmd, buf, 128)
    return r, ctypes.get_errno()


fd, err = bpf(BPF_MAP_CREATE, struct.pack("IIII", BPF_MAP_TYPE_SOCKMAP, 4, 4, 2))
if fd < 0:
    print("cannot create a sockmap:", errno.errorcode.get(err, err))
    sys.exit(2)


def insert(slot, sock):
    key = ctypes.c_uint32(slot)
    val = ctypes.c_uint32(sock.fileno())
    attr = struct.pack("IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0)
    r, err = bpf(BPF_MAP_UPDATE_ELEM, attr)
    return 0 if r == 0 else err


bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
bound.bind(("127.0.0.1", 0))
r = insert(0, bound)
print("bound UDP socket:", "accepted" if r == 0 else errno.errorcode.get(r, r))
if r != 0:
    sys.exit(1)
unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r = insert(1, unbound)
print("unbound UDP socket:", "accepted" if r == 0 else errno.errorcode.get(r, r))
if r == 0:
    print("STATE: vulnerable")
elif r == errno.EOPNOTSUPP:
    print("STATE: fixed")
else:
    sys.exit(1)
PYEOF
