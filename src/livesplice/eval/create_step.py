"""Step 1: ``livesplice create`` on the pre tree with the package's own build, timed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import ExitCode

# The package's own build. nocheck: the evaluation times the build, not the test suites
# (Debian Policy 4.9.1 DEB_BUILD_OPTIONS); DPKG_GENSYMBOLS_CHECK_LEVEL=0: a pre tree misses
# symbols that later patches add to debian/*.symbols (seen with expat), which would fail
# dh_makeshlibs after the compile is complete (dpkg-gensymbols(1)).
#
# The post build is a CLEAN build (``debian/rules clean`` first; ``-nc`` keeps
# dpkg-buildpackage from cleaning again): Debian rules files often build from copies or
# behind stamp files (expat's rules copies expat/* into src/ once, guarded by
# config-common-stamp), so an incremental post build can compile nothing and report a false
# "nothing to do". Units that recompile into identical objects still count as unchanged
# (the build is reproducible: same paths, SOURCE_DATE_EPOCH from debian/changelog).
DEFAULT_BUILD = "debian/rules clean >/dev/null && dpkg-buildpackage -nc -B -uc -us"
BUILD_ENV = {"DEB_BUILD_OPTIONS": "nocheck", "DPKG_GENSYMBOLS_CHECK_LEVEL": "0"}
KEPT_PREFIX = "livesplice: kept the build directory "


@dataclass
class CreateOutcome:
    """How ``livesplice create`` ended for a row, read from its exit code and JSON."""

    status: str  # "created" | "nothing" | "refused" | "failed"
    seconds: float
    exit_code: int
    reason: str = ""
    details: list[str] = field(default_factory=list)
    update: Path | None = None
    workdir: Path | None = None  # the kept build directory (pre outputs under pre/)
    warnings: list[str] = field(default_factory=list)
    verified: list[dict[str, object]] = field(default_factory=list)  # create --verify-against


def livesplice_command() -> list[str]:
    """This Python's livesplice, so the eval runs the checkout it was started from."""
    return [sys.executable, "-m", "livesplice"]


def run_create(
    pre_tree: Path,
    fix_patch: Path,
    update: Path,
    update_id: str,
    log: Path,
    build: str = DEFAULT_BUILD,
    jobs: int = 2,
    target: str | None = None,
    verify: list[Path] | None = None,
) -> CreateOutcome:
    """Run ``livesplice create`` on the pre tree with the package's own build, timed, its output
    kept in ``log``."""
    # --target: only the row's executable/library decides (a package's test binaries, e.g.
    # memcached's gcov-instrumented memcached-debug, must not refuse the daemon's update)
    cmd = [
        *livesplice_command(),
        "create",
        "--build",
        build,
        "--patch",
        str(fix_patch),
        "--id",
        update_id,
        "-o",
        str(update),
        "-j",
        str(jobs),
        "--keep-tmp",
        "--json",
        # as Debian's buildds: a pyenv python3 on the caller's PATH broke haproxy's build
        "--clean-env",
        *(["--target", target] if target else []),
        *[a for v in verify or [] for a in ("--verify-against", str(v))],
        str(pre_tree),
    ]
    env = dict(os.environ, **BUILD_ENV)
    update.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, check=False, stdin=subprocess.DEVNULL
    )
    seconds = time.monotonic() - start
    log.write_text(
        f"$ {' '.join(cmd)}\n# {seconds:.1f} s, exit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    )
    return parse_create_output(proc.returncode, proc.stdout, proc.stderr, seconds, update)


_PROGRESS = re.compile(r"^\s*\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ livesplice: ")


def is_progress(line: str) -> bool:
    """A create progress line ("2026-12-05T18:12:01Z livesplice: pre build ..."), not part
    of an error."""
    return bool(_PROGRESS.match(line))


def parse_create_output(
    code: int, stdout: str, stderr: str, seconds: float, update: Path
) -> CreateOutcome:
    """Classify ``livesplice create --json --keep-tmp`` output (see README exit codes)."""
    workdir = None
    json_lines: list[str] = []
    for line in stdout.splitlines():
        if line.startswith(KEPT_PREFIX):
            workdir = Path(line.removeprefix(KEPT_PREFIX).strip())
        elif json_lines or line.startswith("{"):
            json_lines.append(line)
    if code == ExitCode.OK:
        try:
            doc = json.loads("\n".join(json_lines))
        except json.JSONDecodeError:
            return CreateOutcome(
                "failed",
                seconds,
                code,
                "create printed no JSON result",
                stdout.splitlines()[-10:],
                workdir=workdir,
            )
        if doc.get("status") == "nothing_to_do":
            return CreateOutcome("nothing", seconds, code, doc.get("message", ""), workdir=workdir)
        return CreateOutcome(
            "created",
            seconds,
            code,
            doc.get("message", ""),
            update=update,
            workdir=workdir,
            verified=list(doc.get("verified", [])),
        )
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not is_progress(ln)]
    head = next((ln for ln in lines if ln.startswith("livesplice: ")), lines[0] if lines else "")
    reason = head.removeprefix("livesplice: ")
    details = [ln.strip() for ln in lines if ln is not head][:40]
    status = "refused" if code == ExitCode.REFUSED else "failed"
    if code == ExitCode.TARGET_UNCHANGED:
        status = "other-output"  # the fix changes code, but not in the row's target
    if code == ExitCode.BUILD_FAILED and "the unpatched tree does not build" in reason:
        # the package's own build failed before livesplice had anything to answer: the
        # harness's failure (a build-dependency, the machine), not the tool's
        status = "harness"
    return CreateOutcome(status, seconds, code, reason, details, workdir=workdir)
