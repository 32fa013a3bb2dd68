"""Loading an update into a real running process: layout, symbol resolution, relocation,
trampolines -- written through /proc/PID/mem into a region the test program mapped near its
own code (standing in for remote_mmap), then checked by what the program computes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from match_objsections import (
    PROGS,
    Child,
    ObjectFile,
    build_post,
    build_program,
    pre_target,
    update_target,
)

from livesplice.errors import NoMatch
from livesplice.process.image import find_images
from livesplice.process.load import LoadImage, near_range, plan_load
from livesplice.process.match import run_pre_match
from livesplice.process.procmaps import read_maps
from livesplice.process.relocate import RelocationError
from livesplice.update.format import Target

SRC = ["match_main.c", "match_unit_a.c", "match_unit_b.c"]

POST1 = [
    (
        "static int counter;",
        "static int counter;\nstatic int bonus_calls;\n"
        "static __attribute__((noinline)) int bonus(void) { return ++bonus_calls * 1000; }",
    ),
    ("return helper(x) + table[x & 3];", "return helper(x) * 2 + table[x & 3] + bonus();"),
    ('"hello %d"', '"howdy %d"'),
    ('memcpy(tmp, "abcdefghijklmnopqrstuvwxyz"', 'memmove(tmp, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"'),
    # strrchr: an IFUNC in glibc that the program never references
    (
        "return (int)strlen(tmp) + tmp[0];",
        "return (int)strlen(tmp) + tmp[0] + (int)(strrchr(tmp, 'C') - tmp);",
    ),
    ("tls_counter += n;", "tls_counter += 10 * n;"),
    (
        "if (x > 10) return step2(x - 1); return x + 1;",
        "if (x > 20) return step2(x - 1); return x + 2;",
    ),
]
CHANGED = ["work", "greet", "copy", "step1"]


def patched_source(tmp: Path, edits: list[tuple[str, str]], name: str) -> Path:
    text = (PROGS / "match_main.c").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    out = tmp / name
    out.mkdir(exist_ok=True)
    (out / "match_main.c").write_text(text)
    return out / "match_main.c"


def load(c: Child, target: Target, code_base: int, data_base: int) -> LoadImage:
    maps = read_maps(c.pid)
    (img,) = find_images(c.pid, "prog", maps)
    m = run_pre_match(c.read, img, target, maps)
    plan = plan_load(target, img, m, c.read, c.pid, maps)
    lo, hi = near_range(img)
    assert lo <= code_base and code_base + plan.code_size <= hi
    li = plan.build(code_base, data_base)
    assert len(li.code) == plan.code_size and len(li.data) == plan.data_size
    c.write(code_base, li.code)
    if li.data:
        c.write(data_base, li.data)
    for t in li.trampolines:
        assert c.read(t.address, 5) == t.original
        c.write(t.address, t.jump)
    return li


@pytest.mark.parametrize("variant", ["pie", "nopie", "pic_pie", "pic_nopie"])
def test_update_runs_in_the_process(tmp_path: Path, variant: str) -> None:
    exe, objs = build_program(tmp_path / "b", variant, SRC)
    tls = not variant.startswith("pic")  # -fPIC TLS is general-dynamic, relaxed by ld
    post = build_post(tmp_path, variant, patched_source(tmp_path, POST1, "post1"), "match_main.c")
    changed = CHANGED + (["tls_bump"] if tls else [])
    target = update_target("prog", objs["match_main.c"], post, changed, new=["bonus"])
    with Child([str(exe)]) as c:
        region = int(c.hello.split()[1], 16)
        assert c.ask("work 2") == "10"  # counter=1: helper(2)=7, + table[2]
        assert c.ask("greet 5") == "hello 5"
        assert c.ask("copy 9") == str(9 + ord("a"))
        assert c.ask("step 15") == str(14 * 7 + 3)
        if tls:
            assert c.ask("tls 1") == "8"  # tls_counter 1 + ext_tls 5+2
        li = load(c, target, region, region + 0x80000)
        assert {t.function for t in li.trampolines} == set(changed)
        assert c.ask("work 3") == str((9 + 2) * 2 + 4 + 1000)
        assert c.ask("work 3") == str((9 + 3) * 2 + 4 + 2000)
        assert c.ask("greet 5") == "howdy 5"
        # strrchr: an IFUNC the program never called, resolved through libc's own GOT
        # (calling the resolver would return a pointer to code, not 2)
        assert c.ask("copy 9") == str(9 + ord("A") + 2)
        assert c.ask("step 15") == "17"
        if tls:
            assert c.ask("tls 1") == str(11 + 9)
        assert c.ask("chain 1") == str((2 * 1 + 1 + 100) * 2) + " " + str(2 * 5 - 3 + 200)
        # libc is far from the region: a PLT32 call reaches it through a veneer; -fno-plt
        # code calls through a GOT slot of ours instead
        assert ("strrchr" in li.veneers) == (not variant.startswith("pic"))


def test_stacked_update_matches_the_running_replacement(tmp_path: Path) -> None:
    exe, objs = build_program(tmp_path / "b", "pie", SRC)
    post1_src = patched_source(tmp_path, POST1, "post1")
    post1 = build_post(tmp_path, "pie", post1_src, "match_main.c")
    post2 = build_post(
        tmp_path,
        "pie",
        patched_source(
            tmp_path,
            [*POST1, ("* 2 + table[x & 3] + bonus()", "* 3 + table[x & 3] + bonus()")],
            "post2",
        ),
        "match_main.c",
    )
    first = update_target("prog", objs["match_main.c"], post1, ["work"], new=["bonus"])
    second = update_target("prog", post1, post2, ["work"])
    with Child([str(exe)]) as c:
        region = int(c.hello.split()[1], 16)
        li1 = load(c, first, region, region + 0x80000)
        assert c.ask("work 3") == str((9 + 1) * 2 + 4 + 1000)
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        m = run_pre_match(c.read, img, second, maps)
        key = "match_main.c:.text.work"
        assert m.functions[key] == li1.addresses[key]  # the running replacement
        assert m.entries[key] == li1.trampolines[0].address  # the original entry
        li2 = load(c, second, region + 0x40000, region + 0xC0000)
        assert li2.trampolines[0].original == li1.trampolines[0].jump
        assert c.ask("work 3") == str((9 + 2) * 3 + 4 + 2000)  # bonus state carried over


def test_function_shorter_than_a_jump_is_refused(tmp_path: Path) -> None:
    exe, objs = build_program(tmp_path / "b", "pie", SRC)
    post = build_post(
        tmp_path,
        "pie",
        patched_source(
            tmp_path, [("int tiny(int x) { return x; }", "int tiny(int x) { return x + 1; }")], "p"
        ),
        "match_main.c",
    )
    target = update_target("prog", objs["match_main.c"], post, ["tiny"])
    with Child([str(exe)]) as c:
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        m = run_pre_match(c.read, img, target, maps)
        with pytest.raises(NoMatch, match="tiny is 3 bytes long: too short for a 5-byte jmp"):
            plan_load(target, img, m, c.read, c.pid, maps)


def test_unknown_symbol_is_refused_before_loading(tmp_path: Path) -> None:
    exe, objs = build_program(tmp_path / "b", "pie", SRC)
    post = build_post(tmp_path, "pie", patched_source(tmp_path, POST1, "post1"), "match_main.c")
    target = update_target("prog", objs["match_main.c"], post, ["greet"])
    for s in target.sections:
        if s.role == "replacement":
            s.relocs = [
                *s.relocs[:-1],
                type(s.relocs[-1])(
                    s.relocs[-1].offset,
                    s.relocs[-1].type,
                    "no_such_symbol_anywhere",
                    s.relocs[-1].addend,
                ),
            ]
    target.symbols.pop("no_such_symbol_anywhere", None)
    with Child([str(exe)]) as c:
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        m = run_pre_match(c.read, img, target, maps)
        with pytest.raises(NoMatch, match="cannot find symbol no_such_symbol_anywhere"):
            plan_load(target, img, m, c.read, c.pid, maps)


def test_code_out_of_reach_is_refused(tmp_path: Path) -> None:
    exe, objs = build_program(tmp_path / "b", "pie", SRC)
    post = build_post(tmp_path, "pie", patched_source(tmp_path, POST1, "post1"), "match_main.c")
    target = update_target("prog", objs["match_main.c"], post, ["work"], new=["bonus"])
    with Child([str(exe)]) as c:
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        m = run_pre_match(c.read, img, target, maps)
        plan = plan_load(target, img, m, c.read, c.pid, maps)
        far = img.extent[1] + (4 << 30)
        # work's rel32 to the existing `counter` cannot reach: refused, nothing written
        with pytest.raises(RelocationError, match="counter"):
            plan.build(far, far + 0x10000)


def _unused(o: ObjectFile) -> None:  # keep the import used by type checkers
    pre_target("x", [o], [])
