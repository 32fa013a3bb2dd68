"""End to end: create an update from a patch, splice it into a RUNNING process, view, undo.

Every test builds a real program with its own Makefile (an ordinary build, not livesplice's),
runs it, and checks the observable behaviour before, during and after the update.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from livetest import Running, build, create, livesplice, livesplice_json, make_patch, write_tree

MAKEFILE = """\
CC ?= gcc
CFLAGS ?= -O2 -g
prog: prog.c
\t$(CC) $(CFLAGS) $(EXTRA_CFLAGS) -o $@ prog.c -lpthread $(EXTRA_LDFLAGS)
"""

BASIC = """\
#include <stdio.h>
#include <unistd.h>

int base = 1;

__attribute__((noinline)) int answer(int x)
{
\treturn x + base;
}

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tprintf("ready %d\\n", (int)getpid());
\tfor (int i = 0;; i++) {
\t\tprintf("value %d\\n", answer(i) - i);
\t\tusleep(2000);
\t}
}
"""
BASIC_FIX = {"prog.c": [("return x + base;", "return x + base + 1;")]}


def setup_prog(
    tmp_path: Path, source: str, edits: dict[str, list[tuple[str, str]]], *make_args: str
) -> tuple[Path, Path]:
    tree = write_tree(tmp_path / "src", {"prog.c": source, "Makefile": MAKEFILE})
    patch = make_patch(tree, edits, tmp_path / "fix.patch")
    running = write_tree(tmp_path / "run", {"prog.c": source, "Makefile": MAKEFILE})
    build(running, *make_args)
    return tree, patch


@pytest.mark.parametrize(
    "variant,make_args",
    [
        ("pie", ()),
        ("nopie", ("EXTRA_CFLAGS=-fno-pie", "EXTRA_LDFLAGS=-no-pie")),
    ],
)
def test_apply_view_undo_basic(tmp_path: Path, variant: str, make_args: tuple[str, ...]) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX, *make_args)
    update = create(tree, patch, "basic001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("ready")
        prog.wait_for("value 1")
        out = livesplice_json("apply", str(update), "--pid", str(prog.pid))
        assert out["processes"][0]["status"] == "applied"
        assert out["processes"][0]["pause_us"] > 0
        prog.wait_for("value 2")
        view = livesplice_json("view", "--pid", str(prog.pid))
        [entry] = view["processes"]
        assert entry["id"] == "basic001" and entry["state"] == "applied"
        assert entry["functions"] == ["answer"]
        maps = Path(f"/proc/{prog.pid}/maps").read_text()
        assert "/memfd:livesplice:basic001" in maps
        livesplice("undo", "basic001", "--pid", str(prog.pid))
        prog.wait_for("value 1")
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
        assert prog.alive()
    finally:
        prog.stop()


def test_stripped_binary(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    subprocess.run(["strip", str(tmp_path / "run" / "prog")], check=True)
    update = create(tree, patch, "strip001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("value 2")
    finally:
        prog.stop()


def test_wrong_source_version_is_refused(tmp_path: Path) -> None:
    """The running program was built from different source: NO_MATCH, process untouched."""
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    other = BASIC.replace("return x + base;", "return x + base * 3;")
    running = write_tree(tmp_path / "run2", {"prog.c": other, "Makefile": MAKEFILE})
    build(running)
    update = create(tree, patch, "wrong001", tmp_path)
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 3")
        before = Path(f"/proc/{prog.pid}/maps").read_text()
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 5, r.stdout + r.stderr
        assert "NO_MATCH" in r.stdout + r.stderr and "answer" in r.stdout + r.stderr
        assert Path(f"/proc/{prog.pid}/maps").read_text() == before
        prog.wait_for("value 3")
    finally:
        prog.stop()


def test_missing_pid(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "gone0001", tmp_path)
    r = livesplice("apply", str(update), "--pid", "999999999", check=False)
    assert r.returncode == 7
    assert "no process" in r.stdout + r.stderr


BUSY = """\
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

