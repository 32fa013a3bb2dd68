"""The corpus CSV: one row per fix, and the Debian patch series split around the fix."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import UsageError

COLUMNS = (
    "package",
    "version",
    "first_patch",
    "last_patch",
    "cves",
    "expected",
    "target",
    "change_class",
    "shipped_version",
    "binaries",
)
# columns a corpus may leave out (older CSVs end at change_class)
OPTIONAL_COLUMNS = ("change_class", "shipped_version", "binaries")
# what a careful tool should do with the fix (the `expected` column)
EXPECTED = ("apply", "nothing", "refuse")


@dataclass(frozen=True)
class CorpusRow:
    """One fix: ``first_patch``..``last_patch`` of ``package``'s debian/patches/series."""

    number: int  # 1-based data row in the CSV (for --rows)
    package: str
    version: str  # Debian source version, maybe with an epoch ("5:7.0.15-1~deb12u10")
    first_patch: str
    last_patch: str
    cves: str
    expected: str
    target: str  # executable or library (soname) the fix lands in
    change_class: str = ""
    # A row on Debian's own binaries: the released version whose .debs users run (the pre
    # source is that version, as shipped; the fix is first..last of ``version``'s series)
    # and the binary packages that carry the target (``redis-server redis-tools``).
    shipped_version: str = ""
    binaries: str = ""

    @property
    def on_shipped_binaries(self) -> bool:
        """Whether the row applies to Debian's released binaries rather than livesplice's own
        build."""
        return bool(self.shipped_version)

    @property
    def upstream_free_version(self) -> str:
        """The version as it appears in file names: without the epoch."""
        return self.version.split(":", 1)[1] if ":" in self.version else self.version

    @property
    def slug(self) -> str:
        """A file-name-safe name for this row's cache directory."""
        raw = f"{self.package}_{self.upstream_free_version}_{self.first_patch}"
        return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)

    @property
    def update_id(self) -> str:
        """An update id (a-z0-9_-, at most 32 characters) naming the package and first CVE."""
        cve = self.cves.split()[0] if self.cves.split() else self.first_patch
        raw = re.sub(r"[^a-z0-9]+", "-", f"{self.package}-{cve}".lower()).strip("-")
        return raw[:32].rstrip("-")


