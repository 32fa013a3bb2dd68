"""The build stage: real trees (Makefile, ar, shared library, autotools+libtool, CMake, Debian
package) built twice through the compiler wrapper; patch and build failures.

Fixture trees live in tests/build_fixtures/NAME/tree with their patches next to the tree.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from livesplice.build import wrapper
from livesplice.build.builder import build_pair
from livesplice.build.records import BuildPair, UnitPair
from livesplice.errors import BuildFailed, PatchDoesNotApply

FIXTURES = Path(__file__).parent / "build_fixtures"


def _gcc_version() -> str:
    """First line of ``gcc --version`` ("gcc (Debian 12.2.0-14+deb12u1) 12.2.0"); "" without
    gcc (the tests that need it skip)."""
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return (out.splitlines() or [""])[0].strip()


GCC_VERSION = _gcc_version()
# what gcc writes into .comment: "GCC: " + the version line without the program name
GCC_COMMENT = "GCC: " + GCC_VERSION.split(" ", 1)[-1]


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (scripts/bootstrap.sh installs it)"
    )


def fixture_tree(name: str, tmp_path: Path) -> Path:
    """A private copy, so a test that edits the tree cannot affect another test."""
    dest = tmp_path / "src" / name
    shutil.copytree(FIXTURES / name / "tree", dest, symlinks=True)
    return dest


def build(src: Path, patch: Path, tmp_path: Path, cmd: str = "make", jobs: int = 2) -> BuildPair:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return build_pair(src, patch, build_cmd=cmd, workdir=workdir, jobs=jobs)


def write_patch(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def unit(pair: BuildPair, source: str) -> UnitPair:
    found = [u for u in pair.units if u.source == source]
    assert len(found) == 1, [u.source for u in pair.units]
    return found[0]


def section_names(obj: Path) -> set[str]:
    with obj.open("rb") as f:
        return {s.name for s in ELFFile(f).iter_sections()}


def snapshot(tree: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(tree)): (p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(tree.rglob("*"))
    }


# ---------------------------------------------------------------------------------------------
# plain Makefile


def test_plain_makefile_pairs_units_and_targets(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    before = snapshot(src)
    pair = build(src, FIXTURES / "plain" / "scale.patch", tmp_path)

    assert sorted(u.source for u in pair.units) == ["greet.c", "main.c", "util.c"]
    util = unit(pair, "util.c")
    assert util.post is not None and util.targets == ["server"]
    assert unit(pair, "main.c").post is None  # did not recompile
    assert unit(pair, "main.c").targets == ["server"]
    # make's built-in one-step rule (cc greet.c -o greet) is split so the object survives
    assert unit(pair, "greet.c").targets == ["greet"]
    assert unit(pair, "greet.c").pre.object.is_file()

    assert {(lk.name, lk.kind) for lk in pair.links} == {
        ("server", "executable"),
        ("greet", "executable"),
    }
    for lk in pair.links:
        assert lk.output.is_file() and lk.output.is_relative_to(pair.workdir / "pre")

    pre, post = util.pre, util.post
    assert pre.language == "c" and pre.source == "util.c"
    assert pre.built_object == str(pair.workdir / "tree" / "util.o")
    assert pre.object.is_relative_to(pair.workdir / "pre")
    assert post.object.is_relative_to(pair.workdir / "post")
    assert pre.object.read_bytes() != post.object.read_bytes()
    assert pre.argv[1:] == ["-O2", "-c", "-o", "util.o", "util.c"]  # as the build issued it
    assert pre.compiler == GCC_VERSION and GCC_VERSION.startswith("gcc ")
    # the wrapper's flags: one section per function, DWARF for the layout check
    for obj in (pre.object, post.object):
        names = section_names(obj)
        assert {".text.scale", ".text.offset", ".debug_info"} <= names

    assert pair.compiler == GCC_COMMENT
    assert pair.new_units == [] and pair.removed_units == []
    assert pair.touched_files == [] and pair.changed_asm == []
    assert pair.patch_text == (FIXTURES / "plain" / "scale.patch").read_text()
    assert snapshot(src) == before  # the user's tree is never modified


def test_header_only_change_keeps_units_unchanged(tmp_path: Path) -> None:
    """A header edit recompiles its users; byte-identical objects are reported as post=None."""
    src = fixture_tree("plain", tmp_path)
    patch = FIXTURES / "plain" / "decl.patch"
    pair = build(src, patch, tmp_path)
    post_log = (pair.workdir / "build-post.jsonl").read_text()
    assert '"source":"' + str(pair.workdir / "tree" / "util.c") in post_log  # it did recompile
    assert all(u.post is None for u in pair.units)
    assert pair.touched_files == ["util.h"]


def test_triplet_compiler_name_is_wrapped(tmp_path: Path) -> None:
    """debian/rules may call x86_64-linux-gnu-gcc by name instead of $CC."""
    triplet = subprocess.run(
        ["gcc", "-dumpmachine"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if shutil.which(f"{triplet}-gcc") is None:
        pytest.skip(f"no {triplet}-gcc")
    src = fixture_tree("plain", tmp_path)
    pair = build(src, FIXTURES / "plain" / "scale.patch", tmp_path, cmd=f"make CC={triplet}-gcc")
    util = unit(pair, "util.c")
    assert util.post is not None
    assert util.pre.argv[0] == str(pair.workdir / "shims" / f"{triplet}-gcc")
    assert ".text.scale" in section_names(util.pre.object)


def test_parallel_build_log_is_intact(tmp_path: Path) -> None:
    """make -j4 over 40 units: every compile is one intact JSON line (O_APPEND + flock)."""
    src = tmp_path / "src" / "many"
    src.mkdir(parents=True)
    n = 40
    for i in range(n):
        (src / f"u{i}.c").write_text(f"int f{i}(int x) {{ return x + {i}; }}\n")
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    objs = " ".join(f"u{i}.o" for i in range(n))
    (src / "Makefile").write_text(f"prog: main.o {objs}\n\t$(CC) -o $@ $^\n")
    patch = write_patch(
        tmp_path,
        "u7.patch",
        """\
