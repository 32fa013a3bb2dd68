"""Runs in the lab guest: how many chunk types can one SCTP endpoint authenticate?

setsockopt(SCTP_AUTH_CHUNK) ends in sctp_auth_ep_add_chunkid (net/sctp/auth.c). Before the
CVE-2026-68320 fix it accepts SCTP_NUM_CHUNK_TYPES (20) distinct types although the list has
room for SCTP_AUTH_MAX_CHUNKS (16, the types that may be authenticated): the fix makes the
17th fail with EINVAL. Prints "accepted N".
"""

import socket

IPPROTO_SCTP = 132
SCTP_AUTH_CHUNK = 21
# INIT (1), INIT_ACK (2), SHUTDOWN_COMPLETE (14), AUTH (15) are refused by the setsockopt itself
TYPES = [0, *range(3, 14), *range(16, 64)]

with open("/proc/sys/net/sctp/auth_enable", "w") as f:  # copied into each new endpoint
    f.write("1")
s = socket.socket(socket.AF_INET, socket.SOCK_SEQPACKET, IPPROTO_SCTP)
n = 0
for cid in TYPES:
    try:
        s.setsockopt(IPPROTO_SCTP, SCTP_AUTH_CHUNK, bytes([cid]))
    except OSError as e:
        print(f"stopped at type {cid}: errno {e.errno}")
        break
    n += 1
print(f"accepted {n}")
