#!/usr/bin/env python3
"""Regenerate the parts of the docs that the code already says, so they cannot drift.

* the module map in docs/ARCHITECTURE.md: one row per module of src/livesplice, from the
  first paragraph of its docstring;
* the exit-code table in README.md and docs/ARCHITECTURE.md: from ``livesplice.errors``
  (``ExitCode`` and ``EXIT_MEANINGS``).

Each generated part sits between ``<!-- generated: NAME (scripts/gen_docs.py) -->`` and
``<!-- end generated: NAME -->``; text outside the markers is left alone.

    scripts/gen_docs.py          rewrite the generated parts in place
    scripts/gen_docs.py --check  exit 1 (naming the file and part) when one is out of date

tests/test_docs.py runs the check, so a new module, a changed module docstring or a new exit
code without the docs regenerated fails the test suite.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "livesplice"
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line ("" when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text(), str(path)))
    if not doc:
        return ""
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def modules() -> list[tuple[str, str]]:
    """(path relative to src/livesplice, summary) of every module, packages' ``__init__``
    included (their docstring says what the package is for)."""
    out: list[tuple[str, str]] = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE).as_posix()
        if "__pycache__" in rel:
            continue
        out.append((rel, _summary(p)))
    return out


def module_map() -> str:
    """The module map: a Markdown table, one row per module."""
    rows = ["| module (src/livesplice/) | what it is |", "|---|---|"]
    for rel, summary in modules():
        cell = summary.replace("|", "\\|")
        rows.append(f"| `{rel}` | {cell} |")
    return "\n".join(rows)


def exit_code_table() -> str:
    """The exit-code table: one row per ``ExitCode`` member, meaning from ``EXIT_MEANINGS``."""
    sys.path.insert(0, str(ROOT / "src"))
    from livesplice.errors import EXIT_MEANINGS, ExitCode

    rows = ["| code | name | meaning |", "|---|---|---|"]
    for code in ExitCode:
        rows.append(f"| {int(code)} | `{code.name}` | {EXIT_MEANINGS.get(code, '')} |")
    return "\n".join(rows)


GENERATORS = {"module map": module_map, "exit codes": exit_code_table}
FILES = {README: ["exit codes"], ARCHITECTURE: ["module map", "exit codes"]}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {re.escape(name)} \(scripts/gen_docs.py\) -->)"
        rf"(.*?)"
        rf"(<!-- end generated: {re.escape(name)} -->)",
        re.S,
    )


def regenerate(text: str, parts: list[str]) -> tuple[str, list[str]]:
    """``text`` with its generated parts rewritten, and the parts that changed or are missing
    (a missing marker is reported, never silently added)."""
    stale = []
    for name in parts:
        pattern = _block(name)
        m = pattern.search(text)
        if m is None:
            stale.append(f"{name} (markers missing)")
            continue
        new = "\n" + GENERATORS[name]() + "\n"
        if m.group(2) != new:
            stale.append(name)
            text = text[: m.start(2)] + new + text[m.end(2) :]
    return text, stale


def problems() -> list[str]:
    """What is out of date, as "FILE: PART" lines (empty: the docs say what the code says)."""
    out: list[str] = []
    for path, parts in FILES.items():
        _, stale = regenerate(path.read_text(), parts)
        out.extend(f"{path.relative_to(ROOT)}: {s}" for s in stale)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="only report what is out of date")
    args = ap.parse_args()
    if args.check:
        bad = problems()
        for b in bad:
            print(f"out of date: {b} (run scripts/gen_docs.py)", file=sys.stderr)
        return 1 if bad else 0
    for path, parts in FILES.items():
        text, stale = regenerate(path.read_text(), parts)
        missing = [s for s in stale if s.endswith("(markers missing)")]
        if missing:
            print(f"{path.relative_to(ROOT)}: {', '.join(missing)}", file=sys.stderr)
            return 1
        if stale:
            path.write_text(text)
            print(f"updated {path.relative_to(ROOT)}: {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
