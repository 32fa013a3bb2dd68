"""Apply/undo cycles while other threads of the target fork+exec and posix_spawn in loops.

fork() children and posix_spawn's CLONE_VFORK children are not traced (livesplice asks for
clone events only): they must never be left stopped or traced, the forking threads must
never see a failed fork, and the program must run on with the right code after every step.
"""

from __future__ import annotations

import os
from pathlib import Path

from livesplice.process.procstat import children_of
from livetest import Running, build, create, livesplice, make_patch, write_tree

CYCLES = int(os.environ.get("LIVESPLICE_FORK_CYCLES", "8"))

SOURCE = """\
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
int base = 1;
static volatile long forks, spawns, failures;

__attribute__((noinline)) int answer(int x)
{
\treturn x + base;
}

static void *forker(void *arg)
{
\t(void)arg;
\tfor (;;) {
\t\tpid_t pid = fork();
\t\tif (pid == 0) {
\t\t\texecl("/bin/true", "true", (char *)NULL);
\t\t\t_exit(127);
\t\t}
\t\tint st;
\t\tif (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
\t\t\tfailures++;
\t\tforks++;
\t}
\treturn NULL;
}

static void *spawner(void *arg)
{
\t(void)arg;
\tchar *argv[] = {"true", NULL};
\tfor (;;) {
\t\tpid_t pid;
\t\tint st;
\t\tif (posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ) ||
\t\t    waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
\t\t\tfailures++;
\t\tspawns++;
\t}
\treturn NULL;
}

int main(void)
{
\tpthread_t a, b;
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tpthread_create(&a, NULL, forker, NULL);
\tpthread_create(&b, NULL, spawner, NULL);
\tfor (int i = 0;; i++) {
\t\tprintf("value %d forks %ld spawns %ld failures %ld\\n", answer(i) - i, forks, spawns,
\t\t       failures);
\t\tusleep(5000);
\t}
}
"""
MAKEFILE = "prog: prog.c\n\t$(CC) -O2 -g -o $@ prog.c -lpthread\n"


def test_apply_undo_while_other_threads_fork_exec_and_spawn(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "src", {"prog.c": SOURCE, "Makefile": MAKEFILE})
    patch = make_patch(
        tree, {"prog.c": [("return x + base;", "return x + base + 1;")]}, tmp_path / "fix.patch"
    )
    running = write_tree(tmp_path / "run", {"prog.c": SOURCE, "Makefile": MAKEFILE})
    build(running)
    update = create(tree, patch, "fork0001", tmp_path)
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for(lambda s: s.startswith("value 1") and " forks 0 " not in s)
        for _ in range(CYCLES):
            livesplice("apply", str(update), "--pid", str(prog.pid))
            prog.drain()
            prog.wait_for("value 2")
            livesplice("undo", "fork0001", "--pid", str(prog.pid))
            prog.drain()
            prog.wait_for("value 1")
        # still forking and spawning, none failed; no child left stopped or traced
        first = prog.wait_for("value 1")
        later = prog.wait_for(lambda s: s.startswith("value 1"), timeout=10)
        for _ in range(20):
            later = prog.wait_for(lambda s: s.startswith("value 1"))
        f0, s0 = int(first.split()[3]), int(first.split()[5])
        f1, s1, fail = int(later.split()[3]), int(later.split()[5]), int(later.split()[7])
        assert f1 > f0 and s1 > s0, (first, later)
        assert fail == 0, later
        stuck = {c: st for c, st in children_of(prog.pid).items() if st in ("t", "T")}
        assert not stuck, stuck
        assert prog.alive()
    finally:
        prog.stop()