--- a/u7.c
+++ b/u7.c
@@ -1 +1 @@
-int f7(int x) { return x + 7; }
+int f7(int x) { return x - 7; }
""",
    )
    pair = build(src, patch, tmp_path, jobs=4)
    lines = (pair.workdir / "build-pre.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert sorted(e["kind"] for e in events) == ["compile"] * (n + 1) + ["link"]
    assert len(pair.units) == n + 1
    assert [u.source for u in pair.units if u.post is not None] == ["u7.c"]
    assert all(u.targets == ["prog"] for u in pair.units)


# ---------------------------------------------------------------------------------------------
# archives, shared libraries, assembly


def test_static_archive_units_reach_the_executable(tmp_path: Path) -> None:
    src = fixture_tree("static", tmp_path)
    pair = build(src, FIXTURES / "static" / "mul.patch", tmp_path)
    assert unit(pair, "lib/mul.c").post is not None
    assert unit(pair, "lib/add.c").post is None
    for source in ("calc.c", "lib/add.c", "lib/mul.c"):
        assert unit(pair, source).targets == ["calc"]
    (calc,) = pair.links
    assert calc.name == "calc" and str(pair.workdir / "tree" / "lib" / "libops.a") in calc.inputs


def test_shared_library_units_belong_to_the_library(tmp_path: Path) -> None:
    src = fixture_tree("shared", tmp_path)
    # a -p0 patch: the strip level is detected
    pair = build(src, FIXTURES / "shared" / "greet.patch", tmp_path)
    assert unit(pair, "greet.c").targets == ["libgreet.so.1"]
    assert unit(pair, "greet.c").post is not None
    assert unit(pair, "hello.c").targets == ["hello"]
    kinds = {lk.name: lk.kind for lk in pair.links}
    assert kinds == {"libgreet.so.1": "shared_library", "hello": "executable"}


def test_assembly_unit_and_changed_asm(tmp_path: Path) -> None:
    src = fixture_tree("asm", tmp_path)
    pair = build(src, FIXTURES / "asm" / "twice.patch", tmp_path)
    twice = unit(pair, "twice.S")
    assert twice.pre.language == "asm" and twice.post is not None
    assert twice.targets == ["prog"]
    assert pair.changed_asm == ["twice.S"]
    # no -g added to assembly: the object has no DWARF the original build did not ask for
    assert ".debug_info" not in section_names(twice.pre.object)
    assert pair.compiler == GCC_COMMENT  # from the C unit: assembly has no .comment


# ---------------------------------------------------------------------------------------------
# build systems


@needs("autoreconf", "libtoolize", "automake")
def test_autotools_libtool_tree(tmp_path: Path) -> None:
    src = fixture_tree("autotools", tmp_path)
    subprocess.run(["autoreconf", "-fi"], cwd=src, check=True, capture_output=True)
    pair = build(
        src, FIXTURES / "autotools" / "loud.patch", tmp_path, cmd="./configure --quiet && make"
    )
    loud = unit(pair, "loud.c")
    assert loud.post is not None
    assert loud.pre.built_object.endswith("/.libs/loud.o")  # libtool's PIC object
    assert loud.targets == ["libloud.so.1.0.0"]
    assert unit(pair, "shout.c").targets == ["shout"]
    assert {lk.name for lk in pair.links} == {"libloud.so.1.0.0", "shout"}
    # configure's probes (conftest.c) are not units, and left nothing in the tree
    assert not any("conftest" in u.source for u in pair.units)
    assert not list((pair.workdir / "tree").glob("*conftest*"))


@needs("cmake")
def test_cmake_tree(tmp_path: Path) -> None:
    src = fixture_tree("cmake", tmp_path)
    pair = build(
        src,
        FIXTURES / "cmake" / "count.patch",
        tmp_path,
        cmd="cmake -S . -B build >/dev/null && cmake --build build",
    )
    cache = (pair.workdir / "tree" / "build" / "CMakeCache.txt").read_text()
    assert f"CMAKE_C_COMPILER:FILEPATH={pair.workdir / 'shims'}/gcc" in cache
    assert unit(pair, "src/count.c").post is not None
    assert unit(pair, "src/count.c").targets == ["counter"]  # via libcount.a
    assert unit(pair, "src/fmt.c").targets == ["libfmt.so"]
    assert unit(pair, "src/main.c").post is None
    assert not any("CMake" in u.source for u in pair.units)  # compiler-id probes dropped


@pytest.mark.slow
@needs("dpkg-buildpackage", "dh")
def test_debian_native_package(tmp_path: Path) -> None:
    src = fixture_tree("debian", tmp_path)
    pair = build(
        src, FIXTURES / "debian" / "clock.patch", tmp_path, cmd="dpkg-buildpackage -b -uc -us"
    )
    clock = unit(pair, "clock.c")
    assert clock.post is not None and clock.targets == ["tick"]
    assert unit(pair, "tick.c").post is None  # -nc: the post build did not clean
    assert "-D_FORTIFY_SOURCE=2" in clock.pre.argv  # dpkg-buildflags reached the compile
    assert [lk.name for lk in pair.links] == ["tick"]
    # dpkg-buildpackage writes the .deb next to the tree: inside the work directory
    assert list(pair.workdir.glob("tick_1.0_*.deb"))


@pytest.mark.slow
@needs("dpkg-buildpackage", "dh")
def test_debian_post_build_compiles_like_the_pre_build(tmp_path: Path) -> None:
    """dh skips its build step when debian/debhelper-build-stamp is left from the first
    build; `make install` then recompiles the changed unit without what debian/rules'
    build step passes (tree 2.1.0-1 lost -D_FORTIFY_SOURCE=2 that way)."""
    src = fixture_tree("debian", tmp_path)
    (src / "debian" / "rules").write_text(
        "#!/usr/bin/make -f\n%:\n\tdh $@\n"
        'override_dh_auto_build:\n\tdh_auto_build -- CFLAGS="$(CFLAGS) -DFROM_BUILD_STEP"\n'
    )
    pair = build(
        src, FIXTURES / "debian" / "clock.patch", tmp_path, cmd="dpkg-buildpackage -b -uc -us"
    )
    clock = unit(pair, "clock.c")
    assert clock.post is not None
    assert "-DFROM_BUILD_STEP" in clock.pre.argv and "-DFROM_BUILD_STEP" in clock.post.argv


def test_post_build_with_other_options_is_refused(tmp_path: Path) -> None:
    """A unit compiled with other options after the patch: its new code would not be built
    like the running code. A clean rebuild cannot help here: refuse, naming the options."""
    src = fixture_tree("plain", tmp_path)
    mk = src / "Makefile"
    mk.write_text(
        mk.read_text().replace(
            "CFLAGS ?= -O2", "CFLAGS ?= -O2\nCFLAGS += -DBUILT_AT=$(shell date +%s%N)", 1
        )
    )
    with pytest.raises(BuildFailed) as info:
        build(src, FIXTURES / "plain" / "scale.patch", tmp_path)
    assert "other options" in info.value.reason
    assert any("lost -DBUILT_AT=" in d and "added -DBUILT_AT=" in d for d in info.value.details)


# ---------------------------------------------------------------------------------------------
# patch problems: a clear message, and nothing touched


def test_patch_that_does_not_apply_names_file_and_hunk(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    with pytest.raises(PatchDoesNotApply) as info:
        build(src, FIXTURES / "plain" / "second-hunk-stale.patch", tmp_path)
    assert info.value.reason == (
        "second-hunk-stale.patch: hunk #2 of util.c does not apply (expected at line 8)"
    )
    tree = tmp_path / "work" / "tree"
    # the dry run failed, so hunk #1 was not applied either, and no .rej/.orig was left
    assert filecmp.cmp(tree / "util.c", src / "util.c", shallow=False)
    assert sorted(p.name for p in tree.iterdir() if p.suffix in (".rej", ".orig")) == []


def test_already_applied_patch_is_refused(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    subprocess.run(
        ["patch", "-s", "-p1", "-i", str(FIXTURES / "plain" / "scale.patch")], cwd=src, check=True
    )
    with pytest.raises(PatchDoesNotApply) as info:
        build(src, FIXTURES / "plain" / "scale.patch", tmp_path)
    assert "already" in info.value.reason and "util.c" in info.value.reason


def test_patch_naming_a_missing_file(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    patch = write_patch(
        tmp_path,
        "gone.patch",
        """\
