"""The diff stage, object by object: real gcc -O2 -ffunction-sections -fdata-sections -g.

Each test compiles a pre and a post version of a small unit and calls
:func:`livesplice.diff.engine.diff_objects` directly; one test per rule of the diff (see
docs/ARCHITECTURE.md "Contract 2" and the module docstrings of ``livesplice.diff``).
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest

from livesplice.diff.compare import LineMap
from livesplice.diff.elfmodel import Status, load_object
from livesplice.diff.engine import UnitDiff, diff_objects, refusals_once_per_type, unresolvable_keys
from livesplice.update.format import Target

REPO = Path(__file__).resolve().parents[1]
CFLAGS = ["-O2", "-g", "-ffunction-sections", "-fdata-sections", "-fPIE"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build(
    tmp: Path, pre: str, post: str, *, name: str = "u.c", header: tuple[str, str] | None = None
) -> tuple[Path, Path, LineMap]:
    """Compile ``pre`` and ``post`` (cwd-relative names, so __FILE__ is the same)."""
    objs = []
    patch = ""
    compiler = "g++" if name.endswith(".cc") else "gcc"
    for side, text in (("pre", pre), ("post", post)):
        d = tmp / side
        d.mkdir()
        (d / name).write_text(text)
        if header is not None:
            (d / "u.h").write_text(header[0] if side == "pre" else header[1])
        subprocess.run(
            [compiler, *CFLAGS, f"-I{REPO / 'include'}", "-c", name, "-o", "u.o"],
            cwd=d,
            check=True,
        )
        objs.append(d / "u.o")
    files = [(name, pre, post)] + ([("u.h", *header)] if header else [])
    for fname, a, b in files:
        patch += "".join(
            difflib.unified_diff(a.splitlines(True), b.splitlines(True), f"a/{fname}", f"b/{fname}")
        )
    return objs[0], objs[1], LineMap.from_patch(patch)


def diff(tmp: Path, pre: str, post: str, **kw: object) -> UnitDiff:
    name = str(kw.pop("name", "u.c"))
    header = kw.pop("header", None)
    pre_o, post_o, lm = build(tmp, pre, post, name=name, header=header)  # type: ignore[arg-type]
    ud = diff_objects(pre_o, post_o, name, line_map=lm)
    # every diff must be self-consistent: each key of shipped code resolvable at apply
    target = Target(
        name="t",
        kind="executable",
        build_id="",
        changed_functions=ud.changed_functions,
        new_functions=ud.new_functions,
        new_data=ud.new_data,
        sections=ud.sections,
        symbols=ud.symbols,
    )
    assert unresolvable_keys(target) == []
    return ud


def roles(ud: UnitDiff) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in ud.sections:
        out.setdefault(s.name, []).append(s.role)
    return {k: sorted(v) for k, v in out.items()}


BASE = """\
#include <stdio.h>
int g_total;
static int scale = 3;
int compute(int x) { return x * scale + 1; }
int other(int x) { return x - 7; }
void set_scale(int s) { scale = s; }
"""


def test_body_change_ships_replacement_and_pre(tmp_path: Path) -> None:
    ud = diff(tmp_path, BASE, BASE.replace("x * scale + 1", "x * scale + 2"))
    assert ud.changed_functions == ["compute"]
    assert ud.functions["other"] is Status.SAME
    assert roles(ud)["compute"] == ["pre", "replacement"]
    rep = next(s for s in ud.sections if s.role == "replacement")
    assert rep.key == rep.replaces == "u.c:.text.compute"
    # the static `scale` is existing data reached through the pre code's relocation
    assert "u.c:.data.scale" in {r.symbol for r in rep.relocs}
    assert ud.refusals == []


def test_no_change_is_nothing(tmp_path: Path) -> None:
    ud = diff(tmp_path, BASE, BASE.replace("int other", "/* c */ int other"))
    assert not ud.changed and ud.sections == []


def test_unchanged_callee_is_matched_not_shipped(tmp_path: Path) -> None:
    src = """\
