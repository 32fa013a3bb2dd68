"""`livesplice create` / `inspect` as a user meets them: determinism and bad inputs.

Every command runs as a separate process (``python -m livesplice``). For each bad input the
contract is: a clear message on stderr naming what is wrong, the documented exit code (2 for
bad input, 4 when the project's own build fails), no Python traceback, and no temporary files
left behind.

Temporary files: every run gets a private ``TMPDIR`` (which must be empty afterwards), so that
other livesplice runs on the same machine cannot make the check pass or fail. Because that
alone would miss a leak into a hard-coded ``/tmp``, the tree handed to ``create`` also holds a
uniquely named marker file, and no ``/tmp/livesplice-*`` entry that appeared during the run
may contain it (a leaked build directory is a copy of the tree).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from livesplice.update.archive import MAGIC, SIZES, encode_update, open_envelope
from livesplice.update.format import Manifest, Section, SymbolInfo, Target

REPO = Path(__file__).resolve().parents[1]
CASES = Path(__file__).resolve().parent / "cases"
BUILD_ENV_NOISE = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "MAKEFLAGS")
EXIT_USAGE = 2
EXIT_BUILD_FAILED = 4

CALC_FIX = """\
--- a/calc.c
+++ b/calc.c
@@ -2,5 +2,5 @@

 int compute(int x)
 {
-\treturn x * 3 + 1;
+\treturn x * 3 + 2;
 }
