"""The kernel evaluation tool without a kernel: the CSV reader, the guest script and its
judgement, the verdicts, the table and the cache (python -m livesplice.eval.kernel).

The guest script runs for real under the host's ``sh``, with small stand-ins for the three
commands only a booted lab kernel has (``livesplice apply/undo`` on a kernel, ``dmesg``,
``modprobe``) and a directory for sysfs; the lab test (test_eval_kernel_lab.py) runs the
same script in QEMU. Cost: < 5 s.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from livesplice.errors import UsageError
from livesplice.eval import kernel as cli
from livesplice.eval.kernel_guest import guest_script, read_guest_output
from livesplice.eval.kernel_report import markdown_table, render, summary_line
from livesplice.eval.kernel_rows import (
    KernelRow,
    KernelRowResult,
    judge,
    read_kernel_csv,
    result_for,
)
from livesplice.eval.kernel_run import judge_guest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "corpus" / "kernel-public.csv"
HEADER = "cves,pre_version,post_version,files,functions,expected,change_class,clean"
SCTP = "CVE-2026-68320,6.1.176-1,6.1.187-1,net/sctp/auth.c,sctp_auth_ep_add_chunkid,apply,body,"


def _csv(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    p = tmp_path / "k.csv"
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


# ---------------------------------------------------------------------------------------
# the CSV
# ---------------------------------------------------------------------------------------


def test_reads_the_real_corpus() -> None:
    rows = read_kernel_csv(CORPUS)
    assert len(rows) >= 5
    sctp = next(r for r in rows if r.name == "CVE-2026-68320")
    assert (sctp.pre_version, sctp.post_version, sctp.files) == (
        "6.1.176-1",
        "6.1.187-1",
        ("net/sctp/auth.c",),
    )
    assert sctp.flavour == "cloud-amd64" and sctp.update_id == "cve202668320"
    assert sctp.line == 2


def test_optional_columns(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        SCTP + ",amd64,sctp-auth,sctp_diag libcrc32c",
        header=HEADER + ",flavour,check,modules",
    )
    (row,) = read_kernel_csv(p)
    assert (row.flavour, row.check, row.modules) == (
        "amd64",
        "sctp-auth",
        ("sctp_diag", "libcrc32c"),
    )


@pytest.mark.parametrize(
    ("lines", "header", "words"),
    [
        ([SCTP.replace(",apply,", ",maybe,")], HEADER, ["line 2", "expected 'maybe'"]),
        (
            [
                SCTP,
                SCTP.replace("68320", "1").replace(
                    ",apply,",
                    ",",
                ),
            ],
            HEADER,
            ["line 3"],
        ),
        ([SCTP, SCTP], HEADER, ["line 3", "already the row of line 2"]),
        ([SCTP.replace("6.1.176-1", "bookworm")], HEADER, ["line 2", "pre_version 'bookworm'"]),
        ([SCTP.replace("CVE-2026-68320", "CVE-26")], HEADER, ["line 2", "not a CVE id"]),
        ([SCTP.replace("net/sctp/auth.c", "../etc/passwd")], HEADER, ["line 2", "relative path"]),
        ([SCTP.replace("net/sctp/auth.c", "")], HEADER, ["line 2", "'files' is empty"]),
        ([SCTP + ",arm64,,"], HEADER + ",flavour,check,modules", ["line 2", "flavour 'arm64'"]),
        ([SCTP + ",,../x,"], HEADER + ",flavour,check,modules", ["line 2", "check '../x'"]),
        ([SCTP + ",extra"], HEADER, ["line 2", "9 fields, the header has 8"]),
        ([SCTP], HEADER.replace("expected", "expect"), ["line 1", "missing column 'expected'"]),
        ([SCTP + ","], HEADER + ",colour", ["line 1", "unknown column 'colour'"]),
    ],
)
def test_bad_rows_name_the_line(
    tmp_path: Path, lines: list[str], header: str, words: list[str]
) -> None:
    p = _csv(tmp_path, *lines, header=header)
    with pytest.raises(UsageError) as e:
        read_kernel_csv(p)
    text = e.value.render()
    for w in words:
        assert w in text, text


def test_cli_bad_csv_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _csv(tmp_path, SCTP, SCTP.replace("68320", "68321").replace(",apply,", ",sure,"))
    assert cli.main([str(p), "--table-only", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "line 3: bad kernel corpus row" in err and "expected 'sure'" in err, err
    assert cli.main([str(CORPUS), "--only", "CVE-1999-0001", "--table-only"]) == 2
    assert "no row has CVE-1999-0001" in capsys.readouterr().err


def test_missing_check_script_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _csv(tmp_path, SCTP + ",,nosuch,", header=HEADER + ",flavour,check,modules")
    assert cli.main([str(p), "--cache", str(tmp_path / "c")]) == 2
    assert "kernel-checks/nosuch.sh does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "expected", "verdict"),
    [
        ("applied", "apply", "ok"),
        ("refused", "refuse", "ok"),
        ("nothing", "nothing", "ok"),
        ("not_built", "not_built", "ok"),
        ("not_built", "apply", "not built"),
        ("refused", "apply", "surprise"),
        ("applied", "refuse", "surprise"),
        ("failed", "apply", "surprise"),
        ("unsafe", "apply", "surprise"),
        ("harness", "apply", "harness"),
    ],
)
def test_judge(outcome: str, expected: str, verdict: str) -> None:
    assert judge(outcome, expected) == verdict


# ---------------------------------------------------------------------------------------
# the guest script, run by the host's sh with stand-ins for the lab kernel's commands
# ---------------------------------------------------------------------------------------

STUB_LIVESPLICE = r"""#!/bin/sh
# apply: exit $APPLY_RC (a NO_MATCH paragraph) or print apply's JSON; append $APPLY_DMESG
case "$1" in
apply)
  if [ "${APPLY_RC:-0}" != 0 ]; then
    echo "livesplice: NO_MATCH: sctp_auth_ep_add_chunkid+0x12: the running code differs"
    exit $APPLY_RC
  fi
  touch "$STATE/applied"; echo "${APPLY_DMESG:-livepatch: patching complete}" >> "$STATE/dmesg"
  mkdir -p "$SYSFS/kernel/livepatch/livesplice_cve202668320/sctp"
  echo '{"id": "cve202668320", "match_seconds": 1.25, "transition_seconds": 0.004}';;