static __attribute__((noinline)) int helper(int x) { return x * 5; }
int top(int x) { return helper(x) + 1; }
"""
    ud = diff(tmp_path, src, src.replace("+ 1", "+ 9"))
    assert ud.changed_functions == ["top"]
    assert roles(ud)["helper"] == ["pre"]  # its address comes from run-pre matching


def test_new_function_and_new_global(tmp_path: Path) -> None:
    post = BASE.replace(
        "int compute(int x) { return x * scale + 1; }",
        "int g_calls;\n__attribute__((noinline)) int bonus(int x) { g_calls++; return x > 9; }\n"
        "int compute(int x) { return x * scale + 1 + bonus(x); }",
    )
    ud = diff(tmp_path, BASE, post)
    assert ud.changed_functions == ["compute"]
    assert ud.new_functions == ["bonus"]
    assert ud.new_data == ["g_calls"]


def test_numbered_static_locals_correlate_by_user(tmp_path: Path) -> None:
    pre = """\
int f(void) { static int counter; return ++counter; }
int g(void) { static int counter; return counter += 2; }
"""
    post = "int h(void) { static int counter; return counter += 3; }\n" + pre
    ud = diff(tmp_path, pre, post)
    assert ud.functions["f"] is Status.SAME and ud.functions["g"] is Status.SAME
    assert ud.new_functions == ["h"]
    assert len(ud.new_data) == 1 and ud.new_data[0].startswith("counter.")
    # the new counter must not be confused with an existing one (same name in pre)
    new = next(s for s in ud.sections if s.role == "new_data")
    pre_obj = load_object(tmp_path / "pre" / "u.o", "u.c")
    h_uses = {r.symbol.section.name for r in pre_obj.sections[0].relocs if r.symbol.section}
    assert new.key not in {f"u.c:{n}" for n in h_uses}


def test_static_local_kept_is_not_new_data(tmp_path: Path) -> None:
    pre = "int tick(void) { static int calls; return ++calls; }\n"
    ud = diff(tmp_path, pre, pre.replace("++calls", "calls += 2"))
    assert ud.changed_functions == ["tick"] and ud.new_data == []


def test_string_literal_compares_by_content(tmp_path: Path) -> None:
    pre = """\
#include <stdio.h>
void hello(void) { puts("hello"); puts("world"); }
void bye(void) { puts("bye"); }
"""
    ud = diff(tmp_path, pre, pre.replace('"hello"', '"hello, patched"'))
    assert ud.changed_functions == ["hello"]
    assert ud.functions["bye"] is Status.SAME
    copied = [s for s in ud.sections if s.role == "copied_rodata"]
    assert copied and b"hello, patched" in bytes.fromhex(copied[0].data)
    assert copied[0].key.endswith("#post")  # a copy never reuses the pre key


def test_string_offsets_shift_but_meaning_same(tmp_path: Path) -> None:
    # A new string before the existing ones shifts their offsets in .rodata.<fn>.str1.1;
    # `show` (which references the shifted strings) is changed only because of the new call.
    pre = """\
#include <stdio.h>
void show(int v) { if (v) puts("one"); else puts("two"); }
"""
    post = pre.replace('if (v) puts("one")', 'if (v > 5) puts("zero"); if (v) puts("one")')
    ud = diff(tmp_path, pre, post)
    assert ud.changed_functions == ["show"]


def test_line_number_only_change_is_unchanged(tmp_path: Path) -> None:
    pre = """\
#include <assert.h>
int check(int x)
{
\tassert(x < 1000);
\treturn x + 1;
}
"""
    post = pre.replace("int check", "/* a comment\n * two lines */\nint check")
    ud = diff(tmp_path, pre, post)
    assert ud.functions["check"] is Status.SAME
    assert ud.line_only == ["check"]
    assert not ud.changed


def test_line_shift_with_real_change_is_changed(tmp_path: Path) -> None:
    pre = """\
#include <assert.h>
int check(int x)
{
\tassert(x < 1000);
\treturn x + 1;
}
"""
    post = pre.replace("int check", "/* moved */\nint check").replace("x + 1", "x + 2")
    ud = diff(tmp_path, pre, post)
    assert ud.changed_functions == ["check"]


def test_constant_that_looks_like_a_line_shift_is_a_change(tmp_path: Path) -> None:
    # line 3 moves to 4, and the patch changes a constant 3 -> 4 elsewhere: still a change,
    # because 3 is not a line of `limit` (rule 3 of compare.py's line-number check)
    pre = "int pad;\n\nint x3;\nint limit(int v) { return v ^ 3; }\n"
    post = "int pad;\n\n\nint x3;\nint limit(int v) { return v ^ 4; }\n"
    ud = diff(tmp_path, pre, post)
    assert ud.changed_functions == ["limit"]


def test_switch_jump_table_travels_with_function(tmp_path: Path) -> None:
    pre = """\
