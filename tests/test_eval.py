"""The evaluation harness: corpus parsing, series splitting, outcome classification, the
results table, and the workloads with real processes. The full real-package runs are slow
(two package builds per row): set LIVESPLICE_EVAL_SLOW=1 to run them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from livesplice.diff.compare import LineMap
from livesplice.errors import UsageError
from livesplice.eval.corpus import parse_corpus, rules_pinned_tail, select_rows, split_series
from livesplice.eval.create_step import parse_create_output
from livesplice.eval.report import markdown_table, summary_line
from livesplice.eval.runner import RowResult, find_target, verdict
from livesplice.eval.workloads import ExpatWorkload, workload_for

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "userspace-public.csv"
HEADER = "package,version,first_patch,last_patch,cves,expected,target,change_class"


def test_public_corpus_parses() -> None:
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} not present")
    rows = parse_corpus(CORPUS.read_text().splitlines())
    assert len(rows) == 9
    redis = rows[0]
    assert (redis.package, redis.upstream_free_version) == ("redis", "7.0.15-1~deb12u10")
    assert redis.update_id == "redis-cve-2026-81934"
    assert {r.expected for r in rows} == {"apply", "nothing", "refuse"}


def test_quoted_fields_and_epochs() -> None:
    rows = parse_corpus(
        [
            HEADER,
            'openssh,1:9.2p1-2+deb12u10,A.patch,B.patch,CVE-1 CVE-2,refuse,sshd,"x, y"',
        ]
    )
    (r,) = rows
    assert r.change_class == "x, y" and r.upstream_free_version == "9.2p1-2+deb12u10"
    assert r.slug == "openssh_9.2p1-2+deb12u10_A.patch"
    assert r.update_id == "openssh-cve-1"


def test_bad_rows_are_reported_together() -> None:
    with pytest.raises(UsageError) as info:
        parse_corpus([HEADER, "a,1,p,p,C,apply,t,", "b,1,p,p,C,maybe,t,", "c,,p,p,C,apply,t,"])
    assert "2 bad row(s)" in info.value.reason
    assert any("maybe" in d for d in info.value.details)
    assert any("empty version" in d for d in info.value.details)


def test_missing_column() -> None:
    with pytest.raises(UsageError, match="missing column"):
        parse_corpus(["package,version", "a,1"])


def test_select_rows_by_number_range_name_and_cve() -> None:
    rows = parse_corpus([HEADER] + [f"p{i},1,a,a,CVE-{i},apply,t{i}," for i in range(1, 6)])
    assert [r.number for r in select_rows(rows, "2-3,p5,CVE-1,2")] == [2, 3, 5, 1]
    assert select_rows(rows, None) == rows
    with pytest.raises(UsageError):
        select_rows(rows, "nosuch")


SERIES = """\
# Debian patches
01-build.patch
02-feature.patch -p0
CVE-1.patch   # the fix
CVE-1-part2.patch

