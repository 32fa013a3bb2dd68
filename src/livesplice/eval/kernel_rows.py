"""The kernel corpus CSV, one row's result, and how a result is judged against ``expected``.

The CSV schema lives here and nowhere else (``python -m livesplice.eval.kernel`` reads any
CSV of this shape; docs/KERNEL.md describes it for corpus authors). Columns:

=============== ========================================================================
``cves``         the CVE(s) the fix closes, space-separated (the first names the row)
``pre_version``  the Debian kernel the machine runs (``6.1.176-1``): prepared in the lab
``post_version`` the Debian version carrying the fix: its ``linux-source`` gives the files
``files``        space-separated source paths: the fix = ``diff -u`` of these between the two
``functions``    the functions the fix changes (documentation; livesplice finds its own)
``expected``     what a careful tool does: ``apply``, ``refuse``, ``nothing`` (no code change
                 for this kernel) or ``not_built`` (the flavour does not compile the code)
``change_class`` free text: what kind of change it is
``clean``        free text: how the window diff was checked to hold only this fix
``flavour``      optional: ``cloud-amd64`` (empty = this) or ``amd64``
``check``        optional: NAME of ``kernel-checks/NAME.sh`` beside the CSV, run in the guest
                 before apply, after apply, after undo (and after a module loads under an
                 applied update); exit 0 = the code works; a line ``STATE: fixed`` or
                 ``STATE: vulnerable`` says what the fix's effect looks like
``modules``      optional: modules to load besides those the update patches (space-separated)
=============== ========================================================================

A bad row is refused with the line number and what is wrong (exit 2), before anything runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livesplice.errors import UsageError

REQUIRED = ("cves", "pre_version", "post_version", "files", "functions", "expected")
OPTIONAL = ("change_class", "clean", "flavour", "check", "modules")
EXPECTED = ("apply", "refuse", "nothing", "not_built")
FLAVOURS = ("cloud-amd64", "amd64")
DEFAULT_FLAVOUR = "cloud-amd64"

# Debian kernel versions (6.1.176-1, 6.1.158-1~deb11u1 for backports) and CVE ids
_VERSION = re.compile(r"^\d+\.\d+\.\d+-\d+[A-Za-z0-9.+~]*$")
_CVE = re.compile(r"^CVE-\d{4}-\d{4,}$")
_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")
_CHECK = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class KernelRow:
    """One fix of the kernel corpus (see the module docstring for the columns)."""

    line: int  # the CSV line it came from (1 = the header), for messages
    cves: tuple[str, ...]
    pre_version: str
    post_version: str
    files: tuple[str, ...]
    functions: tuple[str, ...]
    expected: str
    change_class: str = ""
    clean: str = ""
    flavour: str = DEFAULT_FLAVOUR
    check: str = ""
    modules: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The row's name in reports and cache paths: its first CVE."""
        return self.cves[0]

    @property
    def update_id(self) -> str:
        """A kernel module name can hold letters, digits and ``_`` only: cve202668320."""
        return self.name.lower().replace("-", "")

    def key(self, check_script: bytes = b"") -> str:
        """What the row's result depends on besides livesplice itself: every column and the
        check script's text (``line`` is not part: moving a row keeps its cached result)."""
        data = {k: v for k, v in asdict(self).items() if k != "line"}
        text = json.dumps(data, sort_keys=True).encode() + b"\0" + check_script
        return hashlib.sha256(text).hexdigest()[:16]


def _split(value: str | None) -> tuple[str, ...]:
    return tuple((value or "").split())


def parse_row(line: int, raw: dict[str, str | None]) -> KernelRow:
    """One CSV record -> a row, or UsageError naming the line and every problem in it."""
    problems = []
    for col in REQUIRED:
        if not (raw.get(col) or "").strip():
            problems.append(f"column {col!r} is empty")
    cves = _split(raw.get("cves"))
    problems += [f"{c!r} is not a CVE id (CVE-YYYY-NNNN)" for c in cves if not _CVE.match(c)]
    for col in ("pre_version", "post_version"):
        v = (raw.get(col) or "").strip()
        if v and not _VERSION.match(v):
            problems.append(f"{col} {v!r} is not a Debian kernel version such as 6.1.176-1")
    files = _split(raw.get("files"))
    problems += [
        f"file {f!r} is not a relative path inside the source tree"
        for f in files
        if f.startswith("/") or ".." in Path(f).parts
    ]
    expected = (raw.get("expected") or "").strip()
    if expected and expected not in EXPECTED:
        problems.append(f"expected {expected!r} is not one of {', '.join(EXPECTED)}")
    flavour = (raw.get("flavour") or "").strip() or DEFAULT_FLAVOUR
    if flavour not in FLAVOURS:
        problems.append(f"flavour {flavour!r} is not one of {', '.join(FLAVOURS)}")
    check = (raw.get("check") or "").strip()
    if check and not _CHECK.match(check):
        problems.append(f"check {check!r} is not a script name (kernel-checks/NAME.sh)")
    modules = _split(raw.get("modules"))
    problems += [f"module {m!r} is not a module name" for m in modules if not _MODULE.match(m)]
    if problems:
        raise UsageError(f"line {line}: bad kernel corpus row", problems)
    return KernelRow(
        line=line,
        cves=cves,
        pre_version=(raw["pre_version"] or "").strip(),
        post_version=(raw["post_version"] or "").strip(),
        files=files,
        functions=_split(raw.get("functions")),
        expected=expected,
        change_class=(raw.get("change_class") or "").strip(),
        clean=(raw.get("clean") or "").strip(),
        flavour=flavour,
        check=check,
        modules=modules,
    )


