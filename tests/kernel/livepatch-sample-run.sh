#!/bin/sh
# Runs in the lab guest: load the kernel's livepatch sample (samples/livepatch/livepatch-sample.c,
# which replaces cmdline_proc_show), check the effect and the sysfs state, then disable and
# unload it and check the original behaviour is back. Prints one "OK <step>" line per step;
# any failure prints "FAIL <why>" and exits 1.
set -u
name=livepatch_sample
lp=/sys/kernel/livepatch/$name
fail() { echo "FAIL $*"; dmesg | tail -15; exit 1; }
# the livepatch transition completes asynchronously (kernel/livepatch/transition.c): poll
settle() {
  i=0
  while [ "$(cat $lp/transition 2>/dev/null)" = 1 ]; do
    i=$((i + 1)); [ $i -gt 300 ] && return 1; sleep 0.1
  done
}
before=$(cat /proc/cmdline)
insmod ./livepatch-sample.ko || fail "insmod"
settle || fail "transition to patched never finished"
[ "$(cat $lp/enabled)" = 1 ] || fail "enabled is $(cat $lp/enabled)"
echo "OK loaded enabled=$(cat $lp/enabled) transition=$(cat $lp/transition)"
[ "$(cat /proc/cmdline)" = "this has been live patched" ] || fail "cmdline: $(cat /proc/cmdline)"
echo "OK patched cmdline=$(cat /proc/cmdline)"
# 6.1 sysfs: <patch>/<object>/patched, one directory per function "<name>,<sympos>"
[ "$(cat $lp/vmlinux/patched)" = 1 ] || fail "vmlinux not marked patched"
[ -d "$lp/vmlinux/cmdline_proc_show,1" ] || fail "no sysfs entry for cmdline_proc_show"
echo "OK sysfs vmlinux/patched=1 vmlinux/cmdline_proc_show,1"
echo 0 > $lp/enabled || fail "disable"
settle || fail "transition to unpatched never finished"
i=0; while [ -d $lp ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "$lp stays"; sleep 0.1; done
rmmod $name || fail "rmmod"
[ "$(cat /proc/cmdline)" = "$before" ] || fail "cmdline not restored: $(cat /proc/cmdline)"
grep -q "^$name " /proc/modules && fail "module still listed"
echo "OK unloaded cmdline=$(cat /proc/cmdline)"
echo "taint=$(cat /proc/sys/kernel/tainted)"
