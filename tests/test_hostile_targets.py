"""Root's livesplice on a machine shared with an untrusted local user.

The user (created here) cannot touch root's processes, but owns processes and files of their
own: decoy files named like a target, and fake ``/memfd:livesplice:ID`` mappings holding
crafted state records. None of it may crash root's livesplice, make it call code, make it
skip a real target, or make it lie about what is applied.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from livesplice.process import journal
from livetest import Running, livesplice, livesplice_json
from test_apply import BASIC, BASIC_FIX, setup_prog

USER = "lsplice-test"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates a user)")


@pytest.fixture(scope="module")
def user() -> Iterator[pwd.struct_passwd]:
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        time.sleep(0.2)
        subprocess.run(["userdel", "-r", USER], capture_output=True)


# Run as the user: map each given blob as a memfd named livesplice:NAME (r-- for records,
# r-x for ":code"), then watch our own TracerPid: any ptrace attach by root is written down.
# A "record" entry is JSON in which "@LO@"/"@HI@" become the bounds of the code mapping
# mapped just before it: a well-formed record that points only into its own mappings.
FAKER = textwrap.dedent("""\
    import json, mmap, os, struct, sys, time
    spec = json.load(open(sys.argv[1]))
    keep = []
    lo = hi = 0
    for name, kind, data, prot in spec["maps"]:
        if kind == "record":
            body = data.replace('"@LO@"', str(lo)).replace('"@HI@"', str(hi)).encode()
            blob = struct.pack("<16sII", b"LIVESPLICE-STATE", 1, len(body)) + body
        else:
            blob = bytes.fromhex(data) or b"\\xc3"
        fd = os.memfd_create(name, 0)
        os.write(fd, blob.ljust(8192, b"\\0"))
        keep.append(mmap.mmap(fd, 8192, prot=prot))
        os.close(fd)
        with open("/proc/self/maps") as m:
            for line in m:
                if line.rstrip().endswith("/memfd:" + name + " (deleted)"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
    for path in spec.get("files", []):
        f = open(path, "rb")
        keep.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    print("ready", flush=True)
    while True:
        with open("/proc/self/status") as st:
            tracer = [l for l in st if l.startswith("TracerPid:")][0].split()[1]
        if tracer != "0":
            open(spec["marker"], "w").write(tracer)
        time.sleep(0.001)
""")


def raw_record(payload: object) -> str:
    """A record blob (header + payload) as hex."""
    from livesplice.process.state import HEADER, MAGIC, VERSION

    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return (HEADER.pack(MAGIC, VERSION, len(raw)) + raw).hex()


def plausible(uid: str, description: str) -> str:
    """A well-formed record whose hooks would run code of the user's choosing."""
    return json.dumps(
        {
            "id": uid,
            "description": description,
            "sequence": 1,
            "applied_at": 1.0,
            "trampolines": [],
            "code": ["@LO@", "@HI@"],
            "data": [0, 0],
            "hooks": {"pre_reverse": [["evil", "@LO@"]] * 3, "reverse": [["evil", "@LO@"]]},
            "targets": ["prog"],
            "pause_us": 1.0,
            "tool_pid": 1,
            "reverted": False,
            "functions": [],
        }
    )


class Faker:
    """The user's process holding fake mappings; ``traced`` tells whether root attached."""

    def __init__(
        self,
        user: pwd.struct_passwd,
        maps: list[tuple[str, str, str, int]],
        files: tuple[str, ...] = (),
    ) -> None:
        home = Path(user.pw_dir)
        script = home / "faker.py"
        script.write_text(FAKER)
        self.marker = home / "traced"
        self.marker.unlink(missing_ok=True)
        spec = {"maps": maps, "marker": str(self.marker), "files": list(files)}
        spec_file = home / "spec.json"
        spec_file.write_text(json.dumps(spec))
        self.proc = Running(
            ["runuser", "-u", USER, "--", "/usr/bin/python3", str(script), str(spec_file)], cwd=home
        )
        self.proc.wait_for("ready")
        out = subprocess.run(
            ["pgrep", "-u", USER, "-f", "faker.py"], capture_output=True, text=True
        ).stdout.split()
        assert out, "faker not running"
        self.pid = int(out[-1])

    @property
    def traced(self) -> bool:
        return self.marker.exists()

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def stop(self) -> None:
        subprocess.run(["pkill", "-KILL", "-u", USER, "-f", "faker.py"], capture_output=True)
        self.proc.stop()


@pytest.fixture()
def patched(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    from livetest import create

    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "host0001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        yield prog, update
    finally:
        prog.stop()


def test_fake_state_mappings_neither_crash_nor_steer_view_and_undo(
    user: pwd.struct_passwd, tmp_path: Path, patched: tuple[Running, Path]
) -> None:
    prog, update = patched
    import mmap

    rx = mmap.PROT_READ | mmap.PROT_EXEC
    ro = mmap.PROT_READ
    faker = Faker(
        user,
        [
            # same id as the real update, well-formed, hooks in its own code: undo --all must
            # neither call them nor give up on the real process
            ("livesplice:host0001:code", "hex", "c3", rx),
            (
                "livesplice:host0001",
                "record",
                plausible("host0001", "\x1b[2K\rpid 1: CVE-1 [applied]"),
                ro,
            ),
            (
                "livesplice:badtypes",
                "hex",
                raw_record({"id": "badtypes", "sequence": "1", "trampolines": [{"jump": "zz"}]}),
                ro,
            ),
            ("livesplice:huge", "hex", raw_record({"id": "huge", "code": [2**64, 2**64 + 1]}), ro),
            ("livesplice:nested", "hex", raw_record(b"[" * 100000), ro),
            ("livesplice:garbage", "hex", os.urandom(64).hex(), ro),
        ],
    )
    fpid, marker = faker.pid, faker.marker
    try:
        livesplice("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
        prog.drain()
        prog.wait_for("value 2")

        r = livesplice("view", check=False)
        assert r.returncode == 12, r.stdout + r.stderr  # partial: invalid records listed
        assert "\x1b" not in r.stdout + r.stderr
        assert f"pid {prog.pid}: host0001 [applied]" in r.stdout, r.stdout
        assert f"pid {fpid}: badtypes [invalid:" in r.stdout, r.stdout
        assert "not in livesplice's journal" in r.stdout
        doc = livesplice_json("view", check=False)
        rows = {(p["pid"], p["id"]): p for p in doc["processes"]}
        assert rows[(prog.pid, "host0001")]["verified"] is True
        assert rows[(prog.pid, "host0001")]["state"] == "applied"
        assert rows[(fpid, "host0001")]["verified"] is False
        for bad in ("badtypes", "huge", "nested", "garbage"):
            assert rows[(fpid, bad)]["state"].startswith("invalid"), rows[(fpid, bad)]

        t0 = time.monotonic()
        r = livesplice("undo", "host0001", "--all", check=False)
        took = time.monotonic() - t0
        assert r.returncode == 12, r.stdout + r.stderr  # real one undone, fake refused
        assert f"undid host0001 in pid {prog.pid}" in r.stdout
        assert f"pid {fpid}: NO_PERMISSION" in r.stderr, r.stderr
        assert took < 10, took
        prog.drain()
        prog.wait_for("value 1")
        # even named explicitly with the real update as evidence, the fake is refused: the
        # update has no hook "evil"
        r = livesplice(
            "undo", "host0001", "--pid", str(fpid), "--from-target", str(update), check=False
        )
        assert r.returncode == 8 and "does not match the update file" in r.stderr, r.stderr
        assert not marker.exists(), "root's livesplice attached to the user's process"
        assert faker.alive()
        # the undone update left nothing behind: no journal entry, no lock file
        assert not journal.entries_for(prog.pid)
        assert not (journal.run_dir() / f"{prog.pid}.lock").exists()
    finally:
        faker.stop()


def test_decoy_named_like_the_target_does_not_stop_apply_all(
    user: pwd.struct_passwd, tmp_path: Path, patched: tuple[Running, Path]
) -> None:
    prog, update = patched
    decoy = Path(user.pw_dir) / "prog"
    decoy.write_bytes(b"\x7fELF" + os.urandom(4096))
    shutil.chown(decoy, USER)
    faker = Faker(user, [], files=(str(decoy),))
    marker = faker.marker
    try:
        r = livesplice("apply", str(update), "--all", "--allow-unsigned", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"applied host0001 to pid {prog.pid}" in r.stdout
        prog.drain()
        prog.wait_for("value 2")
        assert not marker.exists()
        livesplice("undo", "host0001", "--all")
    finally:
        faker.stop()


def _malformed_program(src_dir: Path, out: Path) -> None:
    """A program that runs fine but whose ELF metadata trips parsers: the build-id note's
    name is not "GNU", and .comment claims 2^45 bytes."""
    from elftools.elf.elffile import ELFFile

    c = src_dir / "decoy.c"
    c.write_text("#include <unistd.h>\nint main(void) { for (;;) pause(); }\n")
    subprocess.run(["gcc", "-O2", "-o", str(out), str(c)], check=True)
    data = bytearray(out.read_bytes())
    with open(out, "rb") as f:
        elf = ELFFile(f)
        for i, sec in enumerate(elf.iter_sections()):
            if sec.name == ".note.gnu.build-id":
                data[sec["sh_offset"] + 12 + 3] = ord("X")
            if sec.name == ".comment":
                hdr = elf["e_shoff"] + i * elf["e_shentsize"]
                data[hdr + 32 : hdr + 40] = (1 << 45).to_bytes(8, "little")
    out.write_bytes(data)


def test_a_running_decoy_with_malformed_elf_metadata_does_not_stop_apply_all(
    user: pwd.struct_passwd, tmp_path: Path, patched: tuple[Running, Path]
) -> None:
    """Found by review: pyelftools' construct errors and a 2^45-byte section were not
    among the errors a hostile file may cause: root's `apply --all` died with a traceback
    before it reached the real target, and the agent with it."""
    prog, update = patched
    home = Path(user.pw_dir)
    decoy = home / "prog"
    _malformed_program(tmp_path, decoy)
    shutil.chown(decoy, USER)
    runner = Running(["runuser", "-u", USER, "--", str(decoy)])
    try:
        time.sleep(0.3)
        assert runner.alive()
        r = livesplice("apply", str(update), "--all", "--allow-unsigned", check=False)
        assert "Traceback" not in r.stderr
        assert f"applied host0001 to pid {prog.pid}" in r.stdout, r.stdout + r.stderr
        prog.drain()
        prog.wait_for("value 2")
        from livesplice.service.client import running_build_ids

        running_build_ids()  # the agent's scan of every process: no exception
        livesplice("undo", "host0001", "--all")
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER, "-f", str(decoy)], capture_output=True)
        runner.stop()


def test_without_the_journal_view_is_read_only_and_undo_needs_from_target(
    patched: tuple[Running, Path],
) -> None:
    prog, update = patched
    livesplice("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
    [entry] = journal.entries_for(prog.pid).values()
    path = journal.journal_dir() / f"{prog.pid}-{entry.start}-host0001.json"
    path.unlink()
    # what --from-target accepts: the real record; forged originals, jumps or hooks: no
    import dataclasses

    from livesplice.errors import NoPermission
    from livesplice.process.apply import check_record_against_update
    from livesplice.update.archive import read_update

    manifest = read_update(update).manifest
    assert entry.record is not None
    check_record_against_update(entry.record, manifest, prog.pid)
    tr = entry.record.trampolines[0]
    for forged in (
        dataclasses.replace(tr, original="cc" + tr.original[2:]),
        dataclasses.replace(tr, jump="e9" + "00000000"),
        dataclasses.replace(tr, function="main"),
        dataclasses.replace(tr, address=tr.replacement),  # not in the program's code
    ):
        rec = dataclasses.replace(entry.record, trampolines=[forged])
        with pytest.raises(NoPermission):
            check_record_against_update(rec, manifest, prog.pid)
    with pytest.raises(NoPermission):
        check_record_against_update(
            dataclasses.replace(entry.record, hooks={"pre_reverse": [("evil", 1)]}),
            manifest,
            prog.pid,
        )
    [row] = livesplice_json("view", "--pid", str(prog.pid))["processes"]
    assert row["state"] == "applied" and row["verified"] is False
    r = livesplice("undo", "host0001", "--pid", str(prog.pid), check=False)
    assert r.returncode == 8 and "--from-target" in r.stderr, r.stderr
    prog.drain()
    prog.wait_for("value 2")  # untouched
    livesplice("undo", "host0001", "--pid", str(prog.pid), "--from-target", str(update))
    prog.drain()
    prog.wait_for("value 1")


def test_journal_entry_of_a_recycled_pid_never_matches(patched: tuple[Running, Path]) -> None:
    prog, update = patched
    livesplice("apply", str(update), "--pid", str(prog.pid), "--allow-unsigned")
    [entry] = journal.entries_for(prog.pid).values()
    d = journal.journal_dir()
    real = d / f"{prog.pid}-{entry.start}-host0001.json"
    stale = d / f"{prog.pid}-{entry.start + 1}-host0001.json"
    real.rename(stale)  # as if written for an earlier process with this pid
    try:
        assert journal.entries_for(prog.pid) == {}
        assert journal.prune() >= 1 and not stale.exists()
    finally:
        if stale.exists():
            stale.rename(real)
    livesplice("undo", "host0001", "--pid", str(prog.pid), "--from-target", str(update))


def test_kernel_threads_zombies_and_unknown_ids_are_clear_errors(tmp_path: Path) -> None:
    r = livesplice("view", "--pid", "2", check=False)
    assert r.returncode == 7 and "kernel thread" in r.stderr, r.stderr
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.3)  # exited, not yet reaped: a zombie
    try:
        r = livesplice("undo", "x", "--pid", str(zombie.pid), check=False)
        assert r.returncode == 7 and "zombie" in r.stderr, r.stderr
    finally:
        zombie.wait()
    r = livesplice("undo", "nosuch01", check=False)
    assert r.returncode == 9 and "nor to any process" in r.stderr, r.stderr