volatile int stop;
int base = 1;

__attribute__((noinline)) int spin(void)
{
\tunsigned long n = 0;
\twhile (!stop)
\t\tn++;
\treturn (int)n + base;
}

static void *worker(void *arg)
{
\t(void)arg;
\tpthread_setname_np(pthread_self(), "spinner");
\treturn (void *)(long)spin();
}

int main(void)
{
\tpthread_t t;
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tpthread_create(&t, NULL, worker, NULL);
\tfor (int i = 0;; i++) {
\t\tprintf("tick %d\\n", i);
\t\tusleep(5000);
\t}
}
"""


def test_thread_that_never_leaves_is_code_busy(tmp_path: Path) -> None:
    tree, patch = setup_prog(
        tmp_path, BUSY, {"prog.c": [("return (int)n + base;", "return (int)n + base + 1;")]}
    )
    update = create(tree, patch, "busy0001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("tick 3")
        r = livesplice(
            "apply",
            str(update),
            "--pid",
            str(prog.pid),
            "--retries",
            "3",
            "--retry-interval",
            "0.1",
            check=False,
        )
        assert r.returncode == 6, r.stdout + r.stderr
        text = r.stdout + r.stderr
        assert "CODE_BUSY" in text and "spin" in text and "spinner" in text
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
        prog.drain()
        prog.wait_for(lambda s: s.startswith("tick"))
    finally:
        prog.stop()


THREADS = """\
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define NTHREADS 64
int base = 1;
volatile long results[NTHREADS];

__attribute__((noinline)) int answer(int x)
{
\treturn x + base;
}

__attribute__((noinline)) int around(int x)
{
\treturn answer(x) + answer(x + 1) - x - 1;
}

static void *worker(void *arg)
{
\tlong id = (long)arg;
\tfor (int i = 0;; i++) {
\t\tresults[id] = around(i) - i;
\t\tif ((i & 1023) == 0)
\t\t\tusleep(100);
\t}
\treturn NULL;
}

int main(void)
{
\tpthread_t t;
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (long i = 0; i < NTHREADS; i++)
\t\tpthread_create(&t, NULL, worker, (void *)i);
\tfor (;;) {
\t\tusleep(20000);
\t\tlong lo = results[0], hi = results[0];
\t\tfor (int i = 1; i < NTHREADS; i++) {
\t\t\tif (results[i] < lo) lo = results[i];
\t\t\tif (results[i] > hi) hi = results[i];
\t\t}
\t\tprintf("range %ld %ld\\n", lo, hi);
\t}
}
"""


def test_64_threads_in_and_around_patched_function(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, THREADS, BASIC_FIX)
    update = create(tree, patch, "thr00064", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("range 2 2")
        out = livesplice_json(
            "apply",
            str(update),
            "--pid",
            str(prog.pid),
            "--retries",
            "20",
            "--retry-interval",
            "0.05",
        )
        assert out["processes"][0]["status"] == "applied", out
        assert out["processes"][0]["threads"] >= 65
        prog.wait_for("range 4 4", timeout=20)
        livesplice(
            "undo",
            "thr00064",
            "--pid",
            str(prog.pid),
            "--retries",
            "20",
            "--retry-interval",
            "0.05",
        )
        prog.wait_for("range 2 2", timeout=20)
        assert prog.alive()
    finally:
        prog.stop()


def test_stacking_and_undo_in_reverse_order(tmp_path: Path) -> None:
    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    first = create(tree, patch, "stack001", tmp_path)
    # The second update is made against the tree with the first fix applied.
    tree2 = write_tree(
        tmp_path / "src2",
        {
            "prog.c": BASIC.replace("return x + base;", "return x + base + 1;"),
            "Makefile": MAKEFILE,
        },
    )
    patch2 = make_patch(
        tree2,
        {"prog.c": [("return x + base + 1;", "return x + base + 5;")]},
        tmp_path / "fix2.patch",
    )
    second = create(tree2, patch2, "stack002", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        # The second update does not match the original code: refused until the first is in.
        r = livesplice("apply", str(second), "--pid", str(prog.pid), check=False)
        assert r.returncode == 5, r.stdout + r.stderr
        livesplice("apply", str(first), "--pid", str(prog.pid))
        prog.wait_for("value 2")
        livesplice("apply", str(second), "--pid", str(prog.pid))
        prog.wait_for("value 6")
        view = livesplice_json("view", "--pid", str(prog.pid))
        assert [(p["id"], p["state"]) for p in view["processes"]] == [
            ("stack001", "applied"),
            ("stack002", "applied"),
        ]
        r = livesplice("undo", "stack001", "--pid", str(prog.pid), check=False)
        assert r.returncode == 2 and "stack002" in r.stderr + r.stdout
        livesplice("undo", "stack002", "--pid", str(prog.pid))
        prog.wait_for("value 2")
        livesplice("undo", "stack001", "--pid", str(prog.pid))
        prog.wait_for("value 1")
    finally:
        prog.stop()


LIB_C = """\
#include <string.h>

