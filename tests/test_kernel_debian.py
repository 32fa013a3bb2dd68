"""Debian kernels other than the default one: older versions, the ``amd64`` flavour, modules.

Debian keeps ``linux-kbuild-6.1`` in the archive only for its newest kernel; the lab must not
need it, or every older kernel (where most fixes a user wants to try live) cannot be
prepared. 6.1.187-1 is such a version. The QEMU test prepares it (``amd64`` flavour, cached
beside the default kernel; the source .deb is shared with other cache entries of that version)
and skips, with the reason, when the lab cannot run; LIVESPLICE_KERNEL_TESTS=1 makes the skip
a failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_support import kernel_unavailable
from livesplice.errors import UsageError
from livesplice.kernel.debian import _madison, resolve_packages

OLDER = "6.1.187-1"  # image, headers and source in the archive; linux-kbuild-6.1 of it gone
needs_apt = pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs APT (Debian)")


@needs_apt
def test_older_kernel_resolves_without_kbuild() -> None:
    pkgs = resolve_packages(OLDER, "amd64")
    assert pkgs.release.endswith("-amd64") and not pkgs.release.endswith("cloud-amd64")
    assert f"linux-image-{pkgs.release}" in pkgs.names
    assert not any(n.startswith("linux-kbuild") for n in pkgs.names)
    # the reason this matters: the archive has no linux-kbuild of this version
    present = _madison(["linux-kbuild-6.1"])["linux-kbuild-6.1"]
    if present and OLDER in present:
        pytest.skip(f"the archive has linux-kbuild-6.1={OLDER} again: nothing to prove")


def test_unknown_flavour_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown kernel flavour 'rt-arm64'") as info:
        resolve_packages(OLDER, "rt-arm64")
    assert info.value.code == 2 and "--flavour amd64" in info.value.advice


def test_view_lists_a_kernel_update_without_saying_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A machine with one kernel update and no process updates: view lists the update and
    does not first say "no updates applied". The sysfs tree is a copy of livepatch's layout:
    the host kernel may not have livepatch, and the QEMU guest test cannot see stdout order
    of a process-only line as cheaply."""
    from livesplice import cli
    from livesplice.kernel import target

    patch = tmp_path / "livesplice_fix1"
    (patch / "vmlinux" / "cmdline_proc_show,1").mkdir(parents=True)
    (patch / "enabled").write_text("1\n")
    (patch / "transition").write_text("0\n")
    monkeypatch.setattr(target, "LIVEPATCH", tmp_path)
    args = argparse.Namespace(pid=[], json=False)
    cli.cmd_view(args)
    out = capsys.readouterr().out
    assert "no updates applied" not in out, out
    assert "kernel update fix1 (livesplice_fix1): enabled" in out, out
    assert "vmlinux:cmdline_proc_show,1" in out, out
    shutil.rmtree(patch)
    cli.cmd_view(args)
    out = capsys.readouterr().out  # nothing anywhere: both say so
    assert "no updates applied to processes" in out and "no kernel updates applied" in out


@pytest.mark.kernel
@pytest.mark.slow
def test_older_amd64_kernel_prepares_boots_and_loads_modules() -> None:
    """``lab run --kernel 6.1.187-1 --flavour amd64 --modules sctp``: prepared without the
    kbuild package (host tools built from the tree), booted, sctp and its dependencies loaded
    by modprobe before the command."""
    from livesplice.kernel.debian import LabUnavailable
    from livesplice.kernel.lab import missing_host_tools, prepare_lab

    if missing_host_tools():
        kernel_unavailable(f"kernel lab host tools missing: {', '.join(missing_host_tools())}")
    try:
        lab = prepare_lab(OLDER, "amd64", progress=lambda m: print(m, file=sys.stderr))
    except LabUnavailable as e:
        kernel_unavailable(e.render())
    assert not any(lab.dir.joinpath("debs").glob("linux-kbuild*"))
    assert (lab.ksrc / "scripts" / "mod" / "modpost").is_file()  # built from the tree
    cmd = [
        sys.executable,
        "-m",
        "livesplice",
        "lab",
        "run",
        "-q",
        "--kernel",
        OLDER,
        "--flavour",
        "amd64",
        "--modules",
        "sctp",
        "--",
        "uname -r; cut -d' ' -f1 /proc/modules",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split()
    assert lines[0] == lab.release == "6.1.0-53-amd64", done.stdout
    # libcrc32c needs crc32c first (softdep; a module on amd64, built in on cloud-amd64)
    assert {"sctp", "libcrc32c", "crc32c_generic"} <= set(lines), done.stdout
    # a module the image does not have is a clear usage error before any boot
    bad = subprocess.run([*cmd[:11], "no_such_mod", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "module no_such_mod is not in the" in bad.stderr, bad.stderr


@pytest.mark.kernel
def test_builtin_softdep_loads_no_module() -> None:
    """On cloud-amd64 crc32c is built in: libcrc32c's softdep must not pull the one module
    with that alias, crc32c-intel, which fails to load on the lab's qemu64 CPU (no SSE4.2)."""
    from kernel_support import prepared_lab
    from livesplice.kernel.modules import builtin_names, resolve_modules

    lab = prepared_lab()
    assert "crc32c" in builtin_names(lab)
    names = [n for n, _ko in resolve_modules(lab, ["sctp"])]
    assert "libcrc32c" in names and not any(n.startswith("crc32c") for n in names), names
