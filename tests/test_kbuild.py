"""kernel/kbuild.py pieces that need no kernel tree: a failed compile names a log that exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from livesplice.errors import BuildFailed
from livesplice.kernel.kbuild import compile_units


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_build_failed_names_a_log_that_outlives_the_workdir(tmp_path: Path) -> None:
    """The work directory is removed before the error reaches the user (issue 12 item 5).

    A tree whose Makefile fails every object stands in for a kbuild failure; after the work
    directory is gone, the path in "full log: ..." must still hold the compiler's output.
    """
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text("%.o:\n\t@echo 'broken.c:1: error: expected ;'; false\n")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BuildFailed) as exc:
        compile_units(tree, ["lib/broken.c"], dict(os.environ), 1, work / "build.log")
    shutil.rmtree(work)
    advice = str(exc.value.advice)
    assert advice.startswith("full log: ")
    kept = Path(advice.removeprefix("full log: "))
    try:
        assert "expected ;" in kept.read_text()
        assert kept.stat().st_mode & 0o077 == 0  # not readable by other users of /tmp
    finally:
        kept.unlink()
