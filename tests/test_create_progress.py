"""`create` shows its stages: timestamped lines on a captured stderr, live at a terminal,
nothing with --quiet (issue 13 item 5, "show the work")."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

from livesplice.cli_progress import LiveDisplay, LogLines, create_progress
from livesplice.progress import Stages
from livetest import livesplice

CASE = Path(__file__).resolve().parent / "cases" / "multi-unit"  # two units change
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ livesplice: (?P<stage>[a-z ]+?)"
    r"(?: \.\.\.| done in (?P<seconds>\d+\.\d) s(?: \((?P<extra>[^)]*)\))?)$"
)
STAGES = ["pre build", "patch", "post build", "diff", "package"]


def tree_and_patch(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    shutil.copytree(CASE, tree, ignore=shutil.ignore_patterns("expected.json", "fix.patch"))
    return tree, CASE / "fix.patch"


def test_each_stage_is_logged_in_order_with_its_time_and_quiet_logs_none(tmp_path: Path) -> None:
    tree, patch = tree_and_patch(tmp_path)
    r = livesplice("create", "--patch", str(patch), "-o", str(tmp_path / "a.update"), str(tree))
    events = []
    for line in r.stderr.splitlines():
        m = LINE.match(line)
        assert m, f"not a progress line: {line!r}\n{r.stderr}"
        events.append((m["stage"], "done" if m["seconds"] else "start", m["extra"]))
    assert events == [
        ev
        for stage in STAGES
        for ev in (
            (stage, "start", None),
            (stage, "done", "2/2 objects" if stage == "diff" else None),
        )
    ], r.stderr
    assert r.stdout.startswith("livesplice: wrote update"), r.stdout

    q = livesplice(
        "create", "-q", "--patch", str(patch), "-o", str(tmp_path / "b.update"), str(tree)
    )
    assert q.stderr == "", q.stderr
    assert q.stdout.startswith("livesplice: wrote update"), q.stdout


def test_a_failing_stage_is_logged_as_failed_before_the_error(tmp_path: Path) -> None:
    tree, _ = tree_and_patch(tmp_path)
    bad = tmp_path / "bad.patch"
    bad.write_text((CASE / "fix.patch").read_text().replace("x + 11", "x +"))  # does not compile
    r = livesplice("create", "--patch", str(bad), "-o", str(tmp_path / "u"), str(tree), check=False)
    assert r.returncode == 4, r.stderr
    lines = r.stderr.splitlines()
    failed = [i for i, ln in enumerate(lines) if re.search(r"post build failed after \d", ln)]
    error = [
        i
        for i, ln in enumerate(lines)
        if ln.startswith("livesplice: BUILD_FAILED")
        or ln.startswith("livesplice: the patched tree")
    ]
    assert failed and error and failed[0] < error[0], r.stderr


class Terminal(io.StringIO):
    """What rich sees as a terminal: the live display's frames are written here."""

    def isatty(self) -> bool:
        return True


def test_at_a_terminal_the_display_is_live() -> None:
    screen = Terminal()
    with create_progress(False, screen) as progress:
        assert isinstance(progress, LiveDisplay)
        stages = Stages(progress)
        with stages.stage("pre build"):
            pass
        with stages.stage("diff") as advance:
            advance(1, 3)
            advance(3, 3)
    text = screen.getvalue()
    assert "pre build" in text and "3/3 objects" in text and "✓" in text, text
    assert "\x1b[" in text, "no terminal control sequences: not a live display"

    with create_progress(False, io.StringIO()) as plain:
        assert isinstance(plain, LogLines)
    with create_progress(True, screen) as quiet:
        assert quiet is None
