"""The kernel lab: a real Debian kernel prepared from Debian's packages and booted under QEMU.

The QEMU tests skip, with the reason, when the host tools or the Debian packages are not
available; LIVESPLICE_KERNEL_TESTS=1 turns those skips into failures (CI with the lab set up).
The kernel is prepared once into the user's cache ($LIVESPLICE_CACHE, ~/.cache/livesplice).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_support import FORCED, prepared_lab
from livesplice.kernel.debian import DEFAULT_KERNEL, LabUnavailable, resolve_packages
from livesplice.kernel.guest import Guest, GuestCrashed, console_excerpt
from livesplice.kernel.initramfs import CpioWriter, GuestFile, write_payload
from livesplice.kernel.lab import (
    STAGES,
    LabKernel,
    build_module,
    find_prepared,
    prepare_lab,
)

FIXTURES = Path(__file__).parent / "kernel"
DEFAULT_RELEASE = "6.1.0-50-cloud-amd64"  # what Debian 6.1.176-1 calls itself (uname -r)


@pytest.fixture(scope="module")
def lab() -> LabKernel:
    return prepared_lab()  # type: ignore[no-any-return]


@pytest.fixture
def guest(lab: LabKernel) -> Guest:
    return Guest(lab, timeout=120)


# -- no QEMU needed -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool as an oracle")
def test_payload_archive_unpacks_with_cpio(tmp_path: Path) -> None:
    """Our newc writer against GNU cpio: every file, mode, directory and symlink survives."""
    src = tmp_path / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 3 + b"odd")
    (src / "dir" / "tool").write_text("#!/bin/sh\necho hi\n")
    (src / "dir" / "tool").chmod(0o755)
    (src / "dir" / "link").symlink_to("tool")
    (src / "empty").write_bytes(b"")
    archive = tmp_path / "payload.cpio.gz"
    with archive.open("wb") as f:
        write_payload(
            f,
            "#!/bin/sh\ntrue\n",
            [GuestFile(src / "dir", "d"), GuestFile(src / "empty", "/etc/abs/empty")],
        )
    out = tmp_path / "out"
    out.mkdir()
    gz = subprocess.run(["gzip", "-dc", str(archive)], check=True, capture_output=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=gz, cwd=out, check=True)
    assert (out / "payload/d/sub/data.bin").read_bytes() == bytes(range(256)) * 3 + b"odd"
    assert (out / "payload/d/tool").stat().st_mode & 0o777 == 0o755
    assert os.readlink(out / "payload/d/link") == "tool"
    assert (out / "etc/abs/empty").read_bytes() == b""
    assert (out / "payload/run.sh").read_text() == "#!/bin/sh\ntrue\n"
    assert (out / "payload/run.sh").stat().st_mode & 0o777 == 0o755


def test_cpio_entries_are_4_byte_aligned() -> None:
    """newc pads the name and the data to 4 bytes; the trailer ends on a 512-byte block."""
    import io

    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("a", b"x")  # 110-byte header + "a\0" -> padded to 112, data 1 -> padded to 4
    w.file("bc", b"yz")
    w.close()
    data = buf.getvalue()
    assert data[112:113] == b"x" and data[113:116] == b"\0\0\0"
    assert data[116:122] == b"070701"
    assert len(data) % 512 == 0


def test_console_excerpt_starts_at_the_crash_report() -> None:
    """A long stack trace must not push the panic line out of the excerpt."""
    boot = [f"[    0.{i:06d}] boot message {i}" for i in range(200)]
    crash = ["[    1.000000] Kernel panic - not syncing: sysrq triggered crash"]
    trace = [f"[    1.{i:06d}]  ? frame_{i}+0x1/0x2" for i in range(1, 120)]
    excerpt = console_excerpt("\n".join(boot + crash + trace))
    assert crash[0] in excerpt
    assert excerpt[0] == boot[-3]  # a little context before the report
    assert console_excerpt("\n".join(boot)) == boot[-40:]  # no crash report: the tail


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs APT (Debian)")
def test_unknown_kernel_version_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabUnavailable) as info:
        resolve_packages("6.1.1-99")
    assert info.value.code == 2
    assert "6.1.1-99" in info.value.reason and "APT index" in info.value.reason
    with pytest.raises(LabUnavailable):  # (or: host tools missing) -- either way a clear exit 2
        prepare_lab("6.1.1-99", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-made in the cache


def test_malformed_kernel_version_is_usage_error() -> None:
    from livesplice.errors import UsageError

    with pytest.raises(UsageError, match="not a Debian kernel package version"):
        resolve_packages("six")


# -- the prepared kernel --------------------------------------------------------------------


@pytest.mark.kernel
def test_prepare_is_cached_and_resumes(lab: LabKernel) -> None:
    markers = {s: lab.dir / "stages" / f"{s}.done" for s in STAGES}
    before = {s: m.stat().st_mtime_ns for s, m in markers.items()}
    assert prepare_lab() == lab  # cached: nothing reruns
    assert {s: m.stat().st_mtime_ns for s, m in markers.items()} == before
    assert find_prepared() == lab
    # an interrupted prepare (last marker missing) reruns only that stage
    markers["6-initramfs"].unlink()
    assert find_prepared() is None
    prepare_lab()
    after = {s: m.stat().st_mtime_ns for s, m in markers.items()}
    assert {s: after[s] for s in STAGES[:-1]} == {s: before[s] for s in STAGES[:-1]}
    assert after["6-initramfs"] != before["6-initramfs"]
    uts = (lab.ksrc / "include/generated/utsrelease.h").read_text()
    assert f'"{lab.release}"' in uts
    if lab.packages.version == DEFAULT_KERNEL:
        assert lab.release == DEFAULT_RELEASE


@pytest.mark.kernel
@pytest.mark.slow
def test_boot_and_read_proc_version(lab: LabKernel, guest: Guest) -> None:
    result = guest.run("cat /proc/version; uname -r")
    assert result.status == 0, result.output
    assert f"Linux version {lab.release} " in result.output
    assert result.output.splitlines()[-1] == lab.release
    assert result.uptime_at_init is not None and result.uptime_at_init > 0


@pytest.mark.kernel
@pytest.mark.slow
def test_files_land_and_output_is_exact(guest: Guest, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(50_000))
    expected = subprocess.run(["md5sum", str(blob)], capture_output=True, text=True, check=True)
    result = guest.run(
        "md5sum blob.bin /opt/copy.bin | cut -d' ' -f1; printf 'no newline'",
        [GuestFile(blob, "blob.bin"), GuestFile(blob, "/opt/copy.bin")],
    )
    digest = expected.stdout.split()[0]
    assert result.output == f"{digest}\n{digest}\nno newline"


@pytest.mark.kernel
@pytest.mark.slow
def test_cli_propagates_exit_status(lab: LabKernel) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "livesplice",
            "lab",
            "run",
            "-q",
            "--",
            "echo to-stdout; echo to-stderr >&2; exit 42",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 42, done.stderr
    assert done.stdout == "to-stdout\nto-stderr\n"  # the guest interleaves both on ttyS1


@pytest.mark.kernel
@pytest.mark.slow
def test_kernel_crash_is_reported(lab: LabKernel) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "livesplice",
            "lab",
            "run",
            "-q",
            "--",
            "echo before-crash; echo c > /proc/sysrq-trigger; echo after-crash",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 7, done.stderr  # GuestCrashed -> TARGET_GONE
    assert "GUEST_CRASHED" in done.stderr
    so_far = done.stderr.split("--- command output so far:")[1].split("--- kernel console")[0]
    assert so_far.split() == ["before-crash"]
    assert "Kernel panic - not syncing: sysrq triggered crash" in done.stderr


@pytest.mark.kernel
@pytest.mark.slow
def test_hang_hits_the_timeout(lab: LabKernel) -> None:
    with pytest.raises(GuestCrashed, match="hung"):
        Guest(lab, timeout=8).run("sleep 600")


@pytest.fixture
def livepatch_sample(lab: LabKernel, tmp_path: Path) -> Iterator[Path]:
    """samples/livepatch/livepatch-sample.c built out of tree against the prepared tree."""
    mod = tmp_path / "livepatch-sample"
    mod.mkdir()
    shutil.copy(lab.ksrc / "samples/livepatch/livepatch-sample.c", mod)
    (mod / "Kbuild").write_text("obj-m += livepatch-sample.o\n")
    kos = build_module(lab, mod)
    assert [k.name for k in kos] == ["livepatch-sample.ko"]
    modinfo = subprocess.run(
        ["modinfo", "-F", "vermagic", str(kos[0])], capture_output=True, text=True
    )
    if modinfo.returncode == 0 or FORCED:  # kmod may be absent only when not forced
        assert modinfo.stdout.startswith(f"{lab.release} "), modinfo.stderr
    yield kos[0]


@pytest.mark.kernel
@pytest.mark.slow
def test_livepatch_sample_round_trip(guest: Guest, livepatch_sample: Path) -> None:
    result = guest.run(
        "sh ./livepatch-sample-run.sh",
        [
            GuestFile(livepatch_sample, "livepatch-sample.ko"),
            GuestFile(FIXTURES / "livepatch-sample-run.sh", "livepatch-sample-run.sh"),
        ],
    )
    assert result.status == 0, result.output + result.console[-3000:]
    lines = result.output.splitlines()
    assert "OK patched cmdline=this has been live patched" in lines
    assert "OK sysfs vmlinux/patched=1 vmlinux/cmdline_proc_show,1" in lines
    assert any(line.startswith("OK unloaded cmdline=console=ttyS0 ") for line in lines)
    assert "livepatch: 'livepatch_sample': patching complete" in result.console
