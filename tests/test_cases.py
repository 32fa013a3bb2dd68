"""End-to-end `livesplice create` cases: one directory per case under tests/cases/.

Each case is a small real C (or C++) project, a fix.patch and the expected outcome; the format
is described in tests/cases/README.md. The runner copies the case to a temporary directory,
runs ``python -m livesplice create`` and ``python -m livesplice inspect --json`` as separate
processes (the way a user runs them: exit codes and stderr are part of what is tested) and
compares the result with expected.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES_DIR = Path(__file__).resolve().parent / "cases"
INCLUDE_DIR = REPO / "include"
# Files of a case directory that describe the case and are not part of the project's tree.
CASE_META = ("expected.json", "fix.patch", "case.json", "README.md")
# Variables from the caller's environment that would change how a case builds (a case's
# Makefile says `CFLAGS ?= -O2 -g`: an exported CFLAGS would silently replace it).
BUILD_ENV_NOISE = (
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "LDLIBS",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "GNUMAKEFLAGS",
)
CREATE_TIMEOUT = 300
FUNCTION_KEYS = ("changed_functions", "new_functions", "new_data")

# "unit:name" symbol keys (ARCHITECTURE.md "Symbol keys"): a source path with an extension,
# then ONE colon (a C++ demangled "A::b" has two and is not a unit prefix).
UNIT_PREFIX = re.compile(r"^[\w./+-]+\.\w+:(?!:)")
# gcc's numeric suffixes (`counter.0`, `weight.isra.0`, `lookup.part.1`) are an artefact of
# the compilation order and may differ between pre and post; they are not compared.
NUMERIC_SUFFIX = re.compile(r"\.\d+(?=\.|$)")


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES_DIR.iterdir() if p.is_dir() and (p / "expected.json").exists())


def canonical_name(name: str) -> str:
    """The form in which expected and actual names are compared (see cases/README.md)."""
    return NUMERIC_SUFFIX.sub("", UNIT_PREFIX.sub("", name))


def canonical_set(names: Iterable[str]) -> list[str]:
    return sorted(canonical_name(n) for n in names)


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n-> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def clean_env(tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV_NOISE}
    env["LIVESPLICE_INCLUDE"] = str(INCLUDE_DIR)
    # A private TMPDIR: livesplice's temporary files can be checked without seeing those of
    # other runs on the same machine.
    env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def livesplice(args: list[str], *, cwd: Path, env: dict[str, str]) -> Run:
    argv = [sys.executable, "-m", "livesplice", *args]
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=CREATE_TIMEOUT
    )
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def tree_digest(root: Path) -> str:
    """Hash of every path, mode and content under root (the user's tree must stay as it was)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        if p.is_symlink():
            h.update(b"L" + os.readlink(p).encode())
        elif p.is_file():
            h.update(b"F" + oct(p.stat().st_mode).encode() + p.read_bytes())
        else:
            h.update(b"D")
    return h.hexdigest()


def load_case(case: Path) -> tuple[dict[str, Any], str]:
    expected: dict[str, Any] = json.loads((case / "expected.json").read_text())
    build = "make"
    if (case / "case.json").exists():
        build = json.loads((case / "case.json").read_text()).get("build", build)
    return expected, build


def check_expected_shape(name: str, expected: dict[str, Any]) -> None:
    """A malformed expected.json must fail loudly, not make a case vacuous."""
    assert expected.get("exit") in (0, 3), f"{name}: exit must be 0 or 3"
    if name.endswith("-FAIL"):
        assert expected["exit"] == 3 and expected.get("reason"), f"{name}: needs exit 3 + reason"
        assert set(expected) <= {"exit", "reason", "refusal_items"}, f"{name}: unknown key"
    elif expected.get("nothing_to_do"):
        assert expected["exit"] == 0 and "targets" not in expected
    else:
        assert expected["exit"] == 0 and expected.get("targets"), f"{name}: needs targets"
        for tname, t in expected["targets"].items():
            assert set(t) <= {*FUNCTION_KEYS, "units", "kind"}, f"{name}/{tname}: unknown key"
            assert any(k in t for k in FUNCTION_KEYS), f"{name}/{tname}: checks nothing"


def refusal_items(stderr: str) -> int:
    """How many items the REFUSED paragraph lists (its indented detail lines)."""
    lines = stderr.splitlines()
    start = next(i for i, ln in enumerate(lines) if "REFUSED" in ln)
    return sum(1 for ln in lines[start + 1 :] if ln.startswith("  "))


def compare_targets(expected: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """Every difference between expected.json targets/hooks and `inspect --json`."""
    problems: list[str] = []
    actual = {t["name"]: t for t in info["targets"]}
    want = expected["targets"]
    if sorted(actual) != sorted(want):
        problems.append(f"targets: expected {sorted(want)}, got {sorted(actual)}")
    for tname, exp_t in sorted(want.items()):
        got = actual.get(tname)
        if got is None:
            continue
        for key in FUNCTION_KEYS:
            if key in exp_t and canonical_set(got[key]) != canonical_set(exp_t[key]):
                problems.append(
                    f"{tname}.{key}: expected {sorted(exp_t[key])}, got {sorted(got[key])}"
                )
        if "units" in exp_t and sorted(got["units"]) != sorted(exp_t["units"]):
            problems.append(f"{tname}.units: expected {exp_t['units']}, got {got['units']}")
        if "kind" in exp_t and got["kind"] != exp_t["kind"]:
            problems.append(f"{tname}.kind: expected {exp_t['kind']}, got {got['kind']}")
    exp_hooks = sorted(
        (h["kind"], canonical_name(h["function"])) for h in expected.get("hooks", [])
    )
    got_hooks = sorted((h["kind"], canonical_name(h["function"])) for h in info["hooks"])
    if exp_hooks != got_hooks:
        problems.append(f"hooks: expected {exp_hooks}, got {got_hooks}")
    return problems


@pytest.mark.parametrize("case", case_dirs(), ids=lambda p: p.name)
def test_case(case: Path, tmp_path: Path) -> None:
    expected, build = load_case(case)
    check_expected_shape(case.name, expected)

    tree = tmp_path / "tree"
    shutil.copytree(case, tree, symlinks=True, ignore=shutil.ignore_patterns(*CASE_META))
    before = tree_digest(tree)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = clean_env(private_tmp)
    out = tmp_path / "out" / "case.update"
    out.parent.mkdir()
    # The patch is passed from tmp_path, and tmp_path is blanked out of stderr below: the case
    # name (in both paths) must not satisfy a reason such as "layout" or "TLS" by itself.
    patch = tmp_path / "fix.patch"
    shutil.copyfile(case / "fix.patch", patch)

    create = livesplice(
        [
            "create",
            "--id",
            "testcase",
            "--patch",
            str(patch),
            "--build",
            build,
            "-o",
            str(out),
            "--json",
            str(tree),
        ],
        cwd=tmp_path,
        env=env,
    )
    report = create.describe()

    assert "Traceback" not in create.stderr, report
    assert create.returncode == expected["exit"], report
    assert tree_digest(tree) == before, "create modified the source tree it was given"
    assert list(private_tmp.iterdir()) == [], f"temporary files left behind:\n{report}"

    if expected["exit"] == 3:
        assert "REFUSED" in create.stderr, report
        text = create.stderr.replace(str(tmp_path.resolve()), "<tmp>")
        text = text.replace(str(tmp_path), "<tmp>").lower()
        missing = [r for r in expected["reason"] if r.lower() not in text]
        assert not missing, f"refusal does not mention {missing}:\n{report}"
        if "refusal_items" in expected:
            assert refusal_items(create.stderr) == expected["refusal_items"], report
        assert list(out.parent.iterdir()) == [], "a refused patch must not write an update"
        return

    status = json.loads(create.stdout)
    if expected.get("nothing_to_do"):
        assert status["status"] == "nothing_to_do", report
        assert list(out.parent.iterdir()) == [], "nothing to do must not write an update"
        return

    assert status["status"] == "created", report
    assert status["id"] == "testcase", report
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "stray files next to -o"

    inspect = livesplice(["inspect", "--json", str(out)], cwd=tmp_path, env=env)
    assert inspect.returncode == 0 and "Traceback" not in inspect.stderr, inspect.describe()
    info = json.loads(inspect.stdout)
    assert info["id"] == "testcase"
    problems = compare_targets(expected, info)
    assert not problems, "\n".join([*problems, "", "inspect --json:", inspect.stdout])


# ---------------------------------------------------------------- the runner's own rules


def test_suite_has_the_required_cases() -> None:
    names = {p.name for p in case_dirs()}
    assert len(names) >= 30
    for p in case_dirs():
        assert (p / "fix.patch").read_text().startswith(("--- a/", "--- /dev/null")), p.name


def test_canonical_names() -> None:
    assert canonical_name("src/net.c:helper") == "helper"
    assert canonical_name("b.c:max_step.3") == "max_step"
    assert canonical_name("weight.isra.0") == "weight.isra"
    assert canonical_name("lookup.part.12") == "lookup.part"
    assert canonical_name("sum_ports.cold") == "sum_ports.cold"
    assert canonical_name("_ZN7Counter4bumpEi") == "_ZN7Counter4bumpEi"
    assert canonical_name("Counter::bump(int)") == "Counter::bump(int)"


def test_compare_targets_reports_every_difference() -> None:
    expected = {
        "exit": 0,
        "targets": {"prog": {"changed_functions": ["work"], "new_data": []}},
        "hooks": [{"kind": "post_apply", "function": "fix_up"}],
    }
    info: dict[str, Any] = {
        "targets": [
            {
                "name": "prog",
                "kind": "executable",
                "units": ["w.c"],
                "changed_functions": ["w.c:work", "main"],
                "new_functions": [],
                "new_data": ["w.c:calls.0"],
            },
            {
                "name": "other",
                "kind": "executable",
                "units": [],
                "changed_functions": [],
                "new_functions": [],
                "new_data": [],
            },
        ],
        "hooks": [],
    }
    problems = compare_targets(expected, info)
    assert len(problems) == 4, problems
    info["targets"] = info["targets"][:1]
    info["targets"][0]["changed_functions"] = ["w.c:work"]
    info["targets"][0]["new_data"] = []
    info["hooks"] = [{"kind": "post_apply", "function": "w.c:fix_up", "target": "prog"}]
    assert compare_targets(expected, info) == []
