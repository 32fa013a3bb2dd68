"""The kernel target (livepatch modules built from the running kernel's Debian source, run-pre
matched against /proc/kcore) and the QEMU lab that tests it; see docs/KERNEL.md."""
