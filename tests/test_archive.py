"""The update file: deterministic, and every malformation is a clear error."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from livesplice.errors import MalformedUpdate, UsageError
from livesplice.update.archive import encode_update, read_update, write_update
from livesplice.update.format import Manifest, Reloc, Section, SymbolInfo, Target


def sample_manifest() -> Manifest:
    sec = Section(
        key="a.c:.text.f",
        role="replacement",
        name="f",
        unit="a.c",
        align=16,
        size=3,
        data="c3c3c3",
        relocs=[Reloc(1, "R_X86_64_PLT32", "printf", -4)],
        executable=True,
        replaces="a.c:.text.f",
    )
    tgt = Target(
        name="prog",
        kind="executable",
        build_id="ab",
        changed_functions=["f"],
        new_functions=[],
        new_data=[],
        sections=[sec],
        symbols={"printf": SymbolInfo("printf", "printf", "global", "notype", False)},
    )
    return Manifest(id="abcdefgh", description="d", compiler="GCC", patch_sha256="0", targets=[tgt])


def test_roundtrip_and_determinism(tmp_path: Path) -> None:
    m = sample_manifest()
    assert encode_update(m, "p") == encode_update(sample_manifest(), "p")
    out = tmp_path / "u.update"
    write_update(out, m, "p")
    back = read_update(out)
    assert back.manifest == m
    assert back.patch == "p"
    assert back.signature is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"not an update", gzip.compress(b"garbage that is not a tar")],
)
def test_malformed_updates_are_clear_errors(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "bad.update"
    bad.write_bytes(payload)
    with pytest.raises(MalformedUpdate):
        read_update(bad)


def test_missing_update(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        read_update(tmp_path / "nope")


def test_cli_inspect_bad_file_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.update"
    bad.write_bytes(b"xx")
    r = subprocess.run(
        [sys.executable, "-m", "livesplice", "inspect", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "MALFORMED_UPDATE" in r.stderr
    assert "Traceback" not in r.stderr