--- a/src/nothere.c
+++ b/src/nothere.c
@@ -1 +1 @@
-int a;
+int b;
""",
    )
    with pytest.raises(PatchDoesNotApply) as info:
        build(src, patch, tmp_path)
    assert "src/nothere.c" in info.value.reason


# ---------------------------------------------------------------------------------------------
# build failures carry the compiler's own words


def test_pre_build_failure_carries_compiler_error(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    (src / "main.c").write_text((src / "main.c").read_text().replace("return 0;", "return 0"))
    with pytest.raises(BuildFailed) as info:
        build(src, FIXTURES / "plain" / "scale.patch", tmp_path)
    err = info.value
    assert err.reason.startswith("the unpatched tree does not build")
    assert any("main.c:" in d and "error: expected" in d for d in err.details), err.details
    assert len(err.details) <= 60


def test_post_build_failure_carries_compiler_error(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    patch = FIXTURES / "plain" / "broken.patch"
    with pytest.raises(BuildFailed) as info:
        build(src, patch, tmp_path)
    assert info.value.reason.startswith("the patched tree does not build")
    assert any("undeclared_factor" in d and "error:" in d for d in info.value.details)


def test_already_built_tree_is_rebuilt_through_the_wrapper(tmp_path: Path) -> None:
    """A user's tree where `make` already ran: the copy's objects are aged so that the pre
    build compiles every unit through the wrapper; the user's own objects are untouched."""
    src = fixture_tree("plain", tmp_path)
    subprocess.run(["make", "-s"], cwd=src, check=True)
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*.o")}
    assert before
    pair = build(src, FIXTURES / "plain" / "scale.patch", tmp_path)
    assert pair.units and any(u.post is not None for u in pair.units)
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*.o")} == before


