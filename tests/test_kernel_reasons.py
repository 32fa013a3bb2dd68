"""Refusals name what changed (issue 12 item 5), on a real kernel unit built in the lab tree.

gcc puts every ``__init`` function of a unit into one ``.init.text`` section: fs/proc/kcore.c
has register_mem_pfn_is_ram, kclist_add and proc_kcore_init there. Changing only the first
used to be reported under the section's first symbol (kclist_add), plus two refusals about
kclist_add's CPU-feature alternatives, which the patch does not touch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.errors import PatchRefused

CASES = Path(__file__).parent / "kernel"


@pytest.mark.kernel
@pytest.mark.slow
def test_changed_init_function_is_named(tmp_path: Path) -> None:
    from livesplice.kernel.target import create_kernel_update

    lab = prepared_lab()
    with pytest.raises(PatchRefused) as e:
        create_kernel_update(
            lab.ksrc,
            CASES / "kcore-one-init-FAIL.patch",
            update_id="x",
            output=tmp_path / "x.update",
        )
    assert e.value.details == [
        "fs/proc/kcore.c: register_mem_pfn_is_ram: __init/__exit code changed [rule: __init "
        "code]: init code has run and been freed; the change cannot take effect live"
    ]
    assert not (tmp_path / "x.update").exists()