int dispatch(int op, int v)
{
\tswitch (op) {
\tcase 0: return v + 11; case 1: return v * 23; case 2: return v - 37;
\tcase 3: return v ^ 41; case 4: return v / 99; case 5: return v % 7;
\tcase 6: return v << 3; default: return -1;
\t}
}
"""
    ud = diff(tmp_path, pre, pre.replace("v ^ 41", "v ^ 42"))
    assert ud.changed_functions == ["dispatch"]
    tables = [s for s in ud.sections if s.role == "copied_rodata"]
    assert tables, "the post jump table must ship"
    assert all(r.symbol == "u.c:.text.dispatch" for t in tables for r in t.relocs)


def test_inlined_static_change_changes_callers(tmp_path: Path) -> None:
    pre = """\
static inline int sq(int x) { return x * x; }
int a(int x) { return sq(x) + 1; }
int b(int x) { return sq(x) - 1; }
int c(int x) { return x; }
"""
    ud = diff(tmp_path, pre, pre.replace("x * x", "x * x + 3"))
    assert ud.changed_functions == ["a", "b"]


def test_changed_clone_ships_its_callers(tmp_path: Path) -> None:
    pre = """\
struct big { int w[16]; };
static __attribute__((noinline)) int weight(struct big *b) { return b->w[3] * 7; }
int use1(struct big *b) { return weight(b) + 1; }
int use2(struct big *b) { return weight(b) + 2; }
"""
    (tmp_path / "probe").mkdir()
    pre_o, _, _ = build(tmp_path / "probe", pre, pre)
    names = {s.name for s in load_object(pre_o, "u.c").functions}
    clone = next((n for n in names if n.startswith("weight.")), None)
    if clone is None:
        pytest.skip(f"gcc made no clone of weight here: {sorted(names)}")
    ud = diff(tmp_path, pre, pre.replace("* 7", "* 9"))
    assert clone in ud.changed_functions
    assert {"use1", "use2"} <= set(ud.changed_functions)


def test_cold_part_travels_with_parent(tmp_path: Path) -> None:
    # a call to a cold function then exit(): gcc -O2 moves the error path to .text.unlikely
    # as the fragment sum.cold; the patch changes only that fragment
    pre = """\
#include <stdio.h>
#include <stdlib.h>
extern void report_error(const char *what, int v) __attribute__((cold));
int sum(const int *v, int n)
{
\tint s = 0;
\tfor (int i = 0; i < n; i++) {
\t\tif (v[i] < 0) { report_error("v", v[i]); fprintf(stderr, "bad %d\\n", v[i]); exit(2); }
\t\ts += v[i];
\t}
\treturn s;
}
"""
    ud = diff(tmp_path, pre, pre.replace("exit(2)", "exit(3)"))
    assert ud.changed_functions == ["sum"]  # the fragment is reported as its parent
    shipped = roles(ud)
    assert shipped["sum.cold"] == ["pre", "replacement"]
    assert shipped["sum"] == ["pre", "replacement"]


# -- refusals ------------------------------------------------------------------------------


def test_changed_initial_value_is_refused(tmp_path: Path) -> None:
    ud = diff(tmp_path, BASE, BASE.replace("scale = 3", "scale = 4"))
    assert any("scale" in r and "initial value" in r for r in ud.refusals)


def test_grown_global_array_is_refused(tmp_path: Path) -> None:
    pre = "int table[4];\nint get(int i) { return table[i]; }\n"
    ud = diff(tmp_path, pre, pre.replace("[4]", "[8]"))
    assert any("table" in r and "size" in r for r in ud.refusals)


def test_tls_new_and_changed_are_refused(tmp_path: Path) -> None:
    pre = "__thread int depth = 1;\nint d(void) { return depth++; }\n"
    post = "__thread int depth = 2;\n__thread int extra;\nint d(void) { return depth++ + extra; }\n"
    ud = diff(tmp_path, pre, post)
    text = "\n".join(ud.refusals)
    assert "depth: changed thread-local" in text and "extra: new thread-local" in text


def test_new_constructor_is_refused(tmp_path: Path) -> None:
    post = BASE + "__attribute__((constructor)) static void init(void) { g_total = 1; }\n"
    ud = diff(tmp_path, BASE, post)
    assert any("init" in r and "constructor" in r for r in ud.refusals)


def test_existing_constructor_is_fine(tmp_path: Path) -> None:
    pre = BASE + "__attribute__((constructor)) static void init(void) { g_total = 1; }\n"
    ud = diff(tmp_path, pre, pre.replace("x - 7", "x - 8"))
    assert ud.refusals == [] and ud.changed_functions == ["other"]


def test_header_buffer_grow_without_code_change_is_refused(tmp_path: Path) -> None:
    # dnsmasq CVE-2026-2291 pattern: MAX grows in a header, no function's text changes
    src = """\