undo)
  rm -f "$STATE/applied"; echo "livesplice: undid kernel update $2"; exit ${UNDO_RC:-0};;
esac
"""
STUB_DMESG = '#!/bin/sh\ncat "$STATE/dmesg" 2>/dev/null; : > "$STATE/dmesg"\n'
# modprobe sctp under an applied update: livepatch patches it (patched=1) unless told not to
STUB_MODPROBE = r"""#!/bin/sh
d="$SYSFS/kernel/livepatch/livesplice_cve202668320/sctp"
[ -d "$d" ] && [ -e "$STATE/applied" ] && echo "${PATCHED:-1}" > "$d/patched"
echo "$1" >> "$STATE/loaded"
"""
# the check: fixed while the update is applied, vulnerable otherwise; $CHECK_RC before
CHECK = r"""#!/bin/sh
if [ -e "$STATE/applied" ]; then echo "STATE: ${FIXED_STATE:-fixed}"
else echo "accepted 20"; echo "STATE: vulnerable"; exit ${CHECK_RC:-0}; fi
"""


def _guest_run(tmp_path: Path, *, module: bool = True, **env: str) -> KernelRowResult:
    bindir, state, sysfs, checks = (tmp_path / d for d in ("bin", "state", "sys", "checks"))
    for d in (bindir, state, sysfs, checks):
        d.mkdir()
    for name, text in (
        ("livesplice", STUB_LIVESPLICE),
        ("dmesg", STUB_DMESG),
        ("modprobe", STUB_MODPROBE),
    ):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (checks / "sctp.sh").write_text(CHECK)
    (state / "dmesg").write_text("[ 1.0] boot noise: WARNING: not ours\n")
    script = guest_script(
        update="/payload/u/fix.update",
        update_id="cve202668320",
        patch_module="livesplice_cve202668320",
        patched_modules=["sctp"] if module else [],
        extra_modules=[],
        check=str(checks / "sctp.sh"),
        sysfs=str(sysfs),
    )
    done = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "STATE": str(state),
            "SYSFS": str(sysfs),
            **env,
        },
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    row = read_kernel_csv(_csv(tmp_path, SCTP))[0]
    (tmp_path / "out.txt").write_text(done.stdout)  # for tests that judge it again
    result = result_for(row)
    result.functions, result.objects = ["sctp_auth_ep_add_chunkid"], ["sctp"]
    judge_guest(read_guest_output(done.stdout), ["sctp"] if module else [], result)
    return result


def test_guest_applied_with_checks(tmp_path: Path) -> None:
    r = _guest_run(tmp_path)
    assert (r.outcome, r.verdict) == ("applied", "ok"), r
    assert {p: (c.status, c.state) for p, c in r.checks.items()} == {
        "b-loaded": (0, "fixed"),
        "before": (0, "vulnerable"),
        "after": (0, "fixed"),
        "after-undo": (0, "vulnerable"),
    }
    assert r.patched_on_load == {"sctp": True}
    assert (r.match_seconds, r.transition_seconds, r.undo_ok) == (1.25, 0.004, True)
    assert r.unsafe_lines == []  # the boot's WARNING was before livesplice acted
    table = markdown_table([r])
    assert "vulnerable → fixed → vulnerable; loaded under the update: sctp patched: fixed" in table
    assert "4 ms (match 1.2 s)" in table


def test_guest_warning_after_apply_is_unsafe(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, APPLY_DMESG="[ 9.1] WARNING: CPU: 0 PID: 7 at kernel/foo.c:12")
    assert (r.outcome, r.verdict) == ("unsafe", "surprise"), r
    assert r.unsafe_lines[0] == "b-apply: [ 9.1] WARNING: CPU: 0 PID: 7 at kernel/foo.c:12"
    assert "0 unsafe" not in summary_line([r]) and "1 unsafe" in summary_line([r])


def test_guest_no_match_is_failed_with_the_reason(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, APPLY_RC="5", module=False)
    assert (r.outcome, r.verdict) == ("failed", "surprise"), r
    assert r.reason == (
        "apply (apply): exit 5: NO_MATCH: sctp_auth_ep_add_chunkid+0x12: the running code differs"
    )


def test_guest_fix_did_not_take(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, FIXED_STATE="vulnerable")
    assert r.outcome == "failed" and "still shows the bug" in r.reason, r


def test_guest_module_not_patched_on_load(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, PATCHED="0")
    assert r.outcome == "failed" and "sctp loaded under the update but not patched" in r.reason


def test_guest_undo_failure(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, UNDO_RC="6")
    assert r.outcome == "failed" and "undo (b-undo): exit 6" in r.reason, r


def test_guest_check_broken_before_apply_is_harness(tmp_path: Path) -> None:
    r = _guest_run(tmp_path, CHECK_RC="3", module=False)
    assert (r.outcome, r.verdict) == ("harness", "harness"), r
    assert "the check fails (exit 3) on the unpatched kernel" in r.reason


def test_real_lab_output_sctp() -> None:
    """The guest output of a real run of the sctp row (tests/kernel/: QEMU, 6.1.176-1)."""
    out = (ROOT / "tests" / "kernel" / "keval-sctp-guest-output.txt").read_text()
    run = read_guest_output(out)
    phases = ["b-apply", "b-loaded", "b-undo", "before", "apply", "after", "undo", "after-undo"]
    assert run.phases == phases
    row = next(r for r in read_kernel_csv(CORPUS) if r.name == "CVE-2026-68320")
    r = result_for(row)
    judge_guest(run, ["sctp"], r)
    assert (r.outcome, r.patched_on_load, r.undo_ok) == ("applied", {"sctp": True}, True)
    assert r.match_seconds == 9.503 and r.transition_seconds == 0.002


def test_crash_after_apply_is_unsafe_before_is_harness() -> None:
    from livesplice.kernel.guest import GuestCrashed

    crash = GuestCrashed("guest crashed or hung", ["Oops: 0000 [#1] SMP"])
    started = "@@KEVAL phase before@@\n@@KEVAL phase apply@@\n@@KEVAL begin apply.apply@@\n"
    r = result_for(read_kernel_csv(CORPUS)[0])
    judge_guest(read_guest_output(started), [], r, crash)
    assert (r.outcome, r.reason) == ("unsafe", "the guest crashed or hung in phase apply")
    r = result_for(read_kernel_csv(CORPUS)[0])
    judge_guest(read_guest_output("@@KEVAL phase before@@\n"), [], r, crash)
    assert r.outcome == "harness", r


# ---------------------------------------------------------------------------------------
# the table, the summary and the cache
# ---------------------------------------------------------------------------------------


def _results() -> list[KernelRowResult]:
    rows = {r.name: r for r in read_kernel_csv(CORPUS)}
    applied = result_for(rows["CVE-2026-68320"])
    applied.create_seconds, applied.transition_seconds = 31.0, 0.002
    applied.finish("applied", "sctp_auth_ep_add_chunkid in sctp (livepatch); undone")
    refused = result_for(rows["CVE-2026-64553"])
    refused.rules = ["changed data"]
    refused.finish(
        "refused",
        "the patch has 1 change(s) that cannot be applied live",
        ["psample.c: psample_seq: size changed [rule: changed data]"],
    )
    not_built = result_for(rows["CVE-2026-64458"])
    not_built.finish("not_built", "not built in this flavour: mm/damon/ops-common.c: ...")
    harness = result_for(rows["CVE-2026-64544"])
    harness.finish("harness", "fetch: BAD_INPUT: linux-source-6.1 6.1.187-1 is gone")
    return [applied, refused, not_built, harness]


def test_summary_and_table() -> None:
    results = _results()
    assert summary_line(results) == (
        "4 fixes: 1 applied (50% of the 2 in code the kernel builds), 1 refused with reasons, "
        "1 not built, 1 not run (harness), 0 unsafe; 1 surprise(s) against `expected`"
    )
    doc = render(results, "python -m livesplice.eval.kernel corpus/kernel-public.csv")
    assert (
        "| CVE-2026-68320 | 6.1.176-1 → 6.1.187-1 | cloud-amd64 | net/sctp/auth.c | apply | "
        "applied | ok | sctp_auth_ep_add_chunkid in sctp (livepatch); undone | 31 | – | 2 ms | – |"
    ) in doc
    surprises = doc.split("## Surprises", 1)[1]
    assert "CVE-2026-64553" in surprises and "[rule: changed data]" in surprises
    assert "CVE-2026-68320" not in surprises
    assert "| not_built | not built |" in doc


def test_table_only_reads_the_cache_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_kernel_csv(CORPUS)
    checks = ROOT / "corpus" / "kernel-checks"
    sctp = next(r for r in rows if r.name == "CVE-2026-68320")
    applied = _results()[0]
    d = cli.row_cache(tmp_path, sctp, checks)
    d.mkdir(parents=True)
    (d / "0123456789abcdef.json").write_text(json.dumps(applied.to_json()))
    args = [str(CORPUS), "--table-only", "--cache", str(tmp_path), "--only", "CVE-2026-68320"]
    out = tmp_path / "t.md"
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "1 fixes: 1 applied (100% of the 1 in code the kernel builds)" in out.read_text()
    assert "--table-only" in out.read_text()  # the command that made it
    # the same outcome judged by a corpus that now expects a refusal: a surprise, exit 1
    csv = tmp_path / "k.csv"
    csv.write_text(CORPUS.read_text().replace(",sctp_auth_ep_add_chunkid,apply,", ",x,refuse,"))
    changed = read_kernel_csv(csv)[0]
    assert changed.key() != sctp.key()  # another row: its own cache entry
    d2 = cli.row_cache(tmp_path, changed, tmp_path / "kernel-checks")
    d2.mkdir(parents=True)
    (d2 / "0123456789abcdef.json").write_text(json.dumps(applied.to_json()))
    capsys.readouterr()
    args = [str(csv), "--table-only", "--cache", str(tmp_path), "--only", "CVE-2026-68320"]
    assert cli.main([*args, "--json"]) == 1
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["outcome"], doc["verdict"]) == ("applied", "surprise")


def test_row_key_ignores_the_line_number() -> None:
    row = read_kernel_csv(CORPUS)[0]
    moved = KernelRow(**{**row.__dict__, "line": 40})
    assert moved.key() == row.key() and moved.key(b"echo") != row.key()


def test_failure_evidence_in_the_table() -> None:
    """A refused insmod: the table keeps insmod's line and the kernel's reason, not the boot's
    messages nor the taint notices, and each kernel line once."""
    r = _results()[0]
    details = [
        "livesplice: BAD_INPUT: the kernel refused the livepatch module",
        "  insmod: can't insert 'x.ko': unknown symbol in module, or unknown parameter",
        "  [    6.03] random: crng init done",
        "  [   11.27] livesplice_cve202664567: tainting kernel with TAINT_LIVEPATCH",
        "  [   11.27] livesplice_cve202664567: Unknown symbol crc32c (err -2)",
        "  [   11.29] livesplice_cve202664567: Unknown symbol crc32c (err -2)",
        "what to do: check the kernel log",
    ]
    r.finish("failed", "apply (b-apply): exit 2: BAD_INPUT: the kernel refused the module", details)
    (line,) = [x for x in markdown_table([r]).splitlines() if x.startswith("| CVE-")]
    assert (
        "the kernel refused the module: insmod: can't insert 'x.ko': unknown symbol in module, "
        "or unknown parameter; livesplice_cve202664567: Unknown symbol crc32c (err -2) |"
    ) in line, line


def test_table_only_lists_rows_not_run_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row without a cached result is in the table as "not run", never left out."""
    out = tmp_path / "t.md"
    args = [str(CORPUS), "--table-only", "--cache", str(tmp_path), "--only", "CVE-2026-68320"]
    assert cli.main([*args, "--out", str(out)]) == 1
    text = out.read_text()
    assert "1 fixes: 0 applied (none runnable), 0 refused with reasons, 0 not built" in text
    assert "1 not run yet" in text
    assert "| apply | not_run | not run | not run yet (no cached result) |" in text