later.patch
"""


def test_split_series_around_a_fix() -> None:
    s = split_series(SERIES, "CVE-1.patch", "CVE-1-part2.patch")
    assert s.pre == ["01-build.patch", "02-feature.patch -p0"]  # options kept
    assert s.fix == ["CVE-1.patch", "CVE-1-part2.patch"]
    assert "later.patch" not in s.post
    first = split_series(SERIES, "01-build.patch", "01-build.patch")
    assert first.pre == [] and first.fix == ["01-build.patch"]


# curl 7.88.1-10+deb12u15's debian/rules (abridged): two bare pops before the OpenSSL copy
CURL_RULES = """\
override_dh_auto_configure:
\tmkdir -p debian/build
# pop the last patch (nss)
\tquilt pop
# pop the second last patch (gnutls)
\tquilt pop
\ttar -cf - --exclude=debian/build* --exclude=.pc . | tar -xf - -C debian/build
\tquilt push
\tquilt push
"""


def test_rules_pinned_tail_counts_pops_of_the_series_end() -> None:
    assert rules_pinned_tail(CURL_RULES) == 2
    assert rules_pinned_tail("%:\n\tdh $@\n") == 0
    # -a pops everything and a named pop does not depend on order; a count pops N
    assert rules_pinned_tail("x:\n\tquilt pop -a\n\tquilt pop foo.patch\n") == 0
    assert rules_pinned_tail("x:\n\tQUILT_PATCHES=debian/patches quilt pop -q 3 && ls\n") == 3
    assert rules_pinned_tail("# quilt pop\nquilt pop: a rule name, not a recipe\n") == 0


def test_split_series_keeps_a_pinned_tail_last_in_both_trees() -> None:
    series = SERIES + "90_gnutls.patch\n99_nss.patch\n"
    s = split_series(series, "CVE-1.patch", "CVE-1.patch", pinned_tail=2)
    assert s.pre == ["01-build.patch", "02-feature.patch -p0", "90_gnutls.patch", "99_nss.patch"]
    assert s.post == [
        "01-build.patch",
        "02-feature.patch -p0",
        "CVE-1.patch",
        "90_gnutls.patch",
        "99_nss.patch",
    ]
    assert s.fix == ["CVE-1.patch"] and s.tail == ["90_gnutls.patch", "99_nss.patch"]
    # a fix inside the tail is not duplicated
    inside = split_series(series, "99_nss.patch", "99_nss.patch", pinned_tail=2)
    assert inside.tail == [] and inside.fix == ["99_nss.patch"]
    assert inside.post[-2:] == ["90_gnutls.patch", "99_nss.patch"]


def test_split_series_errors() -> None:
    with pytest.raises(UsageError, match="not in debian/patches/series"):
        split_series(SERIES, "CVE-9.patch", "CVE-9.patch")
    with pytest.raises(UsageError, match="comes before"):
        split_series(SERIES, "later.patch", "CVE-1.patch")


@pytest.mark.parametrize(
    ("outcome", "expected", "want"),
    [
        ("applied", "apply", "ok"),
        ("nothing", "nothing", "ok"),
        ("refused", "refuse", "ok"),
        ("applied", "refuse", "UNSAFE"),
        ("refused", "apply", "mismatch"),
        ("nothing", "refuse", "mismatch"),
        ("applied", "nothing", "mismatch"),
        ("failed", "apply", "failed"),
        ("failed", "refuse", "failed"),
    ],
)
def test_verdicts(outcome: str, expected: str, want: str) -> None:
    assert verdict(outcome, expected) == want


def test_parse_create_output(tmp_path: Path) -> None:
    upd = tmp_path / "u"
    kept = "livesplice: kept the build directory /tmp/livesplice-create-x\n"
    ok = parse_create_output(
        0, kept + '{\n "status": "created",\n "message": "wrote"\n}\n', "", 3.0, upd
    )
    assert (ok.status, ok.update, str(ok.workdir)) == ("created", upd, "/tmp/livesplice-create-x")
    none = parse_create_output(0, '{"status": "nothing_to_do", "message": "no code"}', "", 1.0, upd)
    assert none.status == "nothing" and none.update is None
    refused = parse_create_output(
        3,
        kept,
        "livesplice: REFUSED: 2 changes\n  a.c: struct s grew\n  b.c: x\n"
        "what to do: use a shadow variable\n",
        1.0,
        upd,
    )
    assert refused.status == "refused" and refused.reason == "REFUSED: 2 changes"
    assert refused.details[0] == "a.c: struct s grew"
    failed = parse_create_output(4, "", "livesplice: BUILD_FAILED: boom\n", 1.0, upd)
    assert failed.status == "failed" and "BUILD_FAILED" in failed.reason


def result(outcome: str, expected: str, **kw: object) -> RowResult:
    r = RowResult(
        row={
            "number": 1,
            "package": "p",
            "version": "1",
            "cves": "CVE-1",
            "target": "t",
            "expected": expected,
        },
        **kw,
    )  # type: ignore[arg-type]
    r.finish(outcome, "because | reasons")
    return r


def test_table_and_summary() -> None:
    rs = [
        result(
            "applied",
            "apply",
            create_seconds=12.3,
            pause_us=250.0,
            functions=["f"],
            requests_total=900,
            requests_during_apply=300,
            failed_requests=0,
            same_pids=True,
            repro_before="vulnerable",
            repro_after="fixed",
            repro_after_undo="vulnerable",
        ),
        result("refused", "refuse"),
        result("applied", "refuse"),
    ]
    table = markdown_table(rs)
    assert table.count("\n") == 5
    assert "vulnerable → fixed → vulnerable" in table and "300 / 0" in table
    assert "because \\| reasons" in table  # a pipe cannot break the table
    line = summary_line(rs)
    assert "2/3" in line and "1 unsafe" in line


def test_summary_counts_a_wrong_refusal_as_a_mismatch() -> None:
    rs = [
        result("refused", "refuse"),
        result("refused", "nothing"),
        result("nothing", "nothing"),
        result("failed", "apply"),
    ]
    line = summary_line(rs)
    assert "2/4" in line
    assert "1 correctly refused" in line and "1 correctly nothing to do" in line
    assert "1 refused where nothing was expected (mismatch)" in line
    assert "1 failed" in line and "0 unsafe" in line


def test_workload_lookup() -> None:
    assert workload_for("libcurl.so.4") is workload_for("libcurl.so")
    assert workload_for("libexpat.so.1") is ExpatWorkload
    assert workload_for("redis-server") is not None
    assert workload_for("unknownd") is None


def test_line_map_matches_a_compiled_copy_by_name() -> None:
    """Debian's expat compiles src/lib/xmlparse.c, a copy of the patched expat/lib/..."""
    patch = (
        "--- a/expat/lib/xmlparse.c\n+++ b/expat/lib/xmlparse.c\n@@ -10,2 +10,3 @@\n a\n+b\n c\n"
    )
    lm = LineMap.from_patch(patch)
    assert lm.files_matching("/build/tree/expat/lib/xmlparse.c") == ["expat/lib/xmlparse.c"]
    assert lm.files_matching("src/lib/xmlparse.c") == ["expat/lib/xmlparse.c"]
    assert lm.explains(20, 21, {"src/lib/xmlparse.c": (15, 30)})
    two = LineMap.from_patch(patch + patch.replace("expat/lib", "other/lib"))
    assert two.files_matching("src/lib/xmlparse.c") == []  # ambiguous: no match