"""


class Cli:
    """Runs ``python -m livesplice`` and checks the invariants every run must keep."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.private_tmp = tmp_path / "tmp"
        self.private_tmp.mkdir()
        self.marker = f"livesplice-test-marker-{uuid.uuid4().hex}"
        env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV_NOISE}
        env["TMPDIR"] = str(self.private_tmp)
        env["LIVESPLICE_INCLUDE"] = str(REPO / "include")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p
        )
        env.setdefault("LC_ALL", "C.UTF-8")
        self.env = env

    def tree(self, case: str = "body-change", name: str = "tree") -> Path:
        """A copy of a case's project (without the case's metadata) plus the marker file."""
        dest = self.tmp_path / name
        shutil.copytree(
            CASES / case,
            dest,
            ignore=shutil.ignore_patterns("expected.json", "fix.patch", "case.json", "README.md"),
        )
        (dest / self.marker).write_text("marker\n")
        return dest

    def patch(self, text: str, name: str = "fix.patch") -> Path:
        p = self.tmp_path / name
        p.write_text(text)
        return p

    def run(self, *args: str, wrap: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """``wrap``: a command that execs the rest (e.g. a private mount namespace)."""
        before = set(Path("/tmp").glob("livesplice-*"))
        proc = subprocess.run(
            [*wrap, sys.executable, "-m", "livesplice", *args],
            cwd=self.tmp_path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = (
            f"$ livesplice {' '.join(args)}\n-> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
        assert "Traceback" not in proc.stderr + proc.stdout, report
        assert list(self.private_tmp.iterdir()) == [], f"temporary files left:\n{report}"
        for entry in set(Path("/tmp").glob("livesplice-*")) - before:
            leaked = entry.is_dir() and any(entry.rglob(self.marker))
            assert not leaked, f"{entry} (a copy of the tree) was left behind:\n{report}"
        return proc


PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ livesplice: .*\n", re.MULTILINE)


def expect_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    report = f"-> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == code, report
    # the stages run before the error are logged first (cli_progress.LogLines)
    error = PROGRESS_LINE.sub("", proc.stderr)
    assert error.startswith("livesplice: "), report
    for w in words:
        assert w.lower() in error.lower(), f"stderr does not mention {w!r}:\n{report}"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


# ---------------------------------------------------------------- determinism


def test_same_inputs_same_id_give_byte_identical_updates(cli: Cli) -> None:
    tree = cli.tree()
    patch = cli.patch(CALC_FIX)
    outs = []
    for n in (1, 2):
        out = cli.tmp_path / f"run{n}.update"
        proc = cli.run("create", "--id", "same", "--patch", str(patch), "-o", str(out), str(tree))
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    # ... and the update is a real one, not an empty file that is trivially identical.
    proc = cli.run("inspect", "--json", str(cli.tmp_path / "run1.update"))
    info = json.loads(proc.stdout)
    assert info["id"] == "same"
    assert info["targets"][0]["changed_functions"] == ["compute"]


def test_same_patch_from_a_copy_of_the_tree_gives_the_same_update(cli: Cli) -> None:
    """The tree's location must not leak into the update (builds run in temporary dirs)."""
    patch = cli.patch(CALC_FIX)
    outs = []
    for name in ("tree-a", "tree-b"):
        tree = cli.tree(name=name)
        out = cli.tmp_path / f"{name}.update"
        proc = cli.run("create", "--id", "same", "--patch", str(patch), "-o", str(out), str(tree))
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- bad inputs to create


def test_missing_tree(cli: Cli) -> None:
    patch = cli.patch(CALC_FIX)
    missing = cli.tmp_path / "no-such-tree"
    proc = cli.run("create", "--patch", str(patch), str(missing))
    expect_error(proc, EXIT_USAGE, str(missing), "does not exist")


def test_tree_is_a_file(cli: Cli) -> None:
    patch = cli.patch(CALC_FIX)
    proc = cli.run("create", "--patch", str(patch), str(patch))
    expect_error(proc, EXIT_USAGE, "not a directory")


def test_missing_patch_file(cli: Cli) -> None:
    tree = cli.tree()
    missing = cli.tmp_path / "no-such.patch"
    proc = cli.run("create", "--patch", str(missing), str(tree))
    expect_error(proc, EXIT_USAGE, str(missing), "does not exist")


def test_patch_that_does_not_apply_names_file_and_hunk(cli: Cli) -> None:
    tree = cli.tree()
    patch = cli.patch(CALC_FIX.replace("x * 3 + 1", "x * 4 + 1"))
    out = cli.tmp_path / "u.update"
    proc = cli.run("create", "--patch", str(patch), "-o", str(out), str(tree))
    expect_error(proc, EXIT_USAGE, "calc.c", "hunk")
    assert not out.exists()


def test_patch_already_applied_is_a_clear_error(cli: Cli) -> None:
    tree = cli.tree()
    calc = tree / "calc.c"
    calc.write_text(calc.read_text().replace("x * 3 + 1", "x * 3 + 2"))
    proc = cli.run("create", "--patch", str(cli.patch(CALC_FIX)), str(tree))
    expect_error(proc, EXIT_USAGE, "calc.c")


def test_patch_for_a_file_not_in_the_tree(cli: Cli) -> None:
    tree = cli.tree()
    patch = cli.patch(CALC_FIX.replace("calc.c", "nosuch.c"))
    proc = cli.run("create", "--patch", str(patch), str(tree))
    expect_error(proc, EXIT_USAGE, "nosuch.c")


def test_patched_tree_does_not_build_shows_compiler_error(cli: Cli) -> None:
    tree = cli.tree()
    patch = cli.patch(CALC_FIX.replace("+\treturn x * 3 + 2;", "+\treturn x * 3 +;"))
    out = cli.tmp_path / "u.update"
    proc = cli.run("create", "--patch", str(patch), "-o", str(out), str(tree))
    # gcc's own words: "error: expected expression before ';' token"
    expect_error(proc, EXIT_BUILD_FAILED, "calc.c", "expected expression")
    assert not out.exists()


def test_unpatched_tree_does_not_build_shows_compiler_error(cli: Cli) -> None:
    tree = cli.tree()
    main = tree / "main.c"
    main.write_text(main.read_text().replace("compute(v)", "compute(undeclared_thing)"))
    proc = cli.run("create", "--patch", str(cli.patch(CALC_FIX)), str(tree))
    expect_error(proc, EXIT_BUILD_FAILED, "undeclared_thing")


def test_build_command_not_found(cli: Cli) -> None:
    tree = cli.tree()
    proc = cli.run(
        "create", "--patch", str(cli.patch(CALC_FIX)), "--build", "no-such-build-tool", str(tree)
    )
    expect_error(proc, EXIT_BUILD_FAILED, "no-such-build-tool")


@pytest.mark.parametrize(
    "output",
    [
        "/proc/nope",  # procfs: creating a file fails even for root
        "/sys/nope.update",  # sysfs: read-only directory for everybody
        "{tmp}/no/such/dir/u.update",  # missing directory
        "{tmp}",  # an existing directory
    ],
)
def test_unwritable_output_fails_before_building(cli: Cli, output: str) -> None:
    tree = cli.tree()
    out = output.format(tmp=cli.tmp_path)
    proc = cli.run("create", "--patch", str(cli.patch(CALC_FIX)), "-o", out, str(tree))
    expect_error(proc, EXIT_USAGE, out)


# Runs the rest of the command in a private mount namespace where $0 is a read-only bind
# mount of itself; exits 97 if the directory is still writable there (the test would prove
# nothing), 98 if the mount is not allowed here.
READ_ONLY_WRAP = (
    'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" || exit 98; '
    'touch "$0/probe" 2>/dev/null && exit 97; exec "$@"'
)


def test_output_in_read_only_directory(cli: Cli) -> None:
    """An output directory we cannot write to fails before the build. As root (how the
    README runs the tests) mode 0555 does not stop us, so the directory is made a read-only
    bind mount instead, in a mount namespace of the command's own."""
    tree = cli.tree()
    ro = cli.tmp_path / "ro"
    ro.mkdir()
    out = ro / "u.update"
    args = ("create", "--patch", str(cli.patch(CALC_FIX)), "-o", str(out), str(tree))
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.fail("unshare (util-linux) is needed to make a read-only directory as root")
        proc = cli.run(*args, wrap=("unshare", "--mount", "sh", "-c", READ_ONLY_WRAP, str(ro)))
        assert proc.returncode not in (97, 98), (proc.returncode, proc.stderr)
    else:
        ro.chmod(0o555)
        try:
            proc = cli.run(*args)
        finally:
            ro.chmod(0o755)
    expect_error(proc, EXIT_USAGE, str(out), "read-only" if os.geteuid() == 0 else "denied")
    assert not out.exists()


def test_bad_update_id(cli: Cli) -> None:
    tree = cli.tree()
    proc = cli.run("create", "--patch", str(cli.patch(CALC_FIX)), "--id", "Bad Id!", str(tree))
    expect_error(proc, EXIT_USAGE, "Bad Id!")


# ---------------------------------------------------------------- malformed updates


def _tar_gz(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    body = gzip.compress(raw.getvalue())
    return MAGIC + SIZES.pack(0, 0, len(body)) + body


def _tar_gz_raw(members: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    body = gzip.compress(raw.getvalue())
    return MAGIC + SIZES.pack(0, 0, len(body)) + body


def _symlink_member() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        tar.addfile(info)
    body = gzip.compress(raw.getvalue())
    return MAGIC + SIZES.pack(0, 0, len(body)) + body


def _valid_update() -> bytes:
    sec = Section(
        key="calc.c:.text.compute",
        role="replacement",
        name="compute",
        unit="calc.c",
        align=16,
        size=4,
        data="8d47ffc3",
        executable=True,
        replaces="calc.c:.text.compute",
    )
    tgt = Target(
        name="prog",
        kind="executable",
        build_id="",
        changed_functions=["compute"],
        new_functions=[],
        new_data=[],
        sections=[sec],
        symbols={"compute": SymbolInfo("compute", "compute", "global", "func", True, "calc.c")},
    )
    m = Manifest(id="valid", description="d", compiler="GCC", patch_sha256="0", targets=[tgt])
    return encode_update(m, CALC_FIX)


def _manifest_json(**changes: object) -> bytes:
    raw = _manifest_dict()
    raw.update(changes)
    return json.dumps(raw).encode()


def _manifest_dict() -> dict[str, Any]:
    env = open_envelope(_valid_update())
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(env.payload)), mode="r:") as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        raw: dict[str, Any] = json.loads(member.read())
    return raw


def _target_changed(**changes: object) -> bytes:
    raw = _manifest_dict()
    raw["targets"][0].update(changes)
    return json.dumps(raw).encode()


def _section_changed(**changes: object) -> bytes:
    raw = _manifest_dict()
    raw["targets"][0]["sections"][0].update(changes)
    return json.dumps(raw).encode()


MALFORMED = {
    "empty": b"",
    "text": b"this is not an update\n",
    "gzip-not-tar": gzip.compress(b"plain bytes, not a tar archive" * 20),
    "truncated": _valid_update()[:40],
    "no-manifest": _tar_gz({"patch": b"--- a/x\n"}),
    "manifest-not-json": _tar_gz({"manifest.json": b"{not json"}),
    "manifest-a-list": _tar_gz({"manifest.json": b"[1, 2]"}),
    "wrong-format": _tar_gz({"manifest.json": _manifest_json(format="ksplice/1")}),
    "missing-targets": _tar_gz({"manifest.json": b'{"format": "livesplice-update/1", "id": "x"}'}),
    "target-wrong-shape": _tar_gz({"manifest.json": _manifest_json(targets=[{"name": "x"}])}),
    "old-format-1": gzip.compress(b"a gzip'd tar of format 1"),
    "nested-json": _tar_gz({"manifest.json": b"[" * 100000}),
    "unknown-field": _tar_gz({"manifest.json": _manifest_json(extra=1)}),
    "id-int": _tar_gz({"manifest.json": _manifest_json(id=7)}),
    "id-colon": _tar_gz({"manifest.json": _manifest_json(id="x:code")}),
    "id-space": _tar_gz({"manifest.json": _manifest_json(id="a b")}),
    "id-path": _tar_gz({"manifest.json": _manifest_json(id="../../etc/passwd")}),
    "id-newline": _tar_gz({"manifest.json": _manifest_json(id="ok\nnew")}),
    "id-empty": _tar_gz({"manifest.json": _manifest_json(id="")}),
    "id-long": _tar_gz({"manifest.json": _manifest_json(id="a" * 300)}),
    "target-twice": _tar_gz(
        {"manifest.json": _manifest_json(targets=_manifest_dict()["targets"] * 2)}
    ),
    "description-list": _tar_gz({"manifest.json": _manifest_json(description=["x"])}),
    "kind-unknown": _tar_gz({"manifest.json": _target_changed(kind="firmware")}),
    "build-id-not-hex": _tar_gz({"manifest.json": _target_changed(build_id="zz")}),
    "symbols-a-list": _tar_gz({"manifest.json": _target_changed(symbols=[])}),
    "size-negative": _tar_gz({"manifest.json": _section_changed(size=-1)}),
    "size-huge": _tar_gz({"manifest.json": _section_changed(size=2**64)}),
    "size-string": _tar_gz({"manifest.json": _section_changed(size="4")}),
    "data-not-hex": _tar_gz({"manifest.json": _section_changed(data="zz")}),
    "align-3": _tar_gz({"manifest.json": _section_changed(align=3)}),
    "role-unknown": _tar_gz({"manifest.json": _section_changed(role="payload")}),
    "reloc-outside": _tar_gz(
        {
            "manifest.json": _section_changed(
                relocs=[{"offset": 99, "type": "R_X86_64_PC32", "symbol": "x", "addend": 0}]
            )
        }
    ),
    "reloc-offset-string": _tar_gz(
        {
            "manifest.json": _section_changed(
                relocs=[{"offset": "1", "type": "R_X86_64_PC32", "symbol": "x", "addend": 0}]
            )
        }
    ),
    "executable-string": _tar_gz({"manifest.json": _section_changed(executable="yes")}),
    "member-symlink": _symlink_member(),
    "member-twice": _tar_gz_raw(
        [("manifest.json", _manifest_json()), ("manifest.json", _manifest_json())]
    ),
    "size-header-lies": _valid_update()[:-1],
}


def test_the_valid_update_used_below_is_valid(cli: Cli) -> None:
    """Guards the malformed cases: they are broken copies of an update inspect accepts."""
    good = cli.tmp_path / "good.update"
    good.write_bytes(_valid_update())
    proc = cli.run("inspect", "--json", str(good))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["targets"][0]["changed_functions"] == ["compute"]


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_inspect_malformed_update(cli: Cli, kind: str) -> None:
    bad = cli.tmp_path / f"{kind}.update"
    bad.write_bytes(MALFORMED[kind])
    for args in (["inspect", str(bad)], ["inspect", "--json", str(bad)]):
        proc = cli.run(*args)
        expect_error(proc, EXIT_USAGE, str(bad))
        assert proc.stdout == ""


def test_apply_refuses_every_malformed_update_with_exit_2(cli: Cli) -> None:
    """The apply path (signature first, then capped decompression, then the strict
    manifest) gives MALFORMED_UPDATE or BAD_SIGNATURE -- never a traceback -- for each."""
    for kind in sorted(MALFORMED):
        bad = cli.tmp_path / f"{kind}.update"
        bad.write_bytes(MALFORMED[kind])
        for extra in ([], ["--allow-unsigned"]):
            proc = cli.run("apply", str(bad), "--pid", "1", *extra)
            assert proc.returncode == EXIT_USAGE, (kind, extra, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert (
                "MALFORMED_UPDATE" in proc.stderr
                or "BAD_INPUT" in proc.stderr
                or (not extra and "BAD_SIGNATURE" in proc.stderr)
            ), (kind, proc.stderr)


def test_inspect_missing_update(cli: Cli) -> None:
    missing = cli.tmp_path / "nothing.update"
    proc = cli.run("inspect", str(missing))
    expect_error(proc, EXIT_USAGE, str(missing))


def test_inspect_a_directory(cli: Cli) -> None:
    proc = cli.run("inspect", str(cli.tmp_path))
    expect_error(proc, EXIT_USAGE, str(cli.tmp_path))
