"""User space: a header-only patch must recompile every unit reading the header, at any depth.

make rebuilds what its rules name. A Makefile that lists no header prerequisites (common in
hand-written ones) recompiles nothing after a header patch; the update would then say "no
change" while the running code still has the old inline function. create must stop with
BUILD_FAILED naming the header and the unit, not produce that update.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from livesplice.build.builder import build_pair
from livesplice.build.headerdeps import preprocess_argv
from livesplice.errors import BuildFailed

MAIN = '#include "outer.h"\nint main(void) { return twice(21) == 42 ? 0 : 1; }\n'
OUTER = '#include "inner.h"\n'
INNER = "static inline int twice(int x) { return x * 2; }\n"
PATCH = """\
--- a/inner.h
+++ b/inner.h
@@ -1 +1 @@
-static inline int twice(int x) { return x * 2; }
+static inline int twice(int x) { return x + x + 0 * (x > 100); }
"""


def tree(tmp_path: Path, rule: str) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.c").write_text(MAIN)
    (src / "outer.h").write_text(OUTER)
    (src / "inner.h").write_text(INNER)
    (src / "Makefile").write_text(f"prog: main.o\n\t$(CC) -o $@ main.o\n{rule}\n")
    patch = tmp_path / "inner.patch"
    patch.write_text(PATCH)
    return src, patch


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="gcc")
def test_makefile_without_header_rules_is_refused(tmp_path: Path) -> None:
    src, patch = tree(tmp_path, "main.o: main.c")  # inner.h reached through outer.h only
    (tmp_path / "w").mkdir()
    with pytest.raises(BuildFailed) as e:
        build_pair(src, patch, build_cmd="make", workdir=tmp_path / "w", jobs=2)
    assert e.value.details == [
        "inner.h (read by main.c): patched, but no unit compiled from it was rebuilt"
    ], e.value.details
    assert e.value.code == 4


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="gcc")
def test_makefile_with_header_rules_rebuilds(tmp_path: Path) -> None:
    src, patch = tree(tmp_path, "main.o: main.c outer.h inner.h")
    (tmp_path / "w").mkdir()
    pair = build_pair(src, patch, build_cmd="make", workdir=tmp_path / "w", jobs=2)
    assert [u.source for u in pair.units] == ["main.c"]
    assert pair.touched_files == ["inner.h"]


def test_preprocess_argv_drops_outputs_keeps_search_path() -> None:
    argv = ["gcc", "-Iinc", "-DX=1", "-MD", "-MF", "m.d", "-c", "-o", "m.o", "m.c", "-omore"]
    assert preprocess_argv(argv) == ["gcc", "-Iinc", "-DX=1", "m.c", "-M", "-MG", "-w"]