# ---------------------------------------------------------------------------------------------
# the wrapper's command-line reading (pure functions)


def parse(*args: str, cxx: bool = False) -> wrapper.CompilerCommand:
    return wrapper.CompilerCommand(list(args), cxx)


def test_wrapper_reads_compile_commands() -> None:
    c = parse("-O2", "-MD", "-MF", "x.d", "-I", "inc", "-c", "x.c", "-o", "obj/x.o")
    assert c.mode == "compile" and c.output == "obj/x.o"
    assert [(s.path, s.language) for s in c.sources] == [("x.c", "c")]
    assert parse("-E", "x.c").mode == "preprocess"
    assert parse("-M", "x.c").mode == "preprocess"
    assert parse("-S", "x.c").mode == "asm"
    assert parse("x.c", "-o", "prog", "-lm").mode == "link"
    assert [s.language for s in parse("-c", "x.c", cxx=True).sources] == ["c++"]
    assert [s.language for s in parse("-x", "c", "-c", "gen.inc").sources] == ["c"]
    assert [s.language for s in parse("-c", "a.S", "b.cc").sources] == ["asm", "c++"]
    link = parse("-shared", "-o", "libx.so", "a.o", "-L", "lib", "-lfoo", "-Wl,-soname,libx.so")
    assert link.shared and link.libraries == ["foo"] and link.library_dirs == ["lib"]
    assert [i.path for i in link.linker_inputs()] == ["a.o"]


