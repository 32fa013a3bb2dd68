"""Targets by identity, not by name (issue 13 item 2), and ``create --verify-against``.

Debian ships ``/usr/bin/redis-server`` as a symlink to ``redis-check-rdb``: the running image
is named redis-check-rdb, and it was built by Debian, not by livesplice (another build-id).
Here the "archive" binary is built by the project's Makefile with other flags than
livesplice's build, stripped, and packed into a real ``.deb`` with that symlink.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from livetest import Running, build, create, livesplice, make_patch, write_tree

FILES = {
    "server.c": (
        "#include <stdio.h>\n#include <unistd.h>\n"
        "int reply(int n);\n"
        'int main(void)\n{\n\tprintf("ready\\n");\n\tfflush(stdout);\n'
        '\tfor (;;) {\n\t\tprintf("reply=%d\\n", reply(7));\n'
        "\t\tfflush(stdout);\n\t\tusleep(20000);\n\t}\n}\n"
    ),
    "reply.c": ("int replies;\nint reply(int n)\n{\n\treplies++;\n\treturn n * 2;\n}\n"),
    "Makefile": (
        "CFLAGS ?= -O2 -g\n"
        "redis-server: server.o reply.o\n\t$(CC) -o $@ server.o reply.o\n"
        "%.o: %.c\n\t$(CC) $(CFLAGS) $(EXTRA) -c -o $@ $<\n"
    ),
}
EDITS = {"reply.c": [("return n * 2;", "return n * 3;")]}


def _archive_build(tree: Path, dest: Path) -> Path:
    """Build as a distribution would (other flags: another build-id), strip, and lay it out
    as Debian does: the program is redis-check-rdb, redis-server a symlink to it."""
    work = dest / "build"
    shutil.copytree(tree, work)
    build(work, "EXTRA=-fno-function-sections -fstack-protector-strong")
    root = dest / "root"
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(work / "redis-server", root / "usr/bin/redis-check-rdb")
    subprocess.run(["strip", "--strip-all", str(root / "usr/bin/redis-check-rdb")], check=True)
    os.symlink("redis-check-rdb", root / "usr/bin/redis-server")
    return root


def _deb(root: Path, out: Path) -> Path:
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: redis-server\nVersion: 5:7.0.15-1~deb12u1\nArchitecture: amd64\n"
        "Maintainer: test <test@example.org>\nDescription: test package\n"
    )
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(root / "DEBIAN")
    return out


def _build_id(path: Path) -> str:
    from livesplice.process.image import gnu_build_id

    return gnu_build_id(str(path))


def test_program_under_another_name_is_found_by_its_code(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "ident1", tmp_path)
    root = _archive_build(tree, tmp_path / "archive")
    prog = Running([str(root / "usr/bin/redis-server")])  # runs as redis-check-rdb
    try:
        prog.wait_for("reply=14")
        assert os.path.basename(os.readlink(f"/proc/{prog.pid}/exe")) == "redis-check-rdb"
        r = livesplice("apply", str(update), "--pid", str(prog.pid))
        assert "by its code" in r.stdout and "redis-check-rdb" in r.stdout, r.stdout
        prog.wait_for("reply=21", timeout=5)
    finally:
        prog.stop()


def test_unrelated_program_is_not_taken_for_the_target(tmp_path: Path) -> None:
    """The fallback by code must not patch a program that merely runs: its code decides."""
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "ident2", tmp_path)
    other = write_tree(tmp_path / "other", FILES)
    (other / "reply.c").write_text((other / "reply.c").read_text().replace("n * 2", "n * 5"))
    root = _archive_build(other, tmp_path / "archive")
    prog = Running([str(root / "usr/bin/redis-server")])
    try:
        prog.wait_for("reply=35")
        before = Path(f"/proc/{prog.pid}/maps").read_text()
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 5, r.stderr  # NO_MATCH
        assert "redis-check-rdb" in r.stderr and "not the update's pre code" in r.stderr
        assert Path(f"/proc/{prog.pid}/maps").read_text() == before
        prog.wait_for("reply=35")
    finally:
        prog.stop()


def test_verify_against_deb_records_the_archive_build_ids(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    root = _archive_build(tree, tmp_path / "archive")
    shipped_id = _build_id(root / "usr/bin/redis-check-rdb")
    deb = _deb(root, tmp_path / "redis-server_7.0.15-1_amd64.deb")
    out = tmp_path / "v.update"
    r = livesplice(
        "create",
        "--patch",
        str(patch),
        "--id",
        "ident3",
        "-o",
        str(out),
        "--verify-against",
        str(deb),
        "--json",
        str(tree),
    )
    verified = json.loads(r.stdout)["verified"]
    assert [(v["target"], v["file"], v["build_id"], v["origin"]) for v in verified] == [
        (
            "redis-server",
            "usr/bin/redis-check-rdb (<- usr/bin/redis-server)",
            shipped_id,
            "Debian redis-server 5:7.0.15-1~deb12u1 (amd64)",
        )
    ]
    info = json.loads(livesplice("inspect", str(out), "--json").stdout)
    assert info["targets"][0]["verified"][0]["build_id"] == shipped_id
    assert verified[0]["functions"] >= 1

    # --all finds the process by the recorded build-id, whatever the file is called
    renamed = tmp_path / "srv" / "some-daemon"
    renamed.parent.mkdir()
    shutil.copy(root / "usr/bin/redis-check-rdb", renamed)
    prog = Running([str(renamed)])
    try:
        prog.wait_for("reply=14")
        r = livesplice("apply", str(out), "--all")
        assert f"pid {prog.pid}" in r.stdout and "verified at create time" in r.stdout, r.stdout
        prog.wait_for("reply=21", timeout=5)
    finally:
        prog.stop()


def test_verify_against_a_binary_the_update_does_not_fit_refuses(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    other = write_tree(tmp_path / "other", FILES)
    (other / "reply.c").write_text((other / "reply.c").read_text().replace("n * 2", "n * 5"))
    root = _archive_build(other, tmp_path / "archive")
    out = tmp_path / "v.update"
    r = livesplice(
        "create",
        "--patch",
        str(patch),
        "--id",
        "ident4",
        "-o",
        str(out),
        "--verify-against",
        str(root),
        str(tree),
        check=False,
    )
    assert r.returncode == 5, r.stderr
    assert (
        "usr/bin/redis-check-rdb (<- usr/bin/redis-server) is redis-server but its code" in r.stderr
    ), r.stderr
    assert not out.exists()
    r = livesplice(
        "create",
        "--patch",
        str(patch),
        "-o",
        str(out),
        "--verify-against",
        str(tmp_path / "nope.deb"),
        str(tree),
        check=False,
    )
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr


def test_repo_add_binary_is_matched_before_it_is_published(tmp_path: Path) -> None:
    """`repo add --binary` tells every machine "this update is for processes running this
    file": the file must fit the update, as apply would check it."""
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    key = tmp_path / "vendor.key"
    livesplice("keygen", "-o", str(key))
    update = create(tree, patch, "ident5", tmp_path, "--sign", str(key))
    repo = tmp_path / "repo"
    livesplice("repo", "init", str(repo), "--key", str(key))
    other = write_tree(tmp_path / "other", FILES)
    (other / "reply.c").write_text((other / "reply.c").read_text().replace("n * 2", "n * 5"))
    bad = _archive_build(other, tmp_path / "bad") / "usr/bin/redis-check-rdb"
    r = livesplice(
        "repo", "add", str(repo), str(update), "--key", str(key), "--binary", str(bad), check=False
    )
    assert r.returncode == 5 and "reply" in r.stderr, r.stderr
    good = _archive_build(tree, tmp_path / "good") / "usr/bin/redis-check-rdb"
    livesplice("repo", "add", str(repo), str(update), "--key", str(key), "--binary", str(good))
    index = json.loads((repo / "index.json").read_text())
    (entry,) = index["updates"]
    assert entry["targets"][0]["shipped"] == [_build_id(good)]


