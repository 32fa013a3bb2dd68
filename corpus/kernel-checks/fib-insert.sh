#!/bin/sh
# CVE-2026-64572 (net/ipv4/fib_trie.c, fib_table_insert): runs the fixed function by adding
# IPv4 routes (new, append, replace, duplicate -> EEXIST) and deleting them. The fixed error
# path (a route notifier refusing the insert) cannot be reached from here: no STATE line.
set -e
ip link set lo up
ip addr add 10.77.0.1/16 dev lo
ip route add 10.78.0.0/16 via 10.77.0.2 dev lo
ip route append 10.78.0.0/16 via 10.77.0.3 dev lo metric 5
ip route replace 10.78.0.0/16 via 10.77.0.4 dev lo
if ip route add 10.78.0.0/16 via 10.77.0.4 dev lo 2>/dev/null; then
	echo "a duplicate route was accepted"
	exit 1
fi
grep -q "^lo	00004E0A" /proc/net/route
ip route del 10.78.0.0/16 via 10.77.0.4 dev lo
ip route del 10.78.0.0/16 via 10.77.0.3 dev lo metric 5
ip addr del 10.77.0.1/16 dev lo
echo "routes added, replaced and deleted"