static int scale = 10;

int calc_answer(int x)
{
\treturn x * scale + 1;
}

int calc_len(const char *s)
{
\treturn (int)strlen(s);
}
"""
LIB_MAIN = """\
#include <stdio.h>
#include <unistd.h>

int calc_answer(int x);

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tprintf("lib %d\\n", calc_answer(i) - i * 10);
\t\tusleep(2000);
\t}
}
"""
LIB_MAKEFILE = """\
CC ?= gcc
CFLAGS ?= -O2 -g
all: prog libcalc.so.1
libcalc.so.1: calc.c
\t$(CC) $(CFLAGS) -fPIC -shared -Wl,-soname,libcalc.so.1 -o $@ calc.c
prog: main.c libcalc.so.1
\t$(CC) $(CFLAGS) -o $@ main.c ./libcalc.so.1 -Wl,-rpath,'$$ORIGIN'
"""


def test_shared_library_in_several_processes(tmp_path: Path) -> None:
    files = {"calc.c": LIB_C, "main.c": LIB_MAIN, "Makefile": LIB_MAKEFILE}
    tree = write_tree(tmp_path / "src", files)
    patch = make_patch(
        tree,
        {"calc.c": [("return x * scale + 1;", "return x * scale + 2;")]},
        tmp_path / "fix.patch",
    )
    running = write_tree(tmp_path / "run", files)
    build(running)
    update = create(tree, patch, "shlib001", tmp_path)
    progs = [Running([str(running / "prog")]) for _ in range(3)]
    try:
        for p in progs:
            p.wait_for("lib 1")
        out = livesplice_json("apply", str(update), "--all")
        assert sorted(p["pid"] for p in out["processes"] if p["status"] == "applied") == sorted(
            p.pid for p in progs
        )
        for p in progs:
            p.wait_for("lib 2")
        livesplice("undo", "shlib001", "--all")
        for p in progs:
            p.wait_for("lib 1")
    finally:
        for p in progs:
            p.stop()


FEATURES = """\
#include <stdio.h>
#include <string.h>
#include <unistd.h>

__thread int tls_calls;
int base = 1;

struct op {
\tconst char *name;
\tint (*fn)(int);
};

static int op_inc(int x) { return x + base; }
static int op_dbl(int x) { return 2 * x; }

struct op ops[] = { { "inc", op_inc }, { "dbl", op_dbl } };

__attribute__((noinline)) int counted(int x)
{
\ttls_calls++;
\treturn x + tls_calls - tls_calls;
}

__attribute__((noinline)) int label_len(const char *s)
{
\treturn (int)strlen(s);
}

