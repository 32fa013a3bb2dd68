"""New code that calls a library's internal helpers, applied to a stripped library.

The case of issue 13's libcurl4 fix: the patched function now calls a hidden-visibility
function of another unit (``Curl_auth_allowed_to_host``-like) and reads a hidden global that
no pre function of the update referenced. A stripped library has no symbol table, and a
hidden global is a *local* symbol of the linked library even when it is not stripped: the
only way to find them is to ship their pre code in the update and find it by run-pre
matching (Ksplice, "run-pre matching": symbol tables are hints, the code decides).

The running library is built by the project's own Makefile with different flags from
livesplice's build (no -ffunction-sections, another build-id) and stripped, as an archive
binary is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from livetest import Running, build, create, livesplice, make_patch, write_tree

FILES = {
    "util.c": (
        "/* internal helpers: hidden visibility (-fvisibility=hidden) */\n"
        "int parse_limit = 8;\n"
        "int parse_calls;\n"
        "int clamp_len(int n)\n{\n"
        "\tparse_calls++;\n"
        "\treturn n > parse_limit ? parse_limit : n;\n}\n"
        "int count_digits(const char *s)\n{\n"
        "\tint n = 0;\n"
        "\tfor (; *s; s++)\n"
        "\t\tif (*s >= '0' && *s <= '9')\n"
        "\t\t\tn++;\n"
        "\treturn n;\n}\n"
    ),
    "parse.c": (
        "#include <string.h>\n"
        "int count_digits(const char *s);\n"
        "int clamp_len(int n);\n"
        "extern int parse_limit;\n"
        '__attribute__((visibility("default"))) int parse_digits(const char *s)\n{\n'
        "\treturn count_digits(s);\n}\n"
        '__attribute__((visibility("default"))) int parse_len(const char *s)\n{\n'
        "\treturn (int)strlen(s);\n}\n"
    ),
    "host.c": (
        "#include <stdio.h>\n#include <unistd.h>\n"
        "int parse_len(const char *s);\n"
        "int main(void)\n{\n"
        '\tprintf("ready\\n");\n\tfflush(stdout);\n'
        "\tfor (;;) {\n"
        '\t\tprintf("len=%d\\n", parse_len("0123456789abcdef"));\n'
        "\t\tfflush(stdout);\n\t\tusleep(20000);\n\t}\n}\n"
    ),
    "Makefile": (
        "CFLAGS ?= -O2 -g\n"
        "all: libparse.so.1 host\n"
        "libparse.so.1: util.c parse.c\n"
        "\t$(CC) $(CFLAGS) $(LIBFLAGS) -fPIC -fvisibility=hidden -c util.c -o util.o\n"
        "\t$(CC) $(CFLAGS) $(LIBFLAGS) -fPIC -fvisibility=hidden -c parse.c -o parse.o\n"
        "\t$(CC) -shared -Wl,-soname,libparse.so.1 -o $@ util.o parse.o\n"
        "host: host.c libparse.so.1\n"
        "\t$(CC) $(CFLAGS) -o $@ host.c libparse.so.1 -Wl,-rpath,'$$ORIGIN'\n"
    ),
}
# the fix: the length is capped by the library's internal helper, and a hidden global
# (neither referenced by the pre code of parse_len, nor exported, nor named in a stripped
# library) is read directly
EDITS = {
    "parse.c": [
        (
            "\treturn (int)strlen(s);\n",
            "\tint n = clamp_len((int)strlen(s));\n\treturn n + parse_limit * 100;\n",
        )
    ],
}


def _deploy(tree: Path, run: Path, *, libflags: str = "") -> Running:
    """Build as the package would (another build-id than livesplice's), strip, start."""
    shutil.copytree(tree, run)
    build(run, f"LIBFLAGS={libflags} -fno-function-sections")
    subprocess.run(["strip", "--strip-all", str(run / "libparse.so.1")], check=True)
    syms = subprocess.run(["nm", str(run / "libparse.so.1")], capture_output=True, text=True)
    assert "no symbols" in syms.stderr, syms.stdout  # really stripped
    prog = Running([str(run / "host")])
    prog.wait_for("ready")
    prog.wait_for("len=16")
    return prog


def test_fix_calling_hidden_helpers_applies_to_stripped_library(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "hidden1", tmp_path)
    info = json.loads(livesplice("inspect", str(update), "--json").stdout)
    (target,) = info["targets"]
    pre = set(target["pre_functions"])
    # the replaced function, the internal helper it now calls, and a function whose code
    # reveals where the hidden global lives
    assert {"parse_len", "clamp_len"} <= pre, pre

    prog = _deploy(tree, tmp_path / "run")
    try:
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        prog.wait_for("len=808", timeout=5)  # clamp_len(16) = 8, + parse_limit * 100
        livesplice("undo", "hidden1", "--pid", str(prog.pid))
        prog.wait_for("len=16", timeout=5)
        assert prog.alive()
    finally:
        prog.stop()


def test_helper_that_differs_is_refused_untouched(tmp_path: Path) -> None:
    """The running helper is not what the update was built from: refuse, name it, and leave
    the process exactly as it was (no symbol-table guess)."""
    tree = write_tree(tmp_path / "src", FILES)
    patch = make_patch(tree, EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "hidden2", tmp_path)
    other = write_tree(tmp_path / "other", FILES)
    text = (other / "util.c").read_text().replace("parse_calls++;", "parse_calls += 2;")
    (other / "util.c").write_text(text)
    prog = _deploy(other, tmp_path / "run")
    try:
        before = Path(f"/proc/{prog.pid}/maps").read_text()
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode != 0
        assert "NO_MATCH" in r.stderr and "clamp_len" in r.stderr, r.stderr
        assert Path(f"/proc/{prog.pid}/maps").read_text() == before
        prog.wait_for("len=16", timeout=5)
    finally:
        prog.stop()


SERVER = {
    "config.c": (
        "struct config { int port; int max_len; } cfg = { 6379, 5 };\n"
        "int config_port(void)\n{\n\treturn cfg.port;\n}\n"
    ),
    "stats.c": (
        "static long served;\n"
        "long stats_served(long add)\n{\n\tserved += add;\n\treturn served;\n}\n"
    ),
    "handler.c": (
        "long stats_served(long add);\nint handled;\n"
        "int handle(int len)\n{\n\thandled++;\n\treturn len;\n}\n"
    ),
    "server.c": (
        "#include <stdio.h>\n#include <unistd.h>\n"
        "int handle(int len);\nint config_port(void);\n"
        "int main(void)\n{\n"
        '\tprintf("ready %d\\n", config_port());\n\tfflush(stdout);\n'
        '\tfor (;;) {\n\t\tprintf("got=%d\\n", handle(12));\n'
        "\t\tfflush(stdout);\n\t\tusleep(20000);\n\t}\n}\n"
    ),
    "Makefile": (
        "CFLAGS ?= -O2 -g\nOBJS = server.o handler.o config.o stats.o\n"
        "server: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n"
        "%.o: %.c\n\t$(CC) $(CFLAGS) $(EXTRA) -c -o $@ $<\n"
    ),
}
SERVER_EDITS = {
    "handler.c": [
        (
            "int handle(int len)\n{\n\thandled++;\n\treturn len;\n}\n",
            "struct config { int port; int max_len; };\nextern struct config cfg;\n"
            "int handle(int len)\n{\n\thandled++;\n\tstats_served(1);\n"
            "\treturn len > cfg.max_len ? -cfg.max_len : len;\n}\n",
        ),
    ],
}


def test_fix_reading_another_units_global_applies_to_stripped_executable(tmp_path: Path) -> None:
    """A redis-like daemon: the fix reads a global struct of another unit (``server``) and
    calls a function of a third one; the executable exports neither and is stripped."""
    tree = write_tree(tmp_path / "src", SERVER)
    patch = make_patch(tree, SERVER_EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "hidden3", tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tree, run)
    build(run, "EXTRA=-fno-function-sections -fno-omit-frame-pointer")
    subprocess.run(["strip", "--strip-all", str(run / "server")], check=True)
    prog = Running([str(run / "server")])
    try:
        prog.wait_for("ready 6379")
        prog.wait_for("got=12")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        prog.wait_for("got=-5", timeout=5)
    finally:
        prog.stop()


WEAK = {
    "a_default.c": "/* library default, overridable */\n"
    "__attribute__((weak)) int policy(int n) { return n + 1000; }\n",
    "b_app.c": "/* the application's override */\nint policy(int n) { return n * 7 + 1; }\n",
    "c_handler.c": "int handled;\nint handle(int n)\n{\n\thandled++;\n\treturn n;\n}\n",
    "main.c": (
        "#include <stdio.h>\n#include <unistd.h>\nint handle(int n);\nint policy(int n);\n"
        'int main(void)\n{\n\tprintf("ready %d\\n", policy(1)); fflush(stdout);\n'
        '\tfor (;;) { printf("got=%d\\n", handle(3)); fflush(stdout); usleep(20000); }\n}\n'
    ),
    "Makefile": (
        "CFLAGS ?= -O2 -g\nOBJS = main.o a_default.o b_app.o c_handler.o\n"
        "server: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n"
        "%.o: %.c\n\t$(CC) $(CFLAGS) $(EXTRA) -c -o $@ $<\n"
    ),
}
WEAK_EDITS = {
    "c_handler.c": [
        ("int handled;", "int policy(int n);\nint handled;"),
        ("\treturn n;", "\treturn policy(n);"),
    ]
}


def test_a_weak_function_overridden_at_link_time_is_found_through_its_callers(
    tmp_path: Path,
) -> None:
    """The overridden weak copy is still in the file: its pre code would match there, and
    the process would call dead code. A caller's relocation shows the linker's choice."""
    tree = write_tree(tmp_path / "src", WEAK)
    patch = make_patch(tree, WEAK_EDITS, tmp_path / "fix.patch")
    update = create(tree, patch, "weak1", tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tree, run)
    build(run, "EXTRA=-fno-function-sections")
    subprocess.run(["strip", "--strip-all", str(run / "server")], check=True)
    prog = Running([str(run / "server")])
    try:
        prog.wait_for("ready 8")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        prog.wait_for("got=22", timeout=5)  # the override: 3 * 7 + 1, never 1003
    finally:
        prog.stop()