def test_a_warning_the_kernel_prints_without_any_update_is_not_counted(tmp_path: Path) -> None:
    """The bluetooth row: loading the module makes Debian's kernel print its own WARNING (a
    crypto self-test failing under QEMU's CPU), with or without an update. A baseline boot
    with the same modules and no update shows the same site: not counted. A different
    WARNING in the same phase still is."""
    from livesplice.eval.kernel_guest import baseline_script, baseline_sites, trouble_site

    own = "[ 1.99] WARNING: CPU: 0 PID: 90 at crypto/testmgr.c:5907 alg_test.cold+0x7c/0xf5"
    baseline_output = (
        "@@KEVAL begin dmesg.baseline@@\n"
        "[ 2.01] alg: self-tests for ecdh-nist-p256 failed (rc=-14)\n"
        "[ 2.02] WARNING: CPU: 1 PID: 101 at crypto/testmgr.c:5907 alg_test.cold+0x7c/0xf5\n"
        "@@KEVAL end dmesg.baseline 0@@\n"
    )
    sites = baseline_sites(baseline_output)
    assert sites == {trouble_site(own)}
    assert "for m in bluetooth; do modprobe $m; done" in baseline_script(["bluetooth"])
    for name, line, outcome in (
        ("own", own, "applied"),
        ("other", "[ 9.1] WARNING: CPU: 0 PID: 7 at kernel/foo.c:12", "unsafe"),
    ):
        d = tmp_path / name
        d.mkdir()
        assert _guest_run(d, APPLY_DMESG=line).outcome == "unsafe"  # no baseline: it counts
        result = result_for(read_kernel_csv(_csv(d, SCTP))[0])
        judge_guest(read_guest_output((d / "out.txt").read_text()), ["sctp"], result, None, sites)
        assert result.outcome == outcome, (name, result)