int main(void)
{
\tchar buf[64];
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tsnprintf(buf, sizeof(buf), "item-%d", i % 10);
\t\tprintf("inc %d tls %d len %d\\n", ops[0].fn(i) - i, counted(i) - i, label_len(buf));
\t\tusleep(2000);
\t}
}
"""


def test_function_pointers_tls_and_ifunc(tmp_path: Path) -> None:
    """A callback reached through a function pointer in data; a changed function that uses an
    existing TLS variable; a new call to an IFUNC-resolved libc function (memchr)."""
    tree, patch = setup_prog(
        tmp_path,
        FEATURES,
        {
            "prog.c": [
                (
                    "static int op_inc(int x) { return x + base; }",
                    "static int op_inc(int x) { return x + base + 1; }",
                ),
                (
                    "\treturn x + tls_calls - tls_calls;",
                    "\treturn x + (tls_calls > 0) + tls_calls - tls_calls;",
                ),
                (
                    "\treturn (int)strlen(s);",
                    "\tconst char *dash = memchr(s, '-', strlen(s));\n\treturn dash ? (int)(dash - s) : -1;",  # noqa: E501
                ),
            ]
        },
    )
    update = create(tree, patch, "feat0001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("inc 1 tls 0 len 6")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("inc 2 tls 1 len 4")
        livesplice("undo", "feat0001", "--pid", str(prog.pid))
        prog.wait_for("inc 1 tls 0 len 6")
    finally:
        prog.stop()


BLOCKED = """\
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

int base = 1;

__attribute__((noinline)) int transform(int c)
{
\treturn c + base;
}

static int pipes[2][2];

static void *reader(void *arg)
{
\t(void)arg;
\tchar c;
\tfor (;;) {
\t\tssize_t n = read(pipes[0][0], &c, 1);
\t\tif (n < 0) {
\t\t\tprintf("read error %s\\n", strerror(errno));
\t\t\tcontinue;
\t\t}
\t\tprintf("read %d\\n", transform(c) - c);
\t}
\treturn NULL;
}

static void *poller(void *arg)
{
\t(void)arg;
\tint ep = epoll_create1(0);
\tstruct epoll_event ev = { .events = EPOLLIN }, out;
\tchar c;
\tepoll_ctl(ep, EPOLL_CTL_ADD, pipes[1][0], &ev);
\tfor (;;) {
\t\tint n = epoll_wait(ep, &out, 1, -1);
\t\tif (n < 0) {
\t\t\tprintf("epoll error %s\\n", strerror(errno));
\t\t\tcontinue;
\t\t}
\t\tif (read(pipes[1][0], &c, 1) == 1)
\t\t\tprintf("polled %d\\n", transform(c) - c);
\t}
\treturn NULL;
}