#include <string.h>
#include "u.h"
struct req *last;
int first(struct req *r) { last = r; return r->id; }
"""
    h_pre = "#define MAX 32\nstruct req { int id; char name[MAX]; };\n"
    ud = diff(tmp_path, src, src, header=(h_pre, h_pre.replace("32", "64")))
    assert ud.changed_functions == []
    assert any("struct req" in r and "layout" in r for r in ud.refusals)


def test_struct_member_added_is_refused(tmp_path: Path) -> None:
    pre = "struct s { int a; int b; };\nint get(struct s *p) { return p->b; }\n"
    post = "struct s { int a; int x; int b; };\nint get(struct s *p) { return p->b; }\n"
    ud = diff(tmp_path, pre, post)
    assert any("struct s" in r for r in ud.refusals)


def test_local_stack_buffer_may_grow(tmp_path: Path) -> None:
    pre = """\
#include <string.h>
#include <stdio.h>
int fmt(const char *s) { char buf[16]; snprintf(buf, sizeof buf, "%s", s); return strlen(buf); }
"""
    ud = diff(tmp_path, pre, pre.replace("buf[16]", "buf[64]"))
    assert ud.refusals == [] and ud.changed_functions == ["fmt"]


def test_all_refusals_are_collected(tmp_path: Path) -> None:
    post = BASE.replace("scale = 3", "scale = 5").replace("int g_total;", "__thread int t;")
    post += "__attribute__((constructor)) static void init(void) { t = 1; }\n"
    ud = diff(tmp_path, BASE, post)
    rules = " ".join(ud.refusals)
    assert "initial value" in rules and "thread-local" in rules and "constructor" in rules


# -- hooks, C++, determinism ---------------------------------------------------------------


def test_hook_ships_with_role_hook(tmp_path: Path) -> None:
    post = (
        '#include "livesplice.h"\n'
        + BASE.replace("x * scale + 1", "x * scale + 2")
        + "static int fix_up(void) { g_total = 0; return 0; }\nLIVESPLICE_POST_APPLY(fix_up);\n"
    )
    ud = diff(tmp_path, BASE, post)
    assert [(h.kind, h.function) for h in ud.hooks] == [("post_apply", "fix_up")]
    assert roles(ud)["fix_up"] == ["hook"]
    assert ud.new_functions == [] and ud.new_data == []
    assert ud.changed_functions == ["compute"]


def test_cxx_member_function_body_change(tmp_path: Path) -> None:
    src = """\
struct Counter { int n; __attribute__((noinline)) int bump(int by); };
int Counter::bump(int by) { n += by; return n; }
int use(Counter &c) { return c.bump(1); }
"""
    ud = diff(tmp_path, src, src.replace("n += by;", "n += 2 * by;"), name="u.cc")
    assert ud.changed_functions == ["_ZN7Counter4bumpEi"]
    assert ud.refusals == []


def test_output_is_deterministic(tmp_path: Path) -> None:
    pre_o, post_o, lm = build(tmp_path, BASE, BASE.replace("x - 7", "x - 9"))
    a = diff_objects(pre_o, post_o, "u.c", line_map=lm)
    b = diff_objects(pre_o, post_o, "u.c", line_map=lm)
    assert a.sections == b.sections and a.symbols == b.symbols


def test_line_map_from_patch() -> None:
    patch = """\
--- a/x.c
+++ b/x.c
@@ -2,0 +3,2 @@
+new1
+new2
@@ -10,2 +12,1 @@
-gone
 kept
"""
    lm = LineMap.from_patch(patch)
    assert lm.shift("x.c", 1) == 1 and lm.shift("x.c", 2) == 2
    assert lm.shift("x.c", 3) == 5 and lm.shift("x.c", 9) == 11
    assert lm.shift("x.c", 10) is None and lm.shift("x.c", 11) == 12
    assert lm.shift("x.c", 20) == 21
    assert lm.shift("other.c", 7) == 7


def test_cxx_function_with_exception_tables_is_refused(tmp_path: Path) -> None:
    src = """\
