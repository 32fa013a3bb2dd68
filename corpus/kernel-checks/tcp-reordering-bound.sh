#!/bin/sh
# CVE-2026-64422 (net/ipv4/sysctl_net_ipv4.c): net.ipv4.tcp_reordering must stay within
# 1..tcp_max_reordering. Old kernel: 0 and values above the maximum are accepted; fixed:
# EINVAL. The setting is put back afterwards.
f=/proc/sys/net/ipv4/tcp_reordering
old=$(cat $f) || exit 1
max=$(cat /proc/sys/net/ipv4/tcp_max_reordering) || exit 1
if echo $((max + 1)) > $f 2>/dev/null; then
	echo "tcp_reordering $((max + 1)) (> tcp_max_reordering $max) accepted"
	state=vulnerable
else
	echo "tcp_reordering $((max + 1)) (> tcp_max_reordering $max) refused"
	state=fixed
fi
echo "$old" > $f || exit 1
[ "$(cat $f)" = "$old" ] || exit 1
echo "STATE: $state"