int main(void)
{
\tpthread_t t;
\tchar line[16];
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tpipe(pipes[0]);
\tpipe(pipes[1]);
\tpthread_create(&t, NULL, reader, NULL);
\tpthread_create(&t, NULL, poller, NULL);
\tprintf("ready\\n");
\twhile (fgets(line, sizeof(line), stdin)) {
\t\twrite(pipes[line[0] == 'p'][1], "x", 1);
\t}
\treturn 0;
}
"""


def test_threads_blocked_in_read_and_epoll_see_no_eintr(tmp_path: Path) -> None:
    tree, patch = setup_prog(
        tmp_path, BLOCKED, {"prog.c": [("return c + base;", "return c + base + 1;")]}
    )
    update = create(tree, patch, "block001", tmp_path)
    prog = subprocess.Popen(
        [str(tmp_path / "run" / "prog")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert prog.stdin is not None and prog.stdout is not None
    try:
        assert prog.stdout.readline().strip() == "ready"
        prog.stdin.write("r\np\n")
        prog.stdin.flush()
        got = {prog.stdout.readline().strip() for _ in range(2)}
        assert got == {"read 1", "polled 1"}
        livesplice("apply", str(update), "--pid", str(prog.pid))
        livesplice("undo", "block001", "--pid", str(prog.pid))
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.stdin.write("r\np\n")
        prog.stdin.flush()
        got = {prog.stdout.readline().strip() for _ in range(2)}
        assert got == {"read 2", "polled 2"}, got  # no "read error"/"epoll error" lines
    finally:
        prog.kill()
        prog.wait()


def test_tool_killed_at_random_points_of_apply(tmp_path: Path) -> None:
    """SIGKILL the tool mid-apply: the target keeps running; view tells the truth; undo works."""
    import random
    import sys
    import time

    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "kill0001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    rng = random.Random(1234)
    # How long a whole apply takes here, to spread the kills over it.
    t0 = time.monotonic()
    livesplice("apply", str(update), "--pid", str(prog.pid))
    span = time.monotonic() - t0
    livesplice("undo", "kill0001", "--pid", str(prog.pid))
    try:
        for _ in range(12):
            tool = subprocess.Popen(
                [sys.executable, "-m", "livesplice", "apply", str(update), "--pid", str(prog.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.0, span))
            tool.kill()
            tool.wait()
            prog.drain()
            prog.wait_for(lambda s: s.startswith("value"))  # still running
            view = livesplice_json("view", "--pid", str(prog.pid))
            states = [p["state"] for p in view["processes"]]
            assert len(states) <= 1, states
            if states:
                # the word must be the truth: one function, so "applied" means the new code
                # runs and any other state means the old code still does
                prog.drain()
                line = prog.wait_for(lambda s: s.startswith("value"))
                assert line == ("value 2" if states[0] == "applied" else "value 1"), states
                livesplice("undo", "kill0001", "--pid", str(prog.pid))
            prog.drain()
            prog.wait_for("value 1")
            assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
            assert prog.alive()
    finally:
        prog.stop()


KILL_POINTS = [
    "remote:regs-set:mmap",  # the first mmap's registers set, not run yet: only the memfd
    "remote:after-syscall:mmap",  # mapped; the thread still on the stub
    "remote:before-restore:mmap",
    "remote:after-syscall:memfd_create",  # a memfd open in the target, not yet closed
    "apply:mapped-code",
    "apply:wrote-code",
    "apply:wrote-state",
    "stop:after-first-write",  # inside the stop window, the (only) jump written
    "apply:after-stop",
]
APPLIED_AT = {"stop:after-first-write", "apply:after-stop"}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_tool_killed_at_each_step_of_apply(tmp_path: Path, point: str) -> None:
    """Deterministic version: the tool SIGKILLs itself at a named step (LIVESPLICE_KILL_AT)."""
    import os
    import sys

    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "kill0002", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        r = subprocess.run(
            [sys.executable, "-m", "livesplice", "apply", str(update), "--pid", str(prog.pid)],
            capture_output=True,
            text=True,
            env={**os.environ, "LIVESPLICE_KILL_AT": point},
        )
        assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
        prog.drain()
        prog.wait_for(lambda s: s.startswith("value"))
        view = livesplice_json("view", "--pid", str(prog.pid))
        [entry] = view["processes"]
        assert entry["id"] == "kill0002"
        if point in APPLIED_AT:
            assert entry["state"] == "applied"
            prog.drain()
            prog.wait_for("value 2")
        livesplice("undo", "kill0002", "--pid", str(prog.pid))
        assert_back_to_original(prog)
    finally:
        prog.stop()


def assert_back_to_original(prog: Running) -> None:
    """The program runs its original code, alive, with nothing of livesplice left in it."""
    import os

    prog.drain()
    prog.wait_for("value 1")
    assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
    fds = Path(f"/proc/{prog.pid}/fd")
    assert not [os.readlink(fd) for fd in fds.iterdir() if "livesplice" in os.readlink(fd)]
    assert prog.alive()


HOOKED = """\
#include <stdio.h>
#include <unistd.h>

int errors_seen = 5;
int base = 1;

