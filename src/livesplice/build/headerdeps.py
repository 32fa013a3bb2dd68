"""Did an incremental rebuild recompile every unit that reads a patched header?

``make`` rebuilds an object only when a prerequisite it knows of is newer. Automake, CMake,
Meson and kbuild record each unit's headers (gcc -MD); a hand-written Makefile often lists
none, or only the direct ones. After a header-only patch such a build recompiles nothing, and
the update would claim no change, or miss the units that include the header through another
header: unsafe. So the compiler itself is asked which files each pre unit reads
(``gcc -M`` with the unit's own command line, in its own directory), and a unit that reads a
patched header but was not recompiled in the post build is reported like a missed source.
Only run when the patch touches a header.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livesplice.build.builder import BuildResult

HEADER_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".H", ".inc", ".def")
_ARG_DROP = {"-c", "-MD", "-MMD", "-MP", "-M", "-MM", "-E", "-S"}
_ARG_DROP_WITH_VALUE = {"-o", "-MF", "-MT", "-MQ"}


def preprocess_argv(argv: list[str]) -> list[str]:
    """The compile's command line turned into a dependency listing (``-M -MG``): output,
    dependency-file and compile-only options removed, everything that decides which headers
    are read (-I, -D, -include, -std ...) kept."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _ARG_DROP_WITH_VALUE:
            skip = True
            continue
        if a in _ARG_DROP or a.startswith(("-Wp,-MD", "-Wp,-MMD", "-MF", "-MT", "-MQ")):
            continue
        if a.startswith("-o") and len(a) > 2:
            continue
        out.append(a)
    return [*out, "-M", "-MG", "-w"]


def files_read(argv: list[str], cwd: str) -> set[str] | None:
    """Absolute paths of the files the compile reads; None when the compiler cannot say."""
    try:
        done = subprocess.run(
            preprocess_argv(argv), cwd=cwd, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rule = done.stdout.replace("\\\n", " ")
    deps = shlex.split(rule.partition(":")[2]) if ":" in rule else []
    return {os.path.realpath(os.path.join(cwd, d)) for d in deps}


def headers_not_recompiled(
    tree: Path, touched: list[str], pre: BuildResult, post: BuildResult, jobs: int = 2
) -> list[str]:
    """``header (read by unit)`` for every pre unit that reads a patched header (any depth) and that
    the post build did not compile again. A unit whose dependencies cannot be listed counts
    as reading it: only the compiler's answer may rule a unit out."""
    headers = {os.path.realpath(tree / t) for t in touched if t.endswith(HEADER_SUFFIXES)}
    if not headers:
        return []
    stale = [
        (built, saved.record)
        for built, saved in sorted(pre.compiles.items())
        if built not in post.compiles and saved.record.language != "asm"
    ]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        reads = list(pool.map(lambda br: files_read(br[1].argv, br[1].cwd), stale))
    missed = []
    root = os.path.realpath(tree)
    for (_built, rec), read in zip(stale, reads, strict=True):
        hit = sorted(headers if read is None else headers & read)
        missed += [f"{os.path.relpath(h, root)} (read by {rec.source})" for h in hit]
    return missed
