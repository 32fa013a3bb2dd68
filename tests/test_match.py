"""Run-pre matching against real running processes built by gcc.

The running program is linked from objects built WITHOUT -ffunction-sections (as a user's
build is); the pre code comes from the same source built with them (as livesplice's pre build
is). Oracles: the program's own symbol table (nm) for every learned address.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from match_objsections import (
    PROGS,
    VARIANTS,
    Child,
    ObjectFile,
    build_program,
    gcc,
    pre_target,
    read_object,
)

from livesplice.errors import NoMatch
from livesplice.process.image import (
    MappedImage,
    find_images,
    processes_running,
    read_maps,
)
from livesplice.process.match import MatchResult, run_pre_match
from livesplice.process.resolve import executable_tpoff

SRC = ["match_main.c", "match_unit_a.c", "match_unit_b.c"]
FUNCS = [
    "work",
    "step1",
    "greet",
    "copy",
    "chain",
    "chain_tail",
    "a_fn",
    "b_fn",
    "a_same",
    "b_same",
    "match_main.c:helper",
]

Builds = Callable[[str], tuple[Path, dict[str, ObjectFile]]]
_built: dict[str, tuple[Path, dict[str, ObjectFile]]] = {}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    root = tmp_path_factory.mktemp("match")

    def get(variant: str) -> tuple[Path, dict[str, ObjectFile]]:
        if variant not in _built:
            _built[variant] = build_program(root / variant, variant, SRC)
        return _built[variant]

    yield get
    _built.clear()


def nm(exe: Path) -> dict[str, list[int]]:
    """name -> link-time addresses, from binutils' nm (an oracle independent of pyelftools)."""
    out: dict[str, list[int]] = {}
    for line in subprocess.run(
        ["nm", str(exe)], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault(parts[2], []).append(int(parts[0], 16))
    return out


def match(child: Child, target_name: str, target: object) -> tuple[MatchResult, MappedImage]:
    maps = read_maps(child.pid)
    (img,) = find_images(child.pid, target_name, maps)
    return run_pre_match(child.read, img, target, maps), img  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_function_matches_and_learned_addresses_are_right(
    builds: Builds, variant: str
) -> None:
    exe, objs = builds(variant)
    funcs = FUNCS + ([] if variant.startswith("pic") else ["tls_bump"])
    syms = nm(exe)
    with Child([str(exe)]) as c:
        r, img = match(c, "prog", pre_target("prog", objs.values(), funcs))
        assert len(r.functions) == len(funcs)
        for key, addr in r.functions.items():
            name = key.rsplit(".", 1)[-1]
            assert addr - img.bias in syms[name], key
            assert r.entries[key] == addr
        # learned from relocation fields, in every encoding the linker chose
        assert r.learned["match_main.c:.bss.counter"] - img.bias == syms["counter"][0]
        assert r.learned["table"] - img.bias == syms["table"][0]
        assert r.learned["outbuf"] - img.bias == syms["outbuf"][0]
        assert r.learned["match_main.c:.text.step2"] - img.bias == syms["step2"][0]
        # calls to another unit's globals: relaxed GOTPCRELX (pic) or PLT32 (others)
        assert r.learned["a_fn"] - img.bias == syms["a_fn"][0]
        assert r.learned["b_fn"] - img.bias == syms["b_fn"][0]
        # snprintf: its PLT entry (PLT32) or the libc function itself (GOT slot, -fno-plt)
        snprintf = r.learned["snprintf"]
        assert snprintf == img.plt_entry("snprintf") or not img.in_text(snprintf)
        assert c.ask("work 2") == str(2 * 3 + 1 + 3)  # untouched: reading changes nothing


def test_tail_jump_rel8_in_running_code_matches_rel32_in_pre(builds: Builds) -> None:
    exe, objs = builds("pie")
    step1 = objs["match_main.c"].function("step1")
    jmp = [x for x in step1.relocs if x.symbol.endswith(".text.step2")]
    assert jmp and step1.bytes[jmp[0].offset - 1] == 0xE9  # pre: 5-byte jmp rel32
    with Child([str(exe)]) as c:
        r, img = match(c, "prog", pre_target("prog", objs.values(), ["step1"]))
        at = r.functions["match_main.c:.text.step1"]
        running = c.read(at, 32)
        assert b"\xeb" in running[: jmp[0].offset]  # running: 2-byte jmp rel8
        assert r.learned["match_main.c:.text.step2"] - img.bias == nm(exe)["step2"][0]


def test_stripped_binary_found_by_searching_text(builds: Builds, tmp_path: Path) -> None:
    exe, objs = builds("pie")
    stripped = tmp_path / "prog"
    shutil.copy(exe, stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    syms = nm(exe)
    with Child([str(stripped)]) as c:
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        assert img.symbols("work") == [] and img.symbols("helper") == []
        r = run_pre_match(c.read, img, pre_target("prog", objs.values(), FUNCS), maps)
        for key, addr in r.functions.items():
            assert addr - img.bias in syms[key.rsplit(".", 1)[-1]], key


def test_duplicate_static_names_only_one_matches(builds: Builds) -> None:
    exe, objs = builds("pie")
    with Child([str(exe)]) as c:
        r, img = match(c, "prog", pre_target("prog", objs.values(), ["match_unit_b.c:scale"]))
        both = img.symbols("scale")
        assert len(both) == 2
        addr = r.functions["match_unit_b.c:.text.scale"]
        assert addr in both
        # oracle: where b_fn's running call goes
        r2, _ = match(c, "prog", pre_target("prog", objs.values(), ["b_fn"]))
        assert r2.learned["match_unit_b.c:.text.scale"] == addr


def test_identical_duplicates_are_ambiguous_until_a_caller_tells(builds: Builds) -> None:
    exe, objs = builds("pie")
    with Child([str(exe)]) as c:
        with pytest.raises(NoMatch, match="multiple candidates for same"):
            match(c, "prog", pre_target("prog", objs.values(), ["match_unit_a.c:same"]))
        # with the caller shipped too, its call tells which `same` is unit a's
        r, img = match(
            c, "prog", pre_target("prog", objs.values(), ["match_unit_a.c:same", "a_same"])
        )
        got = r.functions["match_unit_a.c:.text.same"]
        assert got in img.symbols("same")
        assert r.learned["match_unit_a.c:.text.same"] == got


def test_wrong_source_names_function_and_offset(builds: Builds, tmp_path: Path) -> None:
    exe, _ = builds("pie")
    src = (PROGS / "match_main.c").read_text()
    wrong = tmp_path / "match_main.c"
    wrong.write_text(src.replace("return x * 3 + counter;", "return x * 4 + counter;"))
    o = tmp_path / "wrong.o"
    gcc("-O2", "-g", "-fPIE", "-ffunction-sections", "-fdata-sections", "-c", wrong, "-o", o)
    bad = read_object(o, "match_main.c")
    with Child([str(exe)]) as c, pytest.raises(NoMatch) as e:
        match(c, "prog", pre_target("prog", [bad], ["match_main.c:helper", "greet"]))
    assert "no match for helper: first difference at +0x" in e.value.reason
    assert "expected" in e.value.reason and "found" in e.value.reason
    assert len(e.value.details) == 1  # greet still matched


def test_compiler_identity_is_compared(builds: Builds) -> None:
    exe, objs = builds("pie")
    with Child([str(exe)]) as c:
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "prog", maps)
        t = pre_target("prog", objs.values(), ["work"])
        assert "GCC:" in img.comment
        ours = img.comment.splitlines()[-1]
        assert run_pre_match(c.read, img, t, maps, compiler=ours).warnings == []
        other = run_pre_match(c.read, img, t, maps, compiler="GCC: (Debian 13.1.0) 13.1.0")
        assert any("13.1.0" in w for w in other.warnings)


def test_tls_offsets_learned_from_local_and_initial_exec_code(builds: Builds) -> None:
    for variant in ("pie", "nopie"):
        exe, objs = builds(variant)
        with Child([str(exe)]) as c:
            r, img = match(c, "prog", pre_target("prog", objs.values(), ["tls_bump"]))
            # tls_counter: TPOFF32 (local-exec); ext_tls: GOTTPOFF relaxed to an immediate
            assert r.tpoff["tls_counter"] == executable_tpoff(img, "tls_counter")
            assert r.tpoff["ext_tls"] == executable_tpoff(img, "ext_tls")
            assert r.tpoff["tls_counter"] != r.tpoff["ext_tls"]


def test_image_facts_of_a_shared_library(tmp_path: Path) -> None:
    lib = tmp_path / "libmatch.so.1.2.3"
    gcc("-O2", "-fPIC", "-shared", "-Wl,-soname,libmatch.so.1", "-o", lib, PROGS / "match_lib.c")
    (tmp_path / "libmatch.so.1").symlink_to(lib.name)
    exe = tmp_path / "libprog"
    gcc("-O2", "-o", exe, PROGS / "match_libmain.c", f"-L{tmp_path}", lib)
    o = tmp_path / "match_lib.o"
    gcc(
        "-O2",
        "-fPIC",
        "-ffunction-sections",
        "-fdata-sections",
        "-c",
        PROGS / "match_lib.c",
        "-o",
        o,
    )
    obj = read_object(o, "match_lib.c")
    with Child([str(exe)], env={"LD_LIBRARY_PATH": str(tmp_path)}) as c:
        assert c.ask("lib 1") == str((1 + 8) * 2 + 1) + " " + str(3 + (1 + 8) * 2 + 2)
        assert c.pid in processes_running("libmatch.so.1")
        maps = read_maps(c.pid)
        (img,) = find_images(c.pid, "libmatch.so.1", maps)
        assert img.path.endswith("libmatch.so.1.2.3") and img.soname == "libmatch.so.1"
        assert find_images(c.pid, "libmatch.so.1.2.3", maps)[0].path == img.path
        t = pre_target(
            "libmatch.so.1",
            [obj],
            ["lib_work", "lib_len", "match_lib.c:lib_helper"],
            kind="shared_library",
        )
        r = run_pre_match(c.read, img, t, maps)
        syms = nm(lib)
        assert r.functions["match_lib.c:.text.lib_work"] - img.bias == syms["lib_work"][0]
        assert r.learned["lib_table"] - img.bias == syms["lib_table"][0]
        assert r.learned["match_lib.c:.bss.lib_calls"] - img.bias == syms["lib_calls"][0]
        # lib_len calls strlen and the interposable lib_work through the library's PLT
        assert r.learned["strlen"] == img.plt_entry("strlen")
        assert img.got_slot("strlen") is not None


def test_function_not_in_process_is_no_match(builds: Builds) -> None:
    exe, objs = builds("pie")
    t = pre_target("prog", objs.values(), ["work"])
    t.sections[0].name = "no_such_function"
    t.sections[0].data = "c3" * 8
    t.sections[0].size = 8
    t.sections[0].relocs = []
    with Child([str(exe)]) as c, pytest.raises(NoMatch, match="no_such_function"):
        match(c, "prog", t)