def test_binary_replaced_on_disk_by_an_upgrade(tmp_path: Path) -> None:
    """dpkg installs a new version by renaming over the old file: the running process maps
    a "(deleted)" file. The update is for what runs, read through /proc/PID/map_files."""
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "ident6", tmp_path)
    root = _archive_build(tree, tmp_path / "archive")
    prog = Running([str(root / "usr/bin/redis-server")])
    try:
        prog.wait_for("reply=14")
        newer = root / "usr/bin/redis-check-rdb.dpkg-new"
        newer.write_bytes(b"\x7fELF not the program any more")
        newer.rename(root / "usr/bin/redis-check-rdb")
        assert os.readlink(f"/proc/{prog.pid}/exe").endswith(" (deleted)")
        r = livesplice("apply", str(update), "--pid", str(prog.pid))
        assert "redis-check-rdb" in r.stdout, r.stdout
        prog.wait_for("reply=21", timeout=5)
    finally:
        prog.stop()


def test_program_in_another_mount_namespace(tmp_path: Path) -> None:
    """A container's program: its file is not visible at its path from here."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        import pytest

        pytest.skip("needs unshare and root")
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "ident7", tmp_path)
    root = _archive_build(tree, tmp_path / "archive")
    inside = tmp_path / "container"
    inside.mkdir()
    script = (
        f"mount -t tmpfs none {inside} && cp {root}/usr/bin/redis-check-rdb "
        f"{inside}/redis-server && exec {inside}/redis-server"
    )
    prog = Running(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        prog.wait_for("reply=14")
        assert not (inside / "redis-server").exists()  # not in our mount namespace
        r = livesplice("apply", str(update), "--pid", str(prog.pid))
        assert "redis-server" in r.stdout, r.stdout
        prog.wait_for("reply=21", timeout=5)
    finally:
        prog.stop()


def test_a_program_sharing_code_with_the_target_is_never_taken_for_it(tmp_path: Path) -> None:
    """redis-benchmark links files redis-server does: its code matches the update's pre
    code, but it is not the target. --verify-against records only the file installed under
    the target's name, and `apply --all` patches only the target (found by review: both
    build-ids were recorded, and --all patched the benchmark)."""
    files = dict(FILES)
    files["bench.c"] = (
        "#include <stdio.h>\n#include <unistd.h>\nint reply(int n);\n"
        'int main(void)\n{\n\tfor (;;) {\n\t\tprintf("bench=%d\\n", reply(100));\n'
        "\t\tfflush(stdout);\n\t\tusleep(20000);\n\t}\n}\n"
    )
    files["Makefile"] = FILES["Makefile"].replace(
        "redis-server: server.o reply.o",
        "all: redis-server redis-benchmark\n"
        "redis-benchmark: bench.o reply.o\n\t$(CC) -o $@ bench.o reply.o\n"
        "redis-server: server.o reply.o",
    )
    tree = write_tree(tmp_path / "src", files)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    work = tmp_path / "archive"
    shutil.copytree(tree, work)
    build(work, "EXTRA=-fno-function-sections -fstack-protector-strong")
    for name in ("redis-server", "redis-benchmark"):
        subprocess.run(["strip", "--strip-all", str(work / name)], check=True)
    out = tmp_path / "v.update"
    r = livesplice(
        "create",
        "--patch",
        str(patch),
        "--id",
        "ident8",
        "-o",
        str(out),
        "--target",
        "redis-server",
        "--verify-against",
        str(work),
        "--json",
        str(tree),
    )
    verified = json.loads(r.stdout)["verified"]
    assert [v["file"] for v in verified] == ["redis-server"], verified
    server = Running([str(work / "redis-server")])
    bench = Running([str(work / "redis-benchmark")])
    try:
        server.wait_for("reply=14")
        bench.wait_for("bench=200")
        r = livesplice("apply", str(out), "--all")
        assert f"pid {server.pid}" in r.stdout and f"pid {bench.pid}" not in r.stdout, r.stdout
        server.wait_for("reply=21", timeout=5)
        bench.drain()
        bench.wait_for("bench=200")
    finally:
        server.stop()
        bench.stop()
