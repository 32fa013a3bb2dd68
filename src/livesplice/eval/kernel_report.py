"""The kernel evaluation's Markdown table, its surprises and the one-line summary.

The summary's percentage is of the fixes in code the row's kernel builds and the harness
could run (rows ``not_built`` and ``harness`` are left out of the denominator: there is
nothing to patch, or no answer from livesplice), like Ksplice's "88% of the fixes".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from livesplice.eval.kernel_rows import KernelRowResult


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _checks(r: KernelRowResult) -> str:
    """before → after apply → after undo, plus the module loaded under the update."""
    if not r.checks and not r.patched_on_load:
        return "–"

    def one(phase: str) -> str:
        c = r.checks.get(phase)
        if c is None:
            return "?"
        word = c.state or ("ok" if c.status == 0 else "")
        return word if c.status == 0 else f"{word} exit {c.status}".strip()

    parts = []
    if any(p in r.checks for p in ("before", "after", "after-undo")):
        parts.append(" → ".join(one(p) for p in ("before", "after", "after-undo")))
    if r.patched_on_load:
        loaded = ", ".join(
            f"{m} {'patched' if ok else 'NOT patched'}" for m, ok in r.patched_on_load.items()
        )
        after = f": {one('b-loaded')}" if "b-loaded" in r.checks else ""
        parts.append(f"loaded under the update: {loaded}{after}")
    return "; ".join(parts)


def _transition(r: KernelRowResult) -> str:
    """The livepatch transition (or the Ksplice path's stop), then run-pre matching's time
    in the guest (TCG, so slow; it happens before anything is changed)."""
    if r.stop_us is not None:
        text = f"stop {r.stop_us:.0f} µs"
    elif r.transition_seconds is not None:
        text = f"{r.transition_seconds * 1000:.0f} ms"
    else:
        return "–"
    if r.match_seconds is not None:
        text += f" (match {r.match_seconds:.1f} s)"
    return text


# a kernel log line, maybe tagged with the phase it was printed in ("after: [ 25.1] ...")
_DMESG_TIME = re.compile(r"^([a-z-]+: )?\[\s*\d+\.\d+\]\s*")


def _evidence(r: KernelRowResult) -> list[str]:
    """The lines of a failure's details worth a table cell: the error paragraph's lines
    other than the reason itself, kernel log lines about livepatch or the update's module
    (not the boot's, nor the taint notices every out-of-tree module prints), each once."""
    out: list[str] = []
    for raw in r.details:
        line = raw.strip()
        if line.startswith("livesplice: ") or line.startswith("what to do:"):
            continue
        m = _DMESG_TIME.match(line)
        if m:
            phase, line = m.group(1) or "", line[m.end() :]
            wanted = "livesplice_" in line or "livepatch" in line
            if not phase and ("taint" in line or not wanted):  # phase: an unsafe line
                continue
            line = phase + line
        if line and line not in out:
            out.append(line)
    return out


def _why(r: KernelRowResult) -> str:
    why = r.reason
    if r.outcome == "refused" and r.details:
        why += ": " + "; ".join(r.details[:2])
    evidence = _evidence(r) if r.outcome in ("failed", "unsafe", "harness") else []
    if evidence:
        why += ": " + "; ".join(evidence[:3])
    if r.notes and r.outcome not in ("not_built",):
        why += " (" + "; ".join(r.notes[:2]) + ")"
    return why


def summary_line(results: Sequence[KernelRowResult]) -> str:
    """``N fixes: A applied (P%), R refused with reasons, B not built, 0 unsafe`` and the rest."""
    n = len(results)
    by = Counter(r.outcome for r in results)
    surprises = sum(r.verdict == "surprise" for r in results)
    runnable = n - by["not_built"] - by["harness"] - by["not_run"]
    pct = (
        f"{100 * by['applied'] / runnable:.0f}% of the {runnable} in code the kernel builds"
        if runnable
        else "none runnable"
    )
    text = (
        f"{n} fixes: {by['applied']} applied ({pct}), "
        f"{by['refused']} refused with reasons, {by['not_built']} not built"
    )
    for outcome, words in (("nothing", "nothing to do"), ("failed", "failed")):
        if by[outcome]:
            text += f", {by[outcome]} {words}"
    if by["harness"]:
        text += f", {by['harness']} not run (harness)"
    if by["not_run"]:
        text += f", {by['not_run']} not run yet"
    text += f", {by['unsafe']} unsafe"
    return text + (f"; {surprises} surprise(s) against `expected`" if surprises else "")


def markdown_table(results: Sequence[KernelRowResult]) -> str:
    """The results as a Markdown table, one row per corpus row."""
    lines = [
        "| CVE | pre → post | flavour | files | expected | outcome | verdict | why | "
        "create (s) | guest (s) | transition | checks: before → after apply → after undo |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = r.row
        cells = (
            " ".join(row["cves"]),
            f"{row['pre_version']} → {row['post_version']}",
            row["flavour"],
            " ".join(row["files"]),
            row["expected"],
            r.outcome,
            r.verdict,
            _why(r),
            _num(r.create_seconds),
            _num(r.guest_seconds),
            _transition(r),
            _checks(r),
        )
        lines.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render(results: Sequence[KernelRowResult], command: str) -> str:
    """The whole results document (docs/kernel-eval-results.md)."""
    surprises = [r for r in results if r.verdict == "surprise"]
    commits = Counter(r.livesplice_commit or "unknown" for r in results)
    ran_with = ", ".join(f"{c} ({n} row{'s' if n > 1 else ''})" for c, n in sorted(commits.items()))
    text = (
        "# livesplice on real Debian kernel fixes\n\n"
        f"{summary_line(results)}.\n\n"
        f"Generated by `{command}`; livesplice commit {ran_with}.\n\n"
        "Per row, as a user would: `lab prepare` the pre kernel, the fix = `diff -u` of the "
        "row's files between the two `linux-source` versions, `create --kernel` (its wall "
        "time: *create*), then one QEMU boot of the pre kernel (its wall time: *guest*): "
        "when the update patches a module, apply with the module not loaded, load it "
        "(livepatch patches it on load), check, undo; then load the modules, check, apply, "
        "check, undo, check. "
        "*transition* is apply's livepatch transition (or the Ksplice path's stop_machine). "
        "*unsafe* = an oops, BUG, WARNING or livepatch failure in dmesg after apply/undo, or "
        "a guest that stopped answering. *verdict* compares the outcome with the row's "
        "`expected`; *harness* rows (the lab or a download failed) are no answer from "
        "livesplice. Per-row logs: `$LIVESPLICE_CACHE/eval-kernel/work/CVE-…/`.\n\n"
        + markdown_table(results)
    )
    if surprises:
        text += "\n## Surprises (outcome differs from `expected`)\n\n" + markdown_table(surprises)
    return text
