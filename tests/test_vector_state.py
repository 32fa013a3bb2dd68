"""The whole vector register state of an interrupted thread survives a hook call (issue 8).

A hook runs inside the target on a thread that livesplice interrupted wherever it was. If
that thread was in the middle of code holding values in ymm (AVX) or zmm16-31 (AVX-512)
registers -- glibc's string functions do, constantly -- and the hook's code changes them,
the thread must find them exactly as it left them. ``fxsave``/``fxrstor`` (all the call stub
had before) covers only x87 and the low 128 bits of xmm0-15.

The target holds a known pattern in ymm0-15 (and zmm16-31 where the CPU has AVX-512) inside
one asm block that spins for ~0.1 s and then compares every register with the pattern; it is
single-threaded, so the hook runs on the very thread that holds them. The hook sets every bit
of those registers. Without the full state saved (checked by forcing the fxsave path), the
target prints CORRUPT.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livetest import Running, livesplice
from test_apply import hooked_update


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


FLAGS = _cpu_flags()
pytestmark = pytest.mark.skipif(
    "avx2" not in FLAGS or "xsave" not in FLAGS,
    reason="the CPU has no AVX2/XSAVE: no upper register halves",
)

_YMM = range(16)
_ZMM = range(16, 32)
LOAD_YMM = "".join(f'"vmovdqu {32 * i}(%1), %%ymm{i}\\n"' for i in _YMM)
STORE_YMM = "".join(f'"vmovdqu %%ymm{i}, {32 * i}(%0)\\n"' for i in _YMM)
LOAD_ZMM = "".join(f'"vmovdqu64 {512 + 64 * (i - 16)}(%1), %%zmm{i}\\n"' for i in _ZMM)
STORE_ZMM = "".join(f'"vmovdqu64 %%zmm{i}, {512 + 64 * (i - 16)}(%0)\\n"' for i in _ZMM)
SPIN = '"mov $600000, %%ecx\\n1: pause\\n dec %%ecx\\n jnz 1b\\n"'
CLOBBER_LIST = ", ".join(f'"xmm{i}"' for i in _YMM)

SOURCE = f"""\
#include <stdio.h>
#include <string.h>

int base = 1;
volatile int hook_ran;
int have_zmm;
static unsigned char pattern[512 + 1024] __attribute__((aligned(64)));

__attribute__((noinline)) int answer(int x)
{{
\treturn x + base;
}}

static void hold(unsigned char *out, int zmm)
{{
\tif (zmm)
\t\tasm volatile({LOAD_YMM} {LOAD_ZMM} {SPIN} {STORE_YMM} {STORE_ZMM}
\t\t\t     : : "r"(out), "r"(pattern) : "ecx", "memory", {CLOBBER_LIST});
\telse
\t\tasm volatile({LOAD_YMM} {SPIN} {STORE_YMM}
\t\t\t     : : "r"(out), "r"(pattern) : "ecx", "memory", {CLOBBER_LIST});
}}

int main(void)
{{
\tstatic unsigned char out[sizeof pattern] __attribute__((aligned(64)));
\tint zmm = have_zmm = __builtin_cpu_supports("avx512f");
\tsize_t n = zmm ? sizeof pattern : 512;
\tfor (size_t i = 0; i < sizeof pattern; i++)
\t\tpattern[i] = (unsigned char)(i * 7 + 3);
\tsetvbuf(stdout, NULL, _IOLBF, 0);
\tprintf("ready zmm=%d\\n", zmm);
\tfor (int round = 0;; round++) {{
\t\tmemset(out, 0, sizeof out);
\t\thold(out, zmm);
\t\tfor (size_t i = 0; i < n; i++)
\t\t\tif (out[i] != pattern[i]) {{
\t\t\t\tprintf("CORRUPT register byte %zu (ymm/zmm %zu)\\n", i,
\t\t\t\t       i < 512 ? i / 32 : 16 + (i - 512) / 64);
\t\t\t\tbreak;
\t\t\t}}
\t\tprintf("value %d hook %d round %d\\n", answer(round) - round, hook_ran, round);
\t}}
}}
"""

SET_ALL_YMM = "".join(f'"vpcmpeqd %%ymm{i}, %%ymm{i}, %%ymm{i}\\n"' for i in _YMM)
SET_ALL_ZMM = "".join(f'"vpternlogd $0xff, %%zmm{i}, %%zmm{i}, %%zmm{i}\\n"' for i in _ZMM)
HOOK = f"""
static int clobber(void)
{{
\tasm volatile({SET_ALL_YMM} : : : {CLOBBER_LIST});
\tif (have_zmm)
\t\tasm volatile({SET_ALL_ZMM} : : : "memory");
\thook_ran = 1;
\treturn 0;
}}
LIVESPLICE_PRE_APPLY(clobber);
"""


CRASH_HOOK = HOOK.replace("\treturn 0;", "\treturn *(volatile int *)0;")


def test_vector_registers_survive_a_hook_that_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callee never reaches the stub's xrstor: the tool's own copy of the state
    (PTRACE_SETREGSET NT_X86_XSTATE) must put the registers back."""
    assert CRASH_HOOK != HOOK
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        SOURCE,
        [
            ("\treturn x + base;\n}", "\treturn x + base + 1;\n}\n" + CRASH_HOOK),
        ],
        "vec00002",
    )
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1 hook 0")
        r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
        assert r.returncode == 10 and "did not finish" in r.stderr, r.stdout + r.stderr
        prog.wait_for("value 1 hook 1", timeout=20)
        prog.wait_for("value 1 hook 1")  # a whole round after the hook
        prog.drain()
        corrupt = [line for line in prog.all if line.startswith("CORRUPT")]
        assert not corrupt, corrupt[:3]
        assert prog.alive()
        livesplice("undo", "vec00002", "--pid", str(prog.pid))
    finally:
        prog.stop()


def test_vector_registers_survive_a_hook_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    update, running = hooked_update(
        tmp_path,
        monkeypatch,
        SOURCE,
        [
            ("\treturn x + base;\n}", "\treturn x + base + 1;\n}\n" + HOOK),
        ],
        "vec00001",
    )
    prog = Running([str(running / "prog")])
    try:
        ready = prog.wait_for("ready")
        prog.wait_for("value 1 hook 0")
        # the hook runs while the only thread is (almost surely: >99% of its time) inside
        # hold()'s spin with the pattern in its registers; apply 3 times to make a miss
        # vanishingly unlikely
        for _ in range(3):
            livesplice("apply", str(update), "--pid", str(prog.pid))
            prog.wait_for("value 2 hook 1", timeout=20)
            prog.wait_for("value 2 hook 1")  # one whole round after the hook
            livesplice("undo", "vec00001", "--pid", str(prog.pid))
            prog.wait_for("value 1")
        prog.drain()
        corrupt = [line for line in prog.all if line.startswith("CORRUPT")]
        assert not corrupt, f"{ready}: {corrupt[:3]}"
        assert prog.alive()
    finally:
        prog.stop()