__attribute__((noinline)) int answer(int x)
{
\treturn x + base;
}

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tprintf("value %d errors %d\\n", answer(i) - i, errors_seen);
\t\tusleep(2000);
\t}
}
"""
HOOK_MAKEFILE = MAKEFILE.replace("CFLAGS ?= -O2 -g", "CFLAGS ?= -O2 -g -I$(LIVESPLICE_INCLUDE)")


def hooked_update(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    edits: list[tuple[str, str]],
    uid: str,
) -> tuple[Path, Path]:
    """A tree whose patch includes livesplice.h (hooks), its update, and a running build of
    the unpatched source (built without livesplice.h: the deployed program never had it)."""
    from livetest import INCLUDE

    monkeypatch.setenv("LIVESPLICE_INCLUDE", str(INCLUDE))
    tree = write_tree(tmp_path / "src", {"prog.c": source, "Makefile": HOOK_MAKEFILE})
    patch = make_patch(
        tree,
        {
            "prog.c": [
                ("#include <stdio.h>", "#include <livesplice.h>\n#include <stdio.h>"),
                *edits,
            ]
        },
        tmp_path / "fix.patch",
    )
    running = write_tree(tmp_path / "run", {"prog.c": source, "Makefile": MAKEFILE})
    build(running)
    return create(tree, patch, uid, tmp_path), running


@pytest.mark.parametrize("kind", ["post_apply", "apply"])
def test_hooks_run_inside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    macro = {"post_apply": "LIVESPLICE_POST_APPLY", "apply": "LIVESPLICE_APPLY"}[kind]
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        HOOKED,
        [
            (
                "\treturn x + base;\n}",
                "\treturn x + base + 1;\n}\n\nstatic int reset(void)\n{\n"
                "\terrors_seen = 0;\n\treturn 0;\n}\n" + macro + "(reset);",
            ),
        ],
        "hook0001",
    )
    info = livesplice_json("inspect", str(update))
    assert [(h["kind"], h["function"]) for h in info["hooks"]] == [(kind, "reset")]
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1 errors 5")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("value 2 errors 0")
        livesplice("undo", "hook0001", "--pid", str(prog.pid))
        prog.wait_for("value 1 errors 0")
    finally:
        prog.stop()


def test_failing_pre_apply_hook_leaves_the_process_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        HOOKED,
        [
            (
                "\treturn x + base;\n}",
                "\treturn x + base + 1;\n}\n\nstatic int refuse(void)\n{\n"
                "\treturn errors_seen > 0 ? 17 : 0;\n}\nLIVESPLICE_PRE_APPLY(refuse);",
            ),
        ],
        "hook0002",
    )
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1 errors 5")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 10, r.stdout + r.stderr
        assert "pre_apply" in r.stdout + r.stderr and "17" in r.stdout + r.stderr
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
        prog.drain()
        prog.wait_for("value 1 errors 5")
    finally:
        prog.stop()


ESCAPE = """\
#include <stdio.h>
#include <unistd.h>

int base = 1;

__attribute__((noinline)) int answer(int x)
{
\treturn x + base;
}

int (*volatile callback)(int) = answer;

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tprintf("value %d\\n", callback(i) - i);
\t\tusleep(2000);
\t}
}
"""


def test_pointer_to_a_replaced_function_stored_by_the_update_survives_undo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook stores the address of a replaced function into program data; after undo the
    program keeps calling through it: it must be the original entry, not the unmapped
    replacement."""
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        ESCAPE,
        [
            (
                "\treturn x + base;\n}\n\nint (*volatile callback)(int) = answer;",
                "\treturn x + base + 1;\n}\n\nint (*volatile callback)(int) = answer;\n\n"
                "static int repoint(void)\n{\n\tcallback = answer;\n\treturn 0;\n}\n"
                "LIVESPLICE_POST_APPLY(repoint);",
            ),
        ],
        "escape01",
    )
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("value 2")
        livesplice("undo", "escape01", "--pid", str(prog.pid))
        prog.drain()
        prog.wait_for("value 1")
        prog.wait_for("value 1")
        assert prog.alive()
    finally:
        prog.stop()


STATUS = """\
#include <stdio.h>
#include <unistd.h>

const char *volatile status = "ok";

__attribute__((noinline)) void check(int i)
{
\tif (i < 0)
\t\tstatus = "negative";
}

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tcheck(i);
\t\tprintf("status %s\\n", status);
\t\tusleep(2000);
\t}
}
"""