def test_wrapper_flag_placement() -> None:
    args = ["-O2", "-fno-function-sections", "-c", "x.c"]
    out = wrapper.with_extra_flags(args, parse(*args))
    # -g first (a build's own -g0/-g3 wins), section flags last (they win over -fno-...)
    assert out == ["-g", *args, "-ffunction-sections", "-fdata-sections"]
    args = ["-g3", "-c", "x.c"]
    assert wrapper.with_extra_flags(args, parse(*args))[0] == "-g3"
    args = ["-c", "x.S"]
    assert wrapper.with_extra_flags(args, parse(*args)) == args


def test_wrapper_reads_ar_commands() -> None:
    assert wrapper.parse_ar(["rcs", "libx.a", "a.o", "b.o"]) == ("r", "libx.a", ["a.o", "b.o"])
    assert wrapper.parse_ar(["qc", "libx.a", "a.o"]) == ("q", "libx.a", ["a.o"])
    assert wrapper.parse_ar(["--plugin", "p.so", "rcs", "l.a", "a.o"]) == ("r", "l.a", ["a.o"])
    assert wrapper.parse_ar(["rb", "a.o", "l.a", "c.o"]) == ("r", "l.a", ["c.o"])
    assert wrapper.parse_ar(["t", "l.a"]) == ("t", "l.a", [])


