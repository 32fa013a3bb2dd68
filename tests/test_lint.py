"""The code stays in one shape: ruff's lint rules and ruff's formatter over everything.

The formatter is the only layout authority (no formatter escapes); a change that is not
formatted fails here, so the next reader never sees a diff made of whitespace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["src", "tests", "benchmarks", "scripts", "examples"]


def _ruff() -> list[str]:
    local = Path(sys.executable).with_name("ruff")
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    if not found:
        pytest.fail("ruff is not installed (scripts/bootstrap.sh installs the dev extras)")
    return [found]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_ruff(), *args], cwd=ROOT, capture_output=True, text=True)


def test_lint_rules_pass() -> None:
    done = _run("check", "--output-format", "concise", *TREES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_items_of_the_package_need_a_docstring() -> None:
    """The docstring rule (pyproject's D1 selection) is live for the package: an undocumented
    public function in src/livesplice is an error, so the next one cannot land without."""
    probe = "def splice_probe() -> None:\n    pass\n"
    where = "src/livesplice/lint_probe.py"  # public: a leading underscore would exempt it
    done = subprocess.run(
        [*_ruff(), "check", "--output-format", "concise", "--stdin-filename", where, "-"],
        cwd=ROOT,
        input=probe,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "D103" in done.stdout, done.stdout + done.stderr


def test_everything_is_formatted() -> None:
    done = _run("format", "--check", *TREES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_formatter_escapes() -> None:
    escapes = [
        f"{path.relative_to(ROOT)}:{n}"
        for tree in TREES
        for path in sorted((ROOT / tree).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert not escapes, escapes
