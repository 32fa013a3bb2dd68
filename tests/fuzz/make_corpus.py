"""Regenerate the seed corpus of tests/test_hostile_updates.py (run from the repository root:
``.venv/bin/python tests/fuzz/make_corpus.py``). The signing key is thrown away."""

from __future__ import annotations

import tempfile
from pathlib import Path

from livesplice.update.archive import encode_update, write_update
from livesplice.update.format import Manifest, Reloc, Section, SymbolInfo, Target
from livesplice.update.signing import generate_key

OUT = Path(__file__).parent / "corpus"


def manifest() -> Manifest:
    code = Section(
        key="a.c:.text.f",
        role="replacement",
        name="f",
        unit="a.c",
        align=16,
        size=8,
        data="e800000000c3c3c3",
        executable=True,
        replaces="a.c:.text.f",
        relocs=[Reloc(1, "R_X86_64_PLT32", "g", -4)],
    )
    pre = Section(
        key="a.c:.text.f",
        role="pre",
        name="f",
        unit="a.c",
        align=16,
        size=6,
        data="e800000000c3",
        executable=True,
        relocs=[Reloc(1, "R_X86_64_PLT32", "g", -4)],
    )
    tgt = Target(
        name="prog",
        kind="executable",
        build_id="0123abcd",
        changed_functions=["f"],
        new_functions=[],
        new_data=[],
        sections=[pre, code],
        symbols={"g": SymbolInfo("g", "g", "global", "func", True, "a.c")},
        units=["a.c"],
    )
    return Manifest(
        id="corpus01", description="seed", compiler="GCC: 12", patch_sha256="0", targets=[tgt]
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "valid.update").write_bytes(encode_update(manifest(), "--- a/a.c\n+++ b/a.c\n"))
    with tempfile.TemporaryDirectory() as d:
        key = Path(d) / "k"
        key.write_bytes(generate_key().private_pem)
        write_update(OUT / "signed.update", manifest(), "p", signing_key=key)
    valid = (OUT / "valid.update").read_bytes()
    (OUT / "truncated.update").write_bytes(valid[: len(valid) // 2])


if __name__ == "__main__":
    main()