def read_kernel_csv(path: Path) -> list[KernelRow]:
    """Every row of a kernel corpus CSV; UsageError (exit 2) for a missing file, an unknown
    or missing column, a row with too many fields, a bad value or a CVE listed twice."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read the kernel corpus {path}: {e.strerror}") from e
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise UsageError(
            f"{path}: line 1: not a kernel corpus header",
            [f"missing column {c!r}" for c in missing] + [f"unknown column {c!r}" for c in unknown],
            f"columns: {', '.join(REQUIRED + OPTIONAL)} (the last {len(OPTIONAL)} optional)",
        )
    rows: list[KernelRow] = []
    seen: dict[str, int] = {}
    for raw in reader:
        line = reader.line_num
        if None in raw:  # DictReader puts surplus fields under the key None
            raise UsageError(
                f"{path}: line {line}: {len(header) + len(raw[None])} fields, the header has "
                f"{len(header)}",
                advice="quote a field that contains a comma",
            )
        try:
            row = parse_row(line, raw)
        except UsageError as e:
            raise UsageError(f"{path}: {e.reason}", e.details, e.advice) from e
        if row.name in seen:
            raise UsageError(
                f"{path}: line {line}: {row.name} is already the row of line {seen[row.name]}",
                advice="one row per fix: list every CVE it closes in the cves column",
            )
        seen[row.name] = line
        rows.append(row)
    return rows


def select(rows: Sequence[KernelRow], only: Sequence[str] | None) -> list[KernelRow]:
    """The rows naming any CVE of ``only`` (all rows without it); an unknown CVE is an error."""
    if not only:
        return list(rows)
    wanted = {c.upper() for c in only}
    known = {c for r in rows for c in r.cves}
    unknown = sorted(wanted - known)
    if unknown:
        raise UsageError(f"--only: no row has {', '.join(unknown)}")
    return [r for r in rows if wanted & set(r.cves)]


# ---------------------------------------------------------------------------------------
# one row's result, and its verdict
# ---------------------------------------------------------------------------------------

OUTCOMES = ("applied", "refused", "not_built", "nothing", "failed", "unsafe", "harness", "not_run")
# outcome -> the `expected` value that makes it the right answer
RIGHT_ANSWER = {
    "applied": "apply",
    "refused": "refuse",
    "nothing": "nothing",
    "not_built": "not_built",
}


def judge(outcome: str, expected: str) -> str:
    """``ok``, ``surprise`` (livesplice did something else than ``expected``), ``harness``
    (the lab or a download failed: no answer from livesplice), ``not built``, or ``not run``
    (``--table-only`` and the row has no cached result yet).

    A fix in code the row's flavour does not compile is "not built" whatever was expected:
    livesplice rightly has nothing to patch, and a corpus row usually records what the fix
    needs where the code is built. ``unsafe`` and ``failed`` are always surprises.
    """
    if outcome in ("harness", "not_run"):
        return outcome.replace("_", " ")
    if outcome == "not_built":
        return "ok" if expected in ("not_built", "nothing") else "not built"
    return "ok" if RIGHT_ANSWER.get(outcome) == expected else "surprise"


@dataclass
class CheckRun:
    """One run of the row's check script in the guest."""

    status: int
    state: str | None  # "fixed" / "vulnerable" from its STATE: line, None without one


@dataclass
class KernelRowResult:
    """What happened to one row; JSON-serialisable (the cache and ``--json``)."""

    row: dict[str, Any]
    outcome: str = "harness"
    verdict: str = "harness"
    reason: str = ""
    details: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # [rule: ...] of a refusal
    stage: str = ""  # where it ended: prepare, fetch, create, guest, done
    create_seconds: float | None = None
    functions: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)  # vmlinux and/or module names
    match_seconds: float | None = None  # apply's run-pre matching in the guest
    transition_seconds: float | None = None  # apply's transition (livepatch)
    stop_us: float | None = None  # the Ksplice path's stop_machine
    undo_ok: bool | None = None
    # phase -> check run: before, after, after-undo, loaded (module loaded under the update)
    checks: dict[str, CheckRun] = field(default_factory=dict)
    patched_on_load: dict[str, bool] = field(default_factory=dict)  # module -> patched=1
    unsafe_lines: list[str] = field(default_factory=list)  # dmesg lines that made it unsafe
    notes: list[str] = field(default_factory=list)
    guest_seconds: float | None = None
    livesplice_source: str = ""  # digest of the sources that decide outcomes (the cache key)
    livesplice_commit: str = ""  # git describe of the checkout it ran from
    finished_at: str = ""

    def finish(self, outcome: str, reason: str, details: Sequence[str] = ()) -> None:
        """Record how the row ended and judge it against the row's ``expected`` (the verdict is
        set only here)."""
        self.outcome = outcome
        self.reason = reason
        self.details = list(details)
        self.verdict = judge(outcome, str(self.row["expected"]))
        self.finished_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def to_json(self) -> dict[str, Any]:
        """The result as JSON, for the cache and ``--json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelRowResult:
        """A cached result read back (its check runs as CheckRun again)."""
        checks = {k: CheckRun(**v) for k, v in data.pop("checks", {}).items()}
        return cls(**data, checks=checks)


def result_for(row: KernelRow) -> KernelRowResult:
    """An empty result of ``row`` (its columns as plain data)."""
    return KernelRowResult(row={k: v for k, v in asdict(row).items()})


def rejudge(result: KernelRowResult, row: KernelRow) -> KernelRowResult:
    """A cached result judged by the row as it is now (``expected`` may have been corrected
    since the run: the verdict is the corpus's, the outcome livesplice's)."""
    result.row = asdict(row)
    result.verdict = judge(result.outcome, row.expected)
    return result