#include <string>
#include <stdexcept>
int f(const char *s)
{
	std::string t(s);
	if (t.empty()) throw std::runtime_error("x");
	return t.size();
}
"""
    pre_o, post_o, _ = build(tmp_path, src, src.replace("t.size();", "t.size() + 1;"), name="u.cc")
    ud = diff_objects(pre_o, post_o, "u.cc")
    assert any("_Z1fPKc" in r and "exception" in r for r in ud.refusals)


def test_diff_many_in_workers_equals_serial(tmp_path: Path) -> None:
    """The worker-process diff returns, in job order, what the serial diff returns.

    Two units with different changes, so a reordering or a lost result shows.
    """
    from livesplice.diff.engine import DiffJob, diff_many

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build(tmp_path / "a", "int f(int x) { return x; }\n", "int f(int x) { return x + 1; }\n")
    b = build(
        tmp_path / "b",
        "int g(int x) { return x; }\nint h(int x) { return x * 2; }\n",
        "int g(int x) { return x; }\nint h(int x) { return x * 3; }\n",
    )
    jobs = [DiffJob(a[0], a[1], "a.c"), DiffJob(b[0], b[1], "b.c")]
    serial = diff_many(jobs, workers=1)
    parallel = diff_many(jobs, workers=2)
    assert [u.changed_functions for u in serial] == [["f"], ["h"]]
    assert [(u.unit, u.changed_functions, u.sections) for u in parallel] == [
        (u.unit, u.changed_functions, u.sections) for u in serial
    ]


def test_many_sections_keep_line_rows(tmp_path: Path) -> None:
    """Relocations of .debug_line still reach every one of many function sections.

    The relocation table is now built once per object (it was searched per section); each
    function's line rows must still name its own lines.
    """
    from livesplice.diff.dwarf import line_rows_by_section

    src = "".join(f"int fn_{i}(int x)\n{{\n  return x + {i};\n}}\n" for i in range(300))
    pre, _, _ = build(tmp_path, src, src)
    rows = line_rows_by_section(pre)
    for i in (0, 150, 299):
        lines = next(iter(rows[f".text.fn_{i}"].values()))
        assert lines[0] >= 4 * i + 1 and lines[1] <= 4 * i + 4


COUNTER_PRE = """
#define P2(a, b) a##b
#define P(a, b) P2(a, b)
#define TAG(fn) static int (*P(__UNIQUE_ID_addr_, __COUNTER__))(int) \\
    __attribute__((used)) = fn
int f(int x) { return x + 1; }
TAG(f);
int g(int x) { return x * 2; }
TAG(g);
"""


def test_counter_names_renumbered_are_not_changes(tmp_path: Path) -> None:
    """``__UNIQUE_ID_*N`` (the kernel's __COUNTER__ names) pair by content, not number.

    The patch adds a tagged function before f: f's and g's tags are renumbered 0->1, 1->2.
    Only h and its own tag are new; f, g and their tags are unchanged (issue 12 item 2).
    """
    post = COUNTER_PRE.replace(
        "int f(int x)", "int h(int x) { return x - 3; }\nTAG(h);\nint f(int x)"
    )
    ud = diff(tmp_path, COUNTER_PRE, post)
    assert ud.refusals == []
    assert ud.changed_functions == []
    assert ud.new_functions == ["h"]
    assert ud.new_data == ["__UNIQUE_ID_addr_0"]


KEYS_PRE = """
struct lock_class_key { };
void reg(void *p, const char *name, struct lock_class_key *key);
#define lock_init(p) do { static struct lock_class_key __key; reg((p), #p, &__key); } while (0)
void init_once(char *a) { lock_init(a); lock_init(a + 8); lock_init(a + 16); }
int other(int x) { return x + 1; }
"""


def test_zero_size_keys_of_one_function_are_not_changes(tmp_path: Path) -> None:
    """Three ``__key`` (lockdep keys: zero-size without lockdep) in one function pair in the
    order of use; renumbered by a new user before them, the function is still unchanged.

    jfs's ``init_once`` (init_rwsem, mutex_init, init_rwsem) was claimed changed by a fix to
    ``jfs_fill_super``: the three had the same base name and user, so no rule told them apart.
    """
    post = KEYS_PRE.replace(
        "void init_once", "void setup(char *a) { lock_init(a); }\nvoid init_once"
    ).replace("x + 1", "x + 2")
    ud = diff(tmp_path, KEYS_PRE, post)
    assert ud.refusals == []
    assert ud.changed_functions == ["other"]
    assert ud.new_functions == ["setup"]
    assert ud.functions["init_once"] is Status.SAME


RATELIMIT_PRE = """
struct rs { int interval, burst; };
int rl(struct rs *r);
#define LIMITED() ({ static struct rs _rs = { 5, 10 }; rl(&_rs); })
int err_path(int x) { if (x == 1) return LIMITED(); if (x == 2) return LIMITED() + 1; return 0; }
int other(int x) { return x + 1; }
"""


def test_two_same_statics_of_an_unchanged_function_pair_by_place(tmp_path: Path) -> None:
    """Two ``printk_ratelimited`` states of one function (same base, user and content):
    tty_io.c's ``_rs.14``/``_rs.16`` made tty_init_dev.part.0 and its three callers claimed
    by a one-line fix elsewhere. The function is byte-identical: they pair by place."""
    post = RATELIMIT_PRE.replace(
        "int err_path", "int first(void) { return LIMITED(); }\nint err_path"
    ).replace("x + 1", "x + 2")
    ud = diff(tmp_path, RATELIMIT_PRE, post)
    assert ud.changed_functions == ["other"]
    assert ud.functions["err_path"] is Status.SAME
    assert ud.new_functions == ["first"]


def test_two_same_statics_of_a_changed_function_stay_apart(tmp_path: Path) -> None:
    """When the function using them changes, which old state goes with which new use is a
    guess: they are not paired by place (the new code gets fresh variables)."""
    post = RATELIMIT_PRE.replace("x == 2", "x == 3")
    ud = diff(tmp_path, RATELIMIT_PRE, post)
    assert ud.changed_functions == ["err_path"]
    assert len(ud.new_data) == 2 and all(n.startswith("_rs.") for n in ud.new_data)


ONCE_PRE = """
#define ONCE() ({ static int __already_done __attribute__((section(".data.once"))); \\
    int first = !__already_done; __already_done = 1; first; })
