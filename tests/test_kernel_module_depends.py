"""apply loads what the livepatch module depends on before insmod (modpost's ``depends=``).

The btrfs fix (CVE-2026-64567) calls ``crc32c``, exported by libcrc32c: applied while btrfs
(and so libcrc32c) was not loaded, insmod failed with "Unknown symbol crc32c". Real gcc
objects with a ``.modinfo`` section as modpost writes it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from livesplice.kernel.target import module_depends

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _ko(tmp: Path, modinfo: list[str]) -> bytes:
    items = "".join(
        f'static const char m{i}[] __attribute__((section(".modinfo"), used, aligned(1))) '
        f"= {text!r};\n".replace("'", '"')
        for i, text in enumerate(modinfo)
    )
    (tmp / "m.c").write_text(items + "int f(void) { return 0; }\n")
    subprocess.run(["gcc", "-c", "m.c", "-o", "m.o"], cwd=tmp, check=True)
    return (tmp / "m.o").read_bytes()


def test_depends_are_read_from_modinfo(tmp_path: Path) -> None:
    ko = _ko(tmp_path, ["license=GPL", "depends=libcrc32c,xor", "livepatch=Y"])
    assert module_depends(ko) == ["libcrc32c", "xor"]


def test_no_depends(tmp_path: Path) -> None:
    assert module_depends(_ko(tmp_path, ["license=GPL", "depends="])) == []
    assert module_depends(_ko(tmp_path, ["license=GPL"])) == []