def test_undo_keeps_memory_the_program_still_points_into(tmp_path: Path) -> None:
    """The new code stores a pointer to its own string in a global; after undo the old code
    keeps printing it. Unmapping the update would crash the program: undo must keep it."""
    tree, patch = setup_prog(
        tmp_path,
        STATUS,
        {
            "prog.c": [
                (
                    '\tif (i < 0)\n\t\tstatus = "negative";',
                    '\tif (i >= 0)\n\t\tstatus = "checked by the fix";',
                ),
            ]
        },
    )
    update = create(tree, patch, "keep0001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("status ok")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("status checked by the fix")
        r = livesplice("undo", "keep0001", "--pid", str(prog.pid))
        assert "kept" in r.stdout + r.stderr, r.stdout + r.stderr
        prog.drain()
        for _ in range(5):
            prog.wait_for("status checked by the fix")
        assert prog.alive()
        [entry] = livesplice_json("view", "--pid", str(prog.pid))["processes"]
        assert entry["state"].startswith("undone")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 2 and "new id" in r.stderr, r.stdout + r.stderr
    finally:
        prog.stop()


ALTSTACK = """\
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int base = 1;
static volatile int handled;

static void handler(int sig)
{
\t(void)sig;
\tprintf("in handler\\n");
\tsleep(3); /* the interrupted call_cb frame waits on the main stack meanwhile */
\thandled = 1;
}

__attribute__((noinline)) void fire(void)
{
\traise(SIGUSR1);
}

__attribute__((noinline)) int call_cb(void (*cb)(void))
{
\tcb();
\treturn base;
}

int main(void)
{
\tstack_t ss = { .ss_sp = malloc(1 << 16), .ss_size = 1 << 16 };
\tstruct sigaction sa = { .sa_handler = handler, .sa_flags = SA_ONSTACK };
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tsigaltstack(&ss, NULL);
\tsigaction(SIGUSR1, &sa, NULL);
\tprintf("result %d\\n", call_cb(fire));
\tfor (;;) {
\t\tprintf("result %d\\n", call_cb(NULL == fire ? fire : (void (*)(void))getpid));
\t\tusleep(2000);
\t}
}
"""


def test_frames_behind_a_signal_handler_on_an_alternate_stack_are_checked(
    tmp_path: Path,
) -> None:
    """The handler runs on a sigaltstack; call_cb's frame waits on the main stack. A scan of
    only the current stack would miss it and write the jump under a live frame."""
    fix = {"prog.c": [("\tcb();\n\treturn base;", "\tcb();\n\treturn base + 1;")]}
    tree, patch = setup_prog(tmp_path, ALTSTACK, fix)
    update = create(tree, patch, "alt00001", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("in handler")
        r = livesplice(
            "apply",
            str(update),
            "--pid",
            str(prog.pid),
            "--retries",
            "2",
            "--retry-interval",
            "0.1",
            check=False,
        )
        assert r.returncode == 6, r.stdout + r.stderr
        assert "call_cb" in r.stderr and "signal" in r.stderr, r.stderr
        prog.wait_for("result 1", timeout=10)  # the handler returned into intact code
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("result 2")
        assert prog.alive()
    finally:
        prog.stop()


def test_hook_that_crashes_keeps_the_update_memory_and_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        HOOKED,
        [
            (
                "\treturn x + base;\n}",
                "\treturn x + base + 1;\n}\n\nstatic int crash(void)\n{\n"
                "\treturn *(volatile int *)0;\n}\nLIVESPLICE_PRE_APPLY(crash);",
            ),
        ],
        "crash001",
    )
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1 errors 5")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 10 and "did not finish" in r.stderr, r.stdout + r.stderr
        assert "/memfd:livesplice:crash001" in Path(f"/proc/{prog.pid}/maps").read_text()
        prog.drain()
        prog.wait_for("value 1 errors 5")  # alive, old code
        [entry] = livesplice_json("view", "--pid", str(prog.pid))["processes"]
        assert entry["state"].startswith("incomplete: NOT protecting"), entry
        livesplice("undo", "crash001", "--pid", str(prog.pid))
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
    finally:
        prog.stop()


SWITCH = """\
#include <stdio.h>
#include <unistd.h>

int g;

/* varied cases: gcc -O2 compiles this to a jump table of labels inside the function */
__attribute__((noinline)) int classify(int x)
{
\tswitch (x % 8) {
\tcase 0: return x * 3 + 10;
\tcase 1: return (x ^ 5) + 11;
\tcase 2: g++; return 12;
\tcase 3: return x / 7 + 13;
\tcase 4: return (x << 2) - 14;
\tcase 5: return x % 5 + 15;
\tcase 6: g--; return 16;
\tdefault: return 17;
\t}
}

/* called through a pointer: main's code must not depend on classify's (IPA-RA) */
int (*volatile classify_fn)(int) = classify;

int main(void)
{
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tfor (int i = 0;; i++) {
\t\tint sum = 0;
\t\tfor (int k = 0; k < 8; k++)
\t\t\tsum += classify_fn(k);
\t\tprintf("sum %d\\n", sum);
\t\tusleep(2000);
\t}
}
"""


def test_replaced_switch_jumps_through_its_own_new_table(tmp_path: Path) -> None:
    """The new code's jump table names case labels inside the NEW function: they must not
    be redirected to the old body (curl's do_SOCKS5 crashed that way)."""
    fix = {
        "prog.c": [
            (
                "\tswitch (x % 8) {\n\tcase 0: return x * 3 + 10;",
                "\tif (x < 0)\n\t\treturn -1;\n\tswitch (x % 8) {\n\tcase 0: return x * 3 + 20;",
            ),
        ]
    }
    tree, patch = setup_prog(tmp_path, SWITCH, fix)
    update = create(tree, patch, "switch01", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("sum 100")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("sum 110")
        for _ in range(3):
            prog.wait_for("sum 110")
        livesplice("undo", "switch01", "--pid", str(prog.pid))
        prog.wait_for("sum 100")
        assert prog.alive()
    finally:
        prog.stop()


UNDO_KILL_POINTS = [
    "undo:after-stop",  # the jumps are gone, the memory still mapped, the journal says applied
    "stop:after-first-write",  # inside undo's window: the original bytes written back
    "remote:after-syscall:munmap",  # the code unmapped, the thread still on the stub
    "undo:unmapped",  # unmapped, the journal entry not yet removed
]


@pytest.mark.parametrize("point", UNDO_KILL_POINTS)
def test_tool_killed_at_each_step_of_undo(tmp_path: Path, point: str) -> None:
    """The tool SIGKILLs itself at a named step of undo: the target runs on unharmed (old or
    new code, never a half state), `view` tells the truth, and a second undo finishes."""
    import os
    import sys

    tree, patch = setup_prog(tmp_path, BASIC, BASIC_FIX)
    update = create(tree, patch, "kill0003", tmp_path)
    prog = Running([str(tmp_path / "run" / "prog")])
    try:
        prog.wait_for("value 1")
        livesplice("apply", str(update), "--pid", str(prog.pid))
        prog.wait_for("value 2")
        r = subprocess.run(
            [sys.executable, "-m", "livesplice", "undo", "kill0003", "--pid", str(prog.pid)],
            capture_output=True,
            text=True,
            env={**os.environ, "LIVESPLICE_KILL_AT": point},
        )
        assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
        prog.drain()
        line = prog.wait_for(lambda s: s.startswith("value"))
        assert line in ("value 1", "value 2"), line
        [entry] = livesplice_json("view", "--pid", str(prog.pid))["processes"] or [None]
        if entry is not None:  # killed before the journal entry went: still listed
            assert entry["id"] == "kill0003"
            livesplice("undo", "kill0003", "--pid", str(prog.pid))
        assert_back_to_original(prog)
    finally:
        prog.stop()