int sink;
int f(int x) { if (x < 0 && ONCE()) sink++; return x + 1; }
int g(int x) { if (x > 9 && ONCE()) sink--; return x * 2; }
"""


def test_once_flag_added_before_unchanged_functions(tmp_path: Path) -> None:
    """WARN_ONCE-like flags share one section (.data.once); a new one renumbers the others.

    f and g are unchanged and must not be claimed (their flags are found by the variable at
    the referenced offset, not the section); the refusal names the section's growth by the
    new flag, not a size change of a 4-byte variable (issue 12 items 2 and 5).
    """
    post = ONCE_PRE.replace(
        "int f(int x)", "int e(int x) { if (x == 3 && ONCE()) sink += 2; return x; }\nint f(int x)"
    )
    ud = diff(tmp_path, ONCE_PRE, post)
    assert ud.changed_functions == []
    assert len(ud.refusals) == 1
    assert ud.refusals[0].startswith("section .data.once grew (8 -> 12 bytes) by new variable(s)")


def test_layout_change_is_said_once_per_type_over_units(tmp_path: Path) -> None:
    """Two units using one grown header struct: one item, both units, what changed."""
    h_pre = "struct req { int id; unsigned a : 3; unsigned b : 5; char name[8]; };\n"
    h_post = "struct req { long id; unsigned a : 3; unsigned c : 2; char name[8]; };\n"
    src = '#include "u.h"\nint {}(struct req *r) {{ return r->a; }}\n'
    uds = [
        diff(
            _mkdir(tmp_path / unit),
            src.format(fn),
            src.format(fn),
            name=unit,
            header=(h_pre, h_post),
        )
        for unit, fn in (("one.c", "first"), ("two.c", "second"))
    ]
    assert all(len(ud.refusals) == 1 and len(ud.layout_changes) == 1 for ud in uds)
    other = "x: initial value of existing data changed [rule: changed initial value]"
    merged = refusals_once_per_type([other, *uds[0].refusals, *uds[1].refusals], uds)
    assert merged[0] == other and len(merged) == 2, merged
    text = merged[1]
    assert text.startswith("struct req: memory layout changed [rule: changed struct layouts]")
    assert "size 16 -> 24 bytes" in text, text
    assert "added c (unsigned int:4 at bit67:2b); removed b" in text, text
    assert "moved a bit32:3b -> bit64:3b, name 5 -> 9" in text, text
    assert "retyped id int:4 -> long int:8" in text, text
    assert "2 unit(s) (one.c, two.c) by functions first, second" in text, text


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
