"""Create time of a real Debian package, divided by that package's own single build time.

Plain script: ``.venv/bin/python benchmarks/bench_create.py [--package redis|curl] [--jobs J]``
(as root: it fetches the source with apt and installs its build dependencies, once; both
are cached in ~/.cache/livesplice/eval, as the evaluation caches them).

A security team queues many fixes for one package version; issue 13 asks that, once the pre
build is cached, a create costs at most 1.3x the package's own build for a fix to a function
body and 2x for a fix to a header every unit includes. Measured in one run, on the source of
the package's corpus row (corpus/userspace-public.csv), with the same build command
(``dpkg-buildpackage -B``, tests off, J jobs) for all of it:

1. the package's own build: the command in a fresh copy of the tree, without livesplice;
2. ``livesplice create`` of the row's fix (a function body) with an empty prebuild cache:
   the pre build runs and is kept;
3. the same fix again: the pre build comes from the cache;
4. a fix to the header every unit includes (a limit lowered, with a comment line above it
   that moves every later line): every unit compiles again and the diff looks at them all.

Each create's stages (from its progress lines) are printed with the ratios. Every create
must write an update whose changed functions are the fix's: a fast wrong answer is not
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.eval.corpus import CorpusRow, read_corpus
from livesplice.eval.sources import fetch_source, install_build_deps, make_trees

REPO = Path(__file__).resolve().parents[1]
BUILD = 'DEB_BUILD_OPTIONS="nocheck $DEB_BUILD_OPTIONS" dpkg-buildpackage -B -uc -us'
EVAL_CACHE = Path(
    os.environ.get("LIVESPLICE_EVAL_CACHE", Path.home() / ".cache" / "livesplice" / "eval")
)
GOALS = {"body fix": 1.3, "header fix": 2.0}


@dataclass(frozen=True)
class HeaderFix:
    """A header nearly every unit includes, a line in it, its replacement; the function the
    new value changes."""

    path: str
    old: str
    new: str
    changed: str


HEADER_FIXES = {
    "redis": HeaderFix(
        "src/server.h",
        "#define PROTO_INLINE_MAX_SIZE   (1024*64) /* Max size of inline reads */\n",
        "/* inline requests are split at 16k: a smaller bound on unparsed input */\n"
        "#define PROTO_INLINE_MAX_SIZE   (1024*16) /* Max size of inline reads */\n",
        "processInlineBuffer",
    ),
    "curl": HeaderFix(
        "lib/urldata.h",
        "#define CURL_MAX_INPUT_LENGTH 8000000\n",
        "/* a lower bound on any single input string */\n#define CURL_MAX_INPUT_LENGTH 4000000\n",
        "Curl_setstropt",
    ),
}


@dataclass
class Timed:
    what: str
    seconds: float
    stages: list[tuple[str, float]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def corpus_row(package: str) -> CorpusRow:
    rows = [
        r for r in read_corpus(REPO / "corpus" / "userspace-public.csv") if r.package == package
    ]
    if not rows:
        sys.exit(f"bench_create: no row for {package} in corpus/userspace-public.csv")
    return rows[0]


def header_patch(pre: Path, fix: HeaderFix, out: Path) -> Path:
    """A -p1 patch of ``fix`` against the tree (made with diff, as a person would)."""
    with tempfile.TemporaryDirectory(prefix="bench-create-hdr-") as d:
        a, b = Path(d) / "a", Path(d) / "b"
        for side in (a, b):
            (side / fix.path).parent.mkdir(parents=True)
        text = (pre / fix.path).read_text()
        if fix.old not in text:
            sys.exit(f"bench_create: {fix.path} has no line {fix.old!r}")
        (a / fix.path).write_text(text)
        (b / fix.path).write_text(text.replace(fix.old, fix.new, 1))
        r = subprocess.run(
            ["diff", "-u", f"a/{fix.path}", f"b/{fix.path}"],
            cwd=d,
            capture_output=True,
            text=True,
            check=False,
        )
    out.write_text(r.stdout)
    return out


def own_build(pre: Path, scratch: Path, jobs: int) -> Timed:
    """The package's build, as its maintainer runs it, in a fresh copy of the tree."""
    tree = scratch / "own" / "tree"
    shutil.copytree(pre, tree, symlinks=True)
    env = dict(os.environ, DEB_BUILD_OPTIONS=f"parallel={jobs}")
    start = time.monotonic()
    r = subprocess.run(
        ["bash", "-c", BUILD],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - start
    if r.returncode != 0:
        sys.exit(
            f"bench_create: the package's own build failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        )
    shutil.rmtree(scratch / "own")
    return Timed("own build", seconds)


STAGE_DONE = re.compile(r"livesplice: (?P<stage>.+?) done in (?P<s>\d+\.\d) s")


def create(what: str, pre: Path, patch: Path, scratch: Path, cache: Path, jobs: int) -> Timed:
    out = scratch / f"{what.replace(' ', '-')}.update"
    out.unlink(missing_ok=True)
    env = dict(os.environ, LIVESPLICE_PREBUILD_CACHE=str(cache))
    env.pop("LIVESPLICE_SIGNING_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "livesplice",
        "create",
        "--build",
        BUILD,
        "--patch",
        str(patch),
        "--id",
        "bench",
        "-o",
        str(out),
        "-j",
        str(jobs),
        "--json",
        str(pre),
    ]
    start = time.monotonic()
    r = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    seconds = time.monotonic() - start
    if r.returncode != 0 or not out.exists():
        sys.exit(f"bench_create: {what}: create exited {r.returncode}\n{r.stderr[-5000:]}")
    stages = [(m["stage"], float(m["s"])) for m in STAGE_DONE.finditer(r.stderr)]
    inspect = subprocess.run(
        [sys.executable, "-m", "livesplice", "inspect", "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(inspect.stdout)
    changed = sorted({f for t in info["targets"] for f in t["changed_functions"]})
    return Timed(what, seconds, stages, changed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="redis", choices=sorted(HEADER_FIXES))
    ap.add_argument("--jobs", "-j", type=int, default=2)
    args = ap.parse_args()

    row = corpus_row(args.package)
    dsc = fetch_source(row, EVAL_CACHE)
    trees = make_trees(row, dsc, EVAL_CACHE / "rows" / row.slug)
    install_build_deps(dsc, trees.pre)
    print(
        f"bench_create: {row.package} {row.version}, fix {row.first_patch}; "
        f"build: {BUILD} (-j{args.jobs})",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="bench-create-") as d:
        scratch = Path(d)
        cache = scratch / "prebuild"
        header = header_patch(trees.pre, HEADER_FIXES[args.package], scratch / "header.patch")
        results = [own_build(trees.pre, scratch, args.jobs)]
        print(f"  {results[0].what}: {results[0].seconds:.1f} s", flush=True)
        for what, patch in (
            ("body fix, no cache", trees.fix_patch),
            ("body fix", trees.fix_patch),
            ("header fix", header),
        ):
            t = create(what, trees.pre, patch, scratch, cache, args.jobs)
            results.append(t)
            stages = ", ".join(f"{s} {sec:.1f}" for s, sec in t.stages)
            print(
                f"  create, {what}: {t.seconds:.1f} s ({stages}); changed: {', '.join(t.changed)}",
                flush=True,
            )
    build = results[0].seconds
    fix = HEADER_FIXES[args.package]
    if fix.changed not in results[3].changed:
        print(f"bench_create: the header fix did not change {fix.changed}: not measured")
        return 1
    print(f"\ncreate time / own build time ({row.package}, own build {build:.1f} s):")
    ok = True
    for t in results[1:]:
        goal = GOALS.get(t.what)
        ratio = t.seconds / build
        verdict = "" if goal is None else (" ok" if ratio <= goal else " OVER the goal")
        ok = ok and (goal is None or ratio <= goal)
        print(f"  {t.what:20s} {ratio:5.2f}x" + (f"  (goal <= {goal}x){verdict}" if goal else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
