"""Helpers for end-to-end tests: real C trees, real builds, real running processes.

A test writes a small source tree, derives the fix as a real unified diff (``make_patch``),
builds and starts the program with an ordinary build (the running code is NOT what livesplice
built: it is built by the project's own Makefile, like a deployed binary), and then drives the
``livesplice`` command exactly as a user would.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INCLUDE = REPO / "include"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def make_patch(tree: Path, edits: dict[str, list[tuple[str, str]]], out: Path) -> Path:
    """Apply text replacements to a copy of ``tree`` and write ``diff -u`` as a -p1 patch."""
    a = out.parent / (out.name + ".a")
    b = out.parent / (out.name + ".b")
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
    for name, pairs in edits.items():
        src = (tree / name).read_text() if (tree / name).exists() else ""
        new = src
        for old, repl in pairs:
            assert old in new, f"edit target not found in {name}: {old!r}"
            new = new.replace(old, repl, 1)
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        if src:
            (a / name).write_text(src)
        (b / name).write_text(new)
    r = subprocess.run(
        ["diff", "-ruN", a.name, b.name], cwd=out.parent, capture_output=True, text=True
    )
    text = r.stdout.replace(f"--- {a.name}/", "--- a/").replace(f"+++ {b.name}/", "+++ b/")
    out.write_text(text)
    shutil.rmtree(a)
    shutil.rmtree(b)
    return out


def livesplice(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "livesplice", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in r.stderr, r.stderr
    if check:
        assert r.returncode == 0, f"livesplice {args[0]} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def livesplice_json(*args: str, check: bool = True) -> Any:
    r = livesplice(*args, "--json", check=check)
    return json.loads(r.stdout)


def build(tree: Path, *make_args: str) -> None:
    r = subprocess.run(["make", "-s", "-C", str(tree), *make_args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def create(tree: Path, patch: Path, update_id: str, out_dir: Path, *extra: str) -> Path:
    out = out_dir / f"{update_id}.update"
    livesplice(
        "create", "--patch", str(patch), "--id", update_id, "-o", str(out), *extra, str(tree)
    )
    return out


class Running:
    """A started program whose stdout lines are collected in the background."""

    def __init__(
        self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> str:
        """Next line satisfying predicate (a str = prefix), else fail with what was seen."""
        deadline = time.monotonic() + timeout
        test = (lambda s: s.startswith(predicate)) if isinstance(predicate, str) else predicate
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.all.append(line)
            if test(line):
                return line
        raise AssertionError(
            f"no matching line within {timeout}s; alive={self.alive()} last lines: {self.all[-10:]}"
        )

    def drain(self) -> None:
        while True:
            try:
                self.all.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