def test_wrapper_script_runs_without_site_packages(tmp_path: Path) -> None:
    """The shim runs wrapper.py with -I -S: it must need nothing but the standard library."""
    log = tmp_path / "log.jsonl"
    (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
    env = {**os.environ, wrapper.LOG_ENV: str(log)}
    subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            wrapper.__file__,
            "gcc",
            "/usr/bin/gcc",
            str(tmp_path),
            "gcc",
            "-c",
            "x.c",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    (event,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert event["kind"] == "compile" and event["object"] == str(tmp_path / "x.o")
    assert ".text.x" in section_names(tmp_path / "x.o")


def test_wrapper_json_reads_back() -> None:
    """The wrapper encodes its events by hand (import json is slow): json.loads must agree."""
    event = {
        "kind": "compile",
        "argv": ["gcc", '-DMSG="a\\b"', "-Dtab=\t", "é", "\x7f\x01"],
        "split": False,
        "shared": True,
        "n": 3,
        "none": None,
        "inputs": [],
    }
    assert json.loads(wrapper.to_json(event)) == event


def test_new_unit_gets_its_targets_from_the_post_build(tmp_path: Path) -> None:
    src = fixture_tree("static", tmp_path)
    pair = build(src, FIXTURES / "static" / "new-unit.patch", tmp_path)
    (new,) = pair.new_units
    assert new.source == "lib/sub.c" and new.object.is_relative_to(pair.workdir / "post")
    assert pair.new_unit_targets == {new.built_object: ["calc"]}
    assert all(u.post is None for u in pair.units)  # nothing else recompiled
    assert pair.touched_files == ["Makefile"]  # lib/sub.c produced an object: not listed


def test_cxx_unit_and_compile_via_assembly(tmp_path: Path) -> None:
    """``cc -S`` then ``cc -c x.s``: the flags reach the -S step and the unit is the C source."""
    src = fixture_tree("twostep", tmp_path)
    pair = build(src, FIXTURES / "twostep" / "calc.patch", tmp_path)
    assert unit(pair, "main.cc").pre.language == "c++"
    calc = unit(pair, "calc.c")
    assert calc.pre.language == "c" and calc.post is not None
    assert calc.targets == ["prog"]
    assert {".text.calc", ".debug_info"} <= section_names(calc.pre.object)
    assert pair.changed_asm == [] and pair.touched_files == []


def test_workdir_inside_the_source_tree_is_not_copied(tmp_path: Path) -> None:
    src = fixture_tree("plain", tmp_path)
    workdir = src / ".livesplice-work"
    workdir.mkdir()
    pair = build_pair(
        src, FIXTURES / "plain" / "scale.patch", build_cmd="make", workdir=workdir, jobs=2
    )
    assert not (pair.workdir / "tree" / ".livesplice-work").exists()
    assert unit(pair, "util.c").post is not None


def test_rebuild_that_misses_the_patch_is_an_error_not_nothing_to_do(tmp_path: Path) -> None:
    """A build that compiles a stamped copy of its sources (like expat's debian/rules) does
    not recompile after the patch: that must fail loudly, never become "nothing to do"."""
    src = tmp_path / "src"
    (src / "orig").mkdir(parents=True)
    (src / "orig" / "calc.c").write_text("int calc(int x)\n{\n\treturn x + 1;\n}\n")
    (src / "main.c").write_text("int calc(int x);\nint main(void)\n{\n\treturn calc(1) - 2;\n}\n")
    (src / "Makefile").write_text(
        "prog: copied.stamp main.o\n"
        "\t$(CC) -O2 -c -o build/calc.o build/calc.c\n"
        "\t$(CC) -o prog main.o build/calc.o\n"
        "copied.stamp:\n\tmkdir -p build && cp orig/calc.c build/calc.c && touch $@\n"
        "main.o: main.c\n\t$(CC) -O2 -c -o $@ main.c\n"
    )
    patch = tmp_path / "fix.patch"
    patch.write_text(
        "--- a/orig/calc.c\n+++ b/orig/calc.c\n@@ -1,4 +1,4 @@\n int calc(int x)\n {\n"
        "-\treturn x + 1;\n+\treturn x + 2;\n }\n"
    )
    with pytest.raises(BuildFailed) as info:
        build(src, patch, tmp_path)
    assert "did not recompile" in info.value.reason
    assert any("orig/calc.c" in d for d in info.value.details)


def test_code_options_see_what_changes_code(tmp_path: Path) -> None:
    """Found by review: two-word options, response files and the compiler itself were not
    compared; the order of macro definitions does not matter."""
    from livesplice.build.builder import code_options

    def same(a: list[str], b: list[str]) -> bool:
        return code_options(a) == code_options(b)

    assert not same(["gcc", "-D", "_FORTIFY_SOURCE=2", "x.c"], ["gcc", "-D", "_FORTIFY_SOURCE=3"])
    assert not same(["gcc", "-include", "a.h"], ["gcc", "-include", "b.h"])
    assert not same(["gcc", "-I", "inc1"], ["gcc", "-I", "inc2"])
    assert not same(["gcc-12", "-O2"], ["gcc-13", "-O2"])
    one, two = tmp_path / "one.rsp", tmp_path / "two.rsp"
    one.write_text("-O2 -DX=1\n")
    two.write_text("-O3 -DX=1\n")
    assert not same(["gcc", f"@{one}"], ["gcc", f"@{two}"])
    assert same(
        ["gcc", "-DA", "-DB", "-c", "x.c", "-o", "x.o", "-MD", "-MF", "x.d"],
        ["/usr/bin/gcc", "-DB", "-DA", "-c", "y.c", "-o", "y.o"],
    )
