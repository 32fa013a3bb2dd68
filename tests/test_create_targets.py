"""`create --target`: only the named link outputs decide what the update is, and the other
outputs the patch changes are still reported (a refusal there is a note, not a stop)."""

from __future__ import annotations

import json
from pathlib import Path

from livetest import livesplice, make_patch, write_tree

FILES = {
    "calc.c": "int calc(int x)\n{\n\treturn x + 1;\n}\n",
    "main.c": "int calc(int x);\nint main(void)\n{\n\treturn calc(1) - 2;\n}\n",
    # Only the test binary links this: a changed initial value there is refused.
    "debug.c": "int debug_level = 1;\nint calc(int x);\n"
    "int main(void)\n{\n\treturn calc(debug_level) - 2;\n}\n",
    "Makefile": "all: prog prog-debug\n"
    "prog: main.o calc.o\n\t$(CC) -o $@ main.o calc.o\n"
    "prog-debug: debug.o calc.o\n\t$(CC) -o $@ debug.o calc.o\n"
    "%.o: %.c\n\t$(CC) -O2 -c -o $@ $<\n",
}
EDITS = {
    "calc.c": [("return x + 1;", "return x + 2;")],
    "debug.c": [("int debug_level = 1;", "int debug_level = 2;")],
}


def test_target_limits_what_is_diffed(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    out = tmp_path / "u.update"

    r = livesplice("create", "--patch", str(patch), "-o", str(out), str(tree), check=False)
    assert r.returncode == 3 and "debug_level" in r.stderr, r.stderr

    r = livesplice("create", "--patch", str(patch), "-o", str(out), "--target", "prog", str(tree))
    # prog-debug is not in the update, but what the patch does to it is said, refusal included
    note = r.stdout[r.stdout.index("also changes") :]
    assert "prog-debug (executable): changed calc" in note, r.stdout
    assert "debug_level" in note and "initial value" in note, r.stdout
    info = json.loads(livesplice("inspect", str(out), "--json").stdout)
    assert [(t["name"], t["changed_functions"]) for t in info["targets"]] == [("prog", ["calc"])]

    r = livesplice(
        "create", "--patch", str(patch), "-o", str(out), "--target", "nope", str(tree), check=False
    )
    assert r.returncode == 2 and "prog-debug" in r.stderr and "nope" in r.stderr, r.stderr
