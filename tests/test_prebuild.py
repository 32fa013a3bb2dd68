"""The prebuild cache (issue 13 item 5): a second fix to the same tree skips the pre build,
and the update is byte for byte the one a create without the cache makes.

The project's Makefile logs every compile to $COMPILE_LOG, so each test sees exactly which
units each create compiled, outside anything livesplice reports about itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from livetest import make_patch, write_tree

FILES = {
    "main.c": "int fa(int);\nint fb(int);\nint main(void)\n{\n\treturn fa(1) + fb(2) - 33;\n}\n",
    "a.c": "int fa(int x)\n{\n\treturn x + 10;\n}\n",
    "b.c": "int fb(int x)\n{\n\treturn x * 10;\n}\n",
    "Makefile": "CFLAGS ?= -O2 -g\n"
    "prog: main.o a.o b.o\n\t$(CC) $(CFLAGS) -o $@ $^\n"
    "%.o: %.c\n\techo $< >> $(COMPILE_LOG)\n\t$(CC) $(CFLAGS) -c -o $@ $<\n",
}
FIX_A = {"a.c": [("x + 10", "x + 11")]}
FIX_B = {"b.c": [("x * 10", "x * 11")]}
REUSED = "pre build done in"


class Project:
    """A tree, its compile log and a private prebuild cache."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.tree = write_tree(tmp_path / "src", FILES)
        self.log = tmp_path / "compiles.log"
        self.cache = tmp_path / "cache" / "prebuild"
        self.env = dict(
            os.environ, COMPILE_LOG=str(self.log), LIVESPLICE_PREBUILD_CACHE=str(self.cache)
        )

    def create(
        self,
        fix: dict[str, list[tuple[str, str]]],
        name: str,
        *extra: str,
        code: int = 0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``create --id NAME`` of ``fix``; the compile log is emptied first."""
        self.log.write_text("")
        patch = self.tmp / f"{id(fix)}.patch"  # one patch file per fix: the same bytes
        if not patch.exists():
            make_patch(self.tree, fix, patch)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "livesplice",
                "create",
                "--id",
                name,
                "--patch",
                str(patch),
                "-o",
                str(self.tmp / f"{name}.update"),
                *extra,
                str(self.tree),
            ],
            capture_output=True,
            text=True,
            env=env or self.env,
            timeout=300,
        )
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == code, f"-> {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def compiled(self) -> list[str]:
        return sorted(self.log.read_text().split())

    def entries(self) -> list[Path]:
        return sorted(d for d in self.cache.iterdir() if (d / "meta.json").exists())


def pre_build_line(r: subprocess.CompletedProcess[str]) -> str:
    return next(ln for ln in r.stderr.splitlines() if "pre build done" in ln)


def test_a_second_fix_reuses_the_pre_build_and_makes_the_same_update(tmp_path: Path) -> None:
    p = Project(tmp_path)
    first = p.create(FIX_A, "fixa")
    assert p.compiled() == ["a.c", "a.c", "b.c", "main.c"], "pre build + post build of a.c"
    assert "reused" not in pre_build_line(first)

    second = p.create(FIX_B, "fixb")
    assert p.compiled() == ["b.c"], "the pre build ran again"
    assert "(reused from the prebuild cache)" in pre_build_line(second), second.stderr

    p.create(FIX_B, "fixb-fresh", "--id", "fixb", "--no-prebuild-cache")
    assert p.compiled() == ["a.c", "b.c", "b.c", "main.c"]
    assert (tmp_path / "fixb.update").read_bytes() == (tmp_path / "fixb-fresh.update").read_bytes()
    assert len(p.entries()) == 1  # --no-prebuild-cache kept nothing

    # version-control metadata is not: a new branch in .git still reuses the pre build
    (p.tree / ".git" / "refs" / "heads").mkdir(parents=True)
    (p.tree / ".git" / "refs" / "heads" / "fix-b").write_text("0" * 40 + "\n")
    p.create(FIX_B, "fixb-branch")
    assert p.compiled() == ["b.c"]

    # the source is part of the key: another tree content builds afresh
    (p.tree / "main.c").write_text(FILES["main.c"] + "/* changed */\n")
    p.create(FIX_B, "fixb2")
    assert p.compiled() == ["a.c", "b.c", "b.c", "main.c"]
    # ... and so is the environment a Makefile may read
    p.create(FIX_B, "fixb3", env={**p.env, "CFLAGS": "-O1 -g"})
    assert p.compiled() == ["a.c", "b.c", "b.c", "main.c"]
    assert len(p.entries()) == 3


def test_the_cache_is_bounded_and_private(tmp_path: Path) -> None:
    p = Project(tmp_path)
    p.create(FIX_A, "one")
    entry = p.entries()[0]
    assert (os.stat(p.cache).st_mode & 0o777, os.stat(entry).st_mode & 0o777) == (0o700, 0o700)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["digest"] == entry.name and meta["build_cmd"] == "make", meta

    # an entry whose record another user could have written is not used: built again
    os.chown(entry / "meta.json", 65534, 65534)
    p.create(FIX_B, "two")
    assert p.compiled() == ["a.c", "b.c", "b.c", "main.c"]
    assert os.stat(entry / "meta.json").st_uid == os.geteuid()  # replaced by our own

    # a cache directory others may write to is refused, not used
    os.chmod(p.cache, 0o777)
    r = p.create(FIX_B, "three", code=2)
    assert "cannot be trusted" in r.stderr and str(p.cache) in r.stderr, r.stderr
    p.create(FIX_B, "three", "--no-prebuild-cache")
    os.chmod(p.cache, 0o700)

    # bounded: with room for one entry, storing a new one evicts the older
    (p.tree / "main.c").write_text(FILES["main.c"] + "/* another version */\n")
    p.create(FIX_B, "four", env={**p.env, "LIVESPLICE_PREBUILD_CACHE_MAX": "1"})
    assert [e.name for e in p.entries()] != [entry.name] and len(p.entries()) == 1


def test_an_entry_in_use_is_not_waited_for_and_keep_tmp_keeps_the_tree(tmp_path: Path) -> None:
    p = Project(tmp_path)
    p.create(FIX_A, "one")
    entry = p.entries()[0]
    used = os.stat(entry / "meta.json").st_mtime_ns
    fd = os.open(entry / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another create of this tree is running
        p.create(FIX_B, "two")
        assert p.compiled() == ["a.c", "b.c", "b.c", "main.c"], "built without the cache"
        assert os.stat(entry / "meta.json").st_mtime_ns == used, "the entry was used"
    finally:
        os.close(fd)

    r = p.create(FIX_B, "three", "--keep-tmp")
    assert p.compiled() == ["b.c"]
    kept = Path(r.stdout.split("kept the build directory ", 1)[1].split()[0])
    try:
        assert (kept / "tree" / "b.o").is_file() and (kept / "tree" / "prog").is_file()
        assert not (entry / "site").exists()
    finally:
        shutil.rmtree(kept)