def test_find_target_prefers_the_exact_name(tmp_path: Path) -> None:
    src = tmp_path / "x.c"
    src.write_text("int f(void) { return 1; }\n")
    lib = tmp_path / "pre" / "lib" / ".libs"
    lib.mkdir(parents=True)
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libx.so.1",
            "-o",
            str(lib / "libx.so.1.2.3"),
            str(src),
        ],
        check=True,
    )
    (lib / "libx.so.1.2.3.txt").write_text("not elf")
    assert find_target(tmp_path / "pre", "libx.so.1") == lib / "libx.so.1.2.3"
    assert find_target(tmp_path / "pre", "libx.so.2") is None


def system_libexpat() -> Path | None:
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"):
        p = Path(d) / "libexpat.so.1"
        if p.exists():
            return p.resolve()
    return None


def test_library_driver_counts_uses_of_a_real_library(tmp_path: Path) -> None:
    """The expat driver dlopen()s a real libexpat, parses in a loop and reports counts."""
    lib = system_libexpat()
    if lib is None or shutil.which("gcc") is None:
        pytest.skip("needs libexpat1 and gcc")
    (tmp_path / "lib").mkdir()
    shutil.copy2(lib, tmp_path / "lib" / "libexpat.so.1")
    wl = ExpatWorkload(tmp_path / "lib" / "libexpat.so.1", tmp_path)
    try:
        wl.start()
        first = wl.stats.requests
        pid = wl.pids()[0]
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert str(tmp_path / "lib" / "libexpat.so.1") in maps
        before = wl.identities()
        import time

        deadline = time.monotonic() + 10
        while wl.stats.requests == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wl.stats.requests > first and wl.stats.failures == 0
        assert wl.identities() == before and wl.reproduce() is None
    finally:
        wl.stop()
    assert wl.exited() is not None


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LIVESPLICE_EVAL_SLOW") != "1",
    reason="builds a real Debian package twice: set LIVESPLICE_EVAL_SLOW=1",
)
@pytest.mark.parametrize("row", ["expat", "libxml2"])
def test_real_row(row: str, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "livesplice.eval", str(CORPUS), "--rows", row, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| ok |" in out.read_text()


def test_run_pre_match_learns_mergeable_strings_per_entry() -> None:
    """Bug found on nginx: ld places the strings of one .rodata.<fn>.str1.1 apart, so two
    fields of one function give two "section bases"; that is not a mismatch."""
    from livesplice.process.match import _Matcher
    from livesplice.update.format import Reloc, Section

    m = object.__new__(_Matcher)
    m.learned = {}
    m.image = SimpleNamespace(in_plt=lambda addr: False)  # type: ignore[assignment]
    sec = Section(key="f", role="pre", name="f", unit="src/x.c", align=16, size=16, data="00" * 16)
    out: list[Any] = []
    key = "src/x.c:.rodata.f.str1.1"
    # lea .LC(%rip): value = S + A - P; two strings at section offsets 0 and 0x10 placed
    # 0x2c17 bytes apart by the linker's string merging
    for off, addend, s_plus_a in ((3, -4, 0x5000), (10, 0x10 - 4, 0x7C17)):
        assert (
            m.learn_field(
                Reloc(off, "R_X86_64_PC32", key, addend),
                s_plus_a - (0x1000 + off),
                0x1000 + off,
                sec,
                out,
            )
            is None
        )
    assert {it.kind for it in out} == {"merged"}
    assert m.conflicts(out) is None
    # the same string seen at two places is still checked
    clash = [*out, type(out[0])("merged", out[0].key, out[0].value + 1, "elsewhere")]
    assert m.conflicts(clash) is not None
    # an ordinary data section keeps one base
    plain: list[Any] = []
    for off, addend, s_plus_a in ((3, -4, 0x5000), (10, 0x10 - 4, 0x7C17)):
        m.learn_field(
            Reloc(off, "R_X86_64_PC32", "src/x.c:.data.t", addend),
            s_plus_a - (0x1000 + off),
            0x1000 + off,
            sec,
            plain,
        )
    assert m.conflicts(plain) is not None


def test_libxml2_driver_resolves_through_a_catalog(tmp_path: Path) -> None:
    """The libxml2 driver against the system libxml2: it counts successful resolutions."""
    from livesplice.eval.workloads import Libxml2Workload

    lib = Path("/usr/lib/x86_64-linux-gnu/libxml2.so.2")
    if not lib.exists():
        pytest.skip("needs libxml2")
    (tmp_path / "lib").mkdir()
    copy = Path(shutil.copy2(lib.resolve(), tmp_path / "lib" / "libxml2.so.2"))
    wl = Libxml2Workload(copy, tmp_path)
    try:
        wl.start()
        assert wl.stats.requests > 0 and wl.stats.failures == 0
    finally:
        wl.stop()


def test_rows_on_shipped_binaries() -> None:
    header = HEADER + ",shipped_version,binaries"
    rows = parse_corpus(
        [
            header,
            "redis,5:7.0.15-1~deb12u10,A.patch,B.patch,CVE-1,apply,redis-server,x,"
            "5:7.0.15-1~deb12u7,redis-server redis-tools",
            "curl,1,C.patch,C.patch,CVE-2,apply,libcurl.so.4,y,,",
        ]
    )
    assert rows[0].on_shipped_binaries and rows[0].binaries == "redis-server redis-tools"
    assert not rows[1].on_shipped_binaries
    with pytest.raises(UsageError, match="1 bad row"):
        parse_corpus([header, "curl,1,C.patch,C.patch,CVE-2,apply,libcurl.so.4,y,1,"])
    shipped = Path(__file__).resolve().parents[1] / "corpus" / "debian-shipped.csv"
    assert all(r.on_shipped_binaries for r in parse_corpus(shipped.read_text().splitlines()))
    r = RowResult(
        row={
            "number": 1,
            "package": "redis",
            "version": "2",
            "cves": "CVE-1",
            "target": "redis-server",
            "expected": "apply",
            "shipped_version": "1",
            "binaries": "redis-tools",
        },
        binary="Debian redis-tools 1 (amd64): usr/bin/redis-check-rdb",
    )
    table = markdown_table([r])
    assert "redis 1 → 2" in table and "| Debian redis-tools 1 (amd64): usr/bin/" in table


def test_dsc_checksums_are_read() -> None:
    from livesplice.build.debian import _dsc_files

    text = (
        "Format: 3.0 (quilt)\nSource: curl\nChecksums-Sha256:\n"
        " " + "a" * 64 + " 10 curl_1.orig.tar.gz\n " + "b" * 64 + " 20 curl_1-1.debian.tar.xz\n"
        "Files:\n " + "c" * 32 + " 10 curl_1.orig.tar.gz\n"
    )
    assert _dsc_files(text) == {"curl_1.orig.tar.gz": "a" * 64, "curl_1-1.debian.tar.xz": "b" * 64}


def test_a_pre_tree_that_does_not_build_is_the_harness_failure(tmp_path: Path) -> None:
    out = parse_create_output(
        4,
        "",
        "livesplice: BUILD_FAILED: the unpatched tree does not "
        "build ('make' exited with status 2)\n",
        1.0,
        tmp_path / "u",
    )
    assert out.status == "harness"
    assert verdict("harness", "apply") == "harness"
    post = parse_create_output(
        4, "", "livesplice: BUILD_FAILED: the patched tree does not build\n", 1.0, tmp_path / "u"
    )
    assert post.status == "failed"  # the patch broke the build: that is an answer
    r = RowResult(row={"expected": "apply"}, outcome="harness", verdict="harness")
    assert "did not build here" in summary_line([r])


def test_generic_library_workload_calls_the_changed_call_graph(tmp_path: Path) -> None:
    """A library no workload knows: the driver calls an exported caller of the changed
    (hidden) function with zero arguments; one that crashes on NULL is skipped."""
    from livesplice.eval.workloads import GenericLibraryWorkload, generic_candidates

    src = tmp_path / "lib.c"
    src.write_text(
        "#include <string.h>\n"
        '__attribute__((visibility("hidden"), noinline)) int helper(const char *s)\n'
        "{ return s ? (int)strlen(s) : -1; }\n"
        'int deref_first(int *p) { return *p + helper("x"); }\n'
        "int safe_entry(const char *s) { return helper(s) + 1; }\n"
    )
    obj, lib = tmp_path / "lib.o", tmp_path / "libgen.so.1"
    subprocess.run(
        ["gcc", "-O2", "-fPIC", "-ffunction-sections", "-c", str(src), "-o", str(obj)], check=True
    )
    subprocess.run(
        ["gcc", "-shared", "-Wl,-soname,libgen.so.1", "-o", str(lib), str(obj)], check=True
    )
    candidates = generic_candidates(lib, ["helper"], [obj])
    assert set(candidates) == {"deref_first", "safe_entry"}
    rundir = tmp_path / "run"
    rundir.mkdir()
    wl = GenericLibraryWorkload(lib, rundir, sorted(candidates))  # deref_first tried first
    try:
        wl.start()
        assert wl.function == "safe_entry"
        first = wl.stats.requests
        import time

        time.sleep(0.3)
        assert wl.stats.requests > first and wl.stats.failures == 0
    finally:
        wl.stop()


def test_progress_lines_are_not_part_of_a_refusal(tmp_path: Path) -> None:
    out = parse_create_output(
        3,
        "",
        "2026-12-05T18:12:01Z livesplice: pre build ...\n"
        "livesplice: REFUSED: the patch has 1 change(s)\n"
        "2026-12-05T18:18:45Z livesplice: diff failed after 6.6 s\n"
        "  struct x: memory layout changed\n",
        1.0,
        tmp_path / "u",
    )
    assert out.status == "refused" and out.reason.startswith("REFUSED")
    assert out.details == ["struct x: memory layout changed"]