def read_corpus(path: Path) -> list[CorpusRow]:
    """Parse a corpus CSV; every problem is reported at once, with its line number."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read the corpus {path}: {e.strerror}") from None
    return parse_corpus(text.splitlines(), source=str(path))


def parse_corpus(lines: Iterable[str], source: str = "CSV") -> list[CorpusRow]:
    """Rows of the corpus CSV, each checked: a missing column or bad value is a usage error
    naming the line."""
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        raise UsageError(
            f"{source}: missing column(s) {', '.join(missing)}",
            advice=f"the header must be: {','.join(COLUMNS)}",
        )
    rows: list[CorpusRow] = []
    problems: list[str] = []
    for number, raw in enumerate(reader, start=1):
        values = {k: (raw.get(k) or "").strip() for k in COLUMNS}
        if not any(values.values()):
            continue
        line = f"row {number} (line {reader.line_num})"
        empty = [k for k in (*COLUMNS[:5], "expected", "target") if not values[k]]
        if empty:
            problems.append(f"{line}: empty {', '.join(empty)}")
            continue
        if bool(values["shipped_version"]) != bool(values["binaries"]):
            problems.append(f"{line}: shipped_version and binaries go together")
            continue
        if values["expected"] not in EXPECTED:
            problems.append(
                f"{line}: expected is {values['expected']!r}, not one of {', '.join(EXPECTED)}"
            )
            continue
        rows.append(CorpusRow(number=number, **values))
    if problems:
        raise UsageError(f"{source}: {len(problems)} bad row(s)", details=problems)
    return rows


def select_rows(rows: Sequence[CorpusRow], spec: str | None) -> list[CorpusRow]:
    """``--rows``: comma-separated row numbers, ranges (``2-4``), package names or CVEs."""
    if not spec:
        return list(rows)
    chosen: list[CorpusRow] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if m := re.fullmatch(r"(\d+)(?:-(\d+))?", item):
            lo, hi = int(m[1]), int(m[2] or m[1])
            picked = [r for r in rows if lo <= r.number <= hi]
        else:
            picked = [r for r in rows if item in (r.package, r.target) or item in r.cves.split()]
        if not picked:
            raise UsageError(
                f"--rows: {item!r} matches no row",
                advice="use row numbers (1 = first data row), ranges, package names or CVEs",
            )
        chosen.extend(r for r in picked if r not in chosen)
    return chosen


@dataclass(frozen=True)
class SeriesSplit:
    """The series lines applied in pre (before the fix) and in post (through the fix).

    ``tail``: entries after the fix that both trees keep at the END of their series because
    debian/rules depends on them being last (see :func:`rules_pinned_tail`).
    """

    pre: list[str]
    post: list[str]
    fix: list[str]
    tail: list[str] = field(default_factory=list)


# a recipe line running ``quilt pop`` with no argument or a count: it pops the LAST entries
# of the series, whatever they are (quilt(1): "pop [num|patch]")
_QUILT_POP = re.compile(r"\bquilt\s+pop\b(?P<args>[^;&|\n]*)")


def rules_pinned_tail(rules_text: str) -> int:
    """How many entries at the end of the series debian/rules relies on being last.

    curl's rules run ``quilt pop`` twice to build its OpenSSL flavour without the last two
    series entries, 90_gnutls.patch and 99_nss.patch ("Do not add patches below. Used to
    generate packages for the other crypto libraries.", its series file), then push them
    back one at a time for the GnuTLS and NSS flavours. A series cut off before the fix
    drops those two, the pops take away ordinary patches instead, and the GnuTLS flavour
    installs libcurl.so.4 instead of libcurl-gnutls.so.4 (dh_install: "Cannot find
    usr/lib/*/libcurl-gnutls.so.4*"). Counted: bare pops (1 each) and numeric pops (N);
    ``-a`` and named pops do not depend on the order of the tail.
    """
    pops = 0
    for line in rules_text.splitlines():
        if not line.startswith("\t"):  # recipe lines only; comments and rules text skip
            continue
        for m in _QUILT_POP.finditer(line.split("#", 1)[0]):
            args = [a for a in m["args"].split() if a not in ("-q", "--quiet", "-f")]
            if not args:
                pops += 1
            elif len(args) == 1 and args[0].isdigit():
                pops += int(args[0])
    return pops


def series_entries(series_text: str) -> list[str]:
    """Entries of a quilt series file: comments and blank lines dropped, options kept.

    A series line is ``name [-pN]``; ``#`` starts a comment (quilt(1), "series file").
    """
    entries = []
    for line in series_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return entries


def split_series(series_text: str, first: str, last: str, pinned_tail: int = 0) -> SeriesSplit:
    """pre = the entries before ``first``; post = the entries up to and including ``last``.

    ``pinned_tail``: the last N entries of the whole series stay last in both trees (those
    after ``last`` only; a fix inside the tail is left where it is).
    """
    entries = series_entries(series_text)
    names = [e.split()[0] for e in entries]
    for patch in (first, last):
        if patch not in names:
            raise UsageError(
                f"patch {patch} is not in debian/patches/series",
                details=[f"series: {' '.join(names) or '(empty)'}"],
                advice="check first_patch/last_patch against the source version in the row",
            )
    i, j = names.index(first), names.index(last)
    if j < i:
        raise UsageError(f"last_patch {last} comes before first_patch {first} in the series")
    tail = entries[max(j + 1, len(entries) - pinned_tail) :] if pinned_tail > 0 else []
    return SeriesSplit(
        pre=entries[:i] + tail, post=entries[: j + 1] + tail, fix=entries[i : j + 1], tail=tail
    )
