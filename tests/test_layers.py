"""The engine never prints, exits or reads command-line arguments: only the CLI layer does.

docs/ARCHITECTURE.md promises that create, process/ and kernel/ return reports and raise
typed errors, and that the CLI layer alone turns them into words and exit codes -- so a
service, the agent or a test calling the engine gets the same behaviour without output on
its terminal. This reads every module of the package (AST, no import) and fails on a
``print``, a ``sys.exit`` or an ``argparse.Namespace`` outside the modules allowed below.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "livesplice"

# module (relative to src/livesplice) -> why it may talk to a person or a shell itself
ALLOWED = {
    "cli.py": "the command's entry point",
    "cli_kernel.py": "the kernel target's words and exit codes",
    "cli_lab.py": "the lab's words and exit codes",
    "cli_process.py": "the process target's words and exit codes",
    "cli_progress.py": "shows progress on stderr for the CLI",
    "service/cli.py": "the service commands' words and exit codes",
    "service/agent.py": "the agent daemon's event log (JSON lines on stdout/stderr)",
    "build/wrapper.py": "a program of its own: the build runs it as the compiler",
    "demo.py": "``python -m livesplice.demo`` shows a person each step",
    "service/demo.py": "``python -m livesplice.service.demo``, the same for the service",
    "eval/__main__.py": "``python -m livesplice.eval``: the evaluation's command",
    "eval/kernel.py": "``python -m livesplice.eval.kernel``: the kernel evaluation's command",
}


def _talks(tree: ast.AST) -> list[tuple[int, str]]:
    """Lines that print, exit the process or take parsed command-line arguments."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "print":
                found.append((node.lineno, "print()"))
            continue
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if (node.value.id, node.attr) in (("sys", "exit"), ("argparse", "Namespace")):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_only_the_cli_layer_prints_and_exits() -> None:
    offenders = [
        f"{rel}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (rel := path.relative_to(PACKAGE).as_posix()) not in ALLOWED
        for line, what in _talks(ast.parse(path.read_text(), str(path)))
    ]
    assert not offenders, offenders


def test_the_check_sees_what_it_looks_for() -> None:
    """The check itself can fail: each form it looks for is found in a sample."""
    sample = "import sys, argparse\nprint(1)\nsys.exit(2)\ndef f(a: argparse.Namespace): ...\n"
    assert [what for _, what in _talks(ast.parse(sample))] == [
        "print()",
        "sys.exit",
        "argparse.Namespace",
    ]


def test_every_allowed_module_exists() -> None:
    """A renamed or removed module must leave the list too (no stale exemptions)."""
    assert [m for m in ALLOWED if not (PACKAGE / m).is_file()] == []
