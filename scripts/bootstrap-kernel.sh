#!/usr/bin/env bash
# Idempotent host set-up for the kernel lab (`livesplice lab ...`, tests/test_kernel_lab.py):
# QEMU (TCG only: KVM hangs on these machines, see docs/KERNEL.md), busybox-static for the
# guest initramfs, and what a Debian kernel tree needs to prepare and build modules
# (gcc-12 = the compiler Debian's 6.1 image was built with; dwarves = pahole for BTF).
# Nothing kernel-specific is downloaded here: `livesplice lab prepare` does that into its cache.
set -euo pipefail

need=()
for pkg in qemu-system-x86 busybox-static gcc-12 binutils dwarves lz4 libelf-dev libssl-dev \
           bison flex bc cpio kmod make xz-utils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap-kernel: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  # --no-install-recommends: qemu-system-x86 recommends a GUI stack the lab never uses.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >&2
fi
