"""Docs that cannot drift: the generated parts of README.md and docs/ARCHITECTURE.md agree
with the code (scripts/gen_docs.py), and nothing in the repository points outside it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_docs_are_current() -> None:
    """A new or renamed module, a changed module docstring or a new exit code fails here
    until `scripts/gen_docs.py` is run."""
    assert gen_docs().problems() == []


def test_every_module_is_mapped_with_a_summary() -> None:
    g = gen_docs()
    on_disk = sorted(p.relative_to(g.PACKAGE).as_posix() for p in g.PACKAGE.rglob("*.py"))
    rows = g.modules()
    assert [rel for rel, _ in rows] == on_disk
    assert [rel for rel, summary in rows if not summary] == []
    arch = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", arch, re.M))
    assert named == set(on_disk), (set(on_disk) - named, named - set(on_disk))


def test_every_exit_code_has_a_meaning_and_a_row() -> None:
    from livesplice.errors import EXIT_MEANINGS, ExitCode

    assert set(EXIT_MEANINGS) == set(ExitCode)
    for doc in (ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"):
        text = doc.read_text()
        for code in ExitCode:
            assert f"| {int(code)} | `{code.name}` |" in text, (doc, code)


def test_check_notices_a_stale_part() -> None:
    """The check itself can fail: a table with a row removed is reported stale."""
    g = gen_docs()
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines(keepends=True)
    stale = "".join(line for line in lines if not line.startswith("| 5 |"))
    assert stale != text
    fixed, parts = g.regenerate(stale, ["exit codes"])
    assert parts == ["exit codes"] and fixed == text
    assert g.regenerate("no markers here", ["exit codes"])[1] == ["exit codes (markers missing)"]


def test_no_references_outside_the_repository() -> None:
    """Docs and docstrings name files of this repository only (the workspace around it does
    not exist on a user's machine)."""
    outside = re.compile(r"(?<![\w.])/work/|\.\./shared/")
    hits = []
    for base in ("src", "docs", "scripts", "benchmarks", "tests"):
        for p in (ROOT / base).rglob("*"):
            if p.suffix not in (".py", ".md", ".sh") or p == Path(__file__).resolve():
                continue
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                if outside.search(line):
                    hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    for p in ROOT.glob("*.md"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if outside.search(line):
                hits.append(f"{p.name}:{n}: {line.strip()}")
    assert hits == []
