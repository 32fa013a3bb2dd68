"""``python -m livesplice.eval.kernel`` end to end in the lab, on two rows of the real corpus.

The sctp fix (a module: applied with sctp not loaded, patched as it loads, undone; then
loaded, applied, undone) and the DAMON fix (not built in cloud-amd64: create says so in ~3 s).
A fresh cache, so create and the boot really run; then ``--table-only`` tabulates the same
results from the cache without running anything.

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost (cache of the lab ready): one create ~30 s + one boot ~40 s (TCG; apply matches twice).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.eval import kernel as cli

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "kernel-public.csv"
ROWS = ["CVE-2026-68320", "CVE-2026-64458"]


def test_eval_kernel_two_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepared_lab()  # skips with the reason when the lab cannot run
    out = tmp_path / "results.md"
    args = [str(CORPUS), "--only", *ROWS, "--cache", str(tmp_path / "cache")]
    status = cli.main([*args, "--out", str(out)])
    text = out.read_text()
    assert status == 0, text
    summary = (
        "2 fixes: 1 applied (100% of the 1 in code the kernel builds), 0 refused with reasons, "
        "1 not built, 0 unsafe"
    )
    assert summary in capsys.readouterr().out
    assert summary + "." in text
    sctp = next(line for line in text.splitlines() if line.startswith("| CVE-2026-68320 "))
    assert sctp.startswith(
        "| CVE-2026-68320 | 6.1.176-1 → 6.1.187-1 | cloud-amd64 | net/sctp/auth.c | apply | "
        "applied | ok | sctp_auth_ep_add_chunkid in sctp (livepatch); undone |"
    ), sctp
    assert "loaded under the update: sctp patched" in sctp, sctp
    damon = next(line for line in text.splitlines() if line.startswith("| CVE-2026-64458 "))
    assert "| not_built | not built | not built in this flavour: " in damon, damon
    assert "is not set" in damon, damon

    # the cache: tabulated again without running anything, the same results
    assert cli.main([*args, "--table-only", "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["outcome"] for d in docs] == ["applied", "not_built"]
    applied = docs[0]
    assert applied["undo_ok"] is True and applied["patched_on_load"] == {"sctp": True}
    assert applied["transition_seconds"] is not None and applied["unsafe_lines"] == []
