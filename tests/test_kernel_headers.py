"""A changed header reaches every unit that includes it, directly or through other headers.

net/dccp/ccids/lib/loss_interval.h is included by no .c file directly: ccid3.c reaches it
through ccids/ccid3.h -> lib/tfrc.h, loss_interval.c through tfrc.h. Before, only direct
includers were rebuilt, so a header-only change to one of its inline functions compiled
nothing ("changes no C unit"), and the units in ccids/lib/ (named by net/dccp/Makefile, their
own directory has none) were not even candidates. Needs the lab's prepared tree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.kernel import kbuild

FIXTURES = Path(__file__).parent / "kernel"
HEADER = "net/dccp/ccids/lib/loss_interval.h"
USERS = [
    "net/dccp/ccid.c",
    "net/dccp/ccids/ccid3.c",
    "net/dccp/ccids/lib/loss_interval.c",
    "net/dccp/ccids/lib/packet_history.c",
    "net/dccp/ccids/lib/tfrc.c",
    "net/dccp/ccids/lib/tfrc_equation.c",
    "net/dccp/proto.c",
]


@pytest.fixture(scope="module")
def ksrc() -> Path:
    return prepared_lab().ksrc  # type: ignore[no-any-return]


@pytest.mark.kernel
def test_indirect_includers_are_found(ksrc: Path) -> None:
    index = kbuild.include_index(ksrc)
    direct = {f for f in kbuild.direct_includers(index, HEADER) if f.endswith(".c")}
    assert direct == set()  # the point of the fixture: nothing includes it directly
    assert kbuild.header_users(ksrc, HEADER, index) == USERS


@pytest.mark.kernel
def test_cmd_file_names_what_the_compiler_read(ksrc: Path) -> None:
    """modules_prepare compiled scripts/mod/empty.c: its .cmd lists the forced includes."""
    deps = kbuild.cmd_dependencies(ksrc, "scripts/mod/empty.c")
    assert deps is not None and "scripts/mod/empty.c" in deps
    assert "include/linux/kconfig.h" in deps and not any("wildcard" in d for d in deps)
    assert kbuild.unit_depends_on(ksrc, "scripts/mod/empty.c", ["include/linux/kconfig.h"])
    assert not kbuild.unit_depends_on(ksrc, "scripts/mod/empty.c", [HEADER])
    assert kbuild.unit_depends_on(ksrc, "net/dccp/proto.c", [HEADER])  # no .cmd: unknown


@pytest.mark.kernel
@pytest.mark.slow
def test_inline_change_in_indirect_header_rebuilds_its_users(ksrc: Path, tmp_path: Path) -> None:
    patch = FIXTURES / "indirect-header.patch"  # tfrc_lh_is_initialised: > 0 -> > 1
    build = kbuild.build_kernel_pair(ksrc, patch, patch.read_text(), tmp_path, jobs=2)
    changed = sorted(u.source for u in build.units if u.post is not None)
    # the two units calling tfrc_lh_is_initialised; ccid3.c only through two headers
    assert changed == ["net/dccp/ccids/ccid3.c", "net/dccp/ccids/lib/loss_interval.c"]
    assert sorted(u.source for u in build.units) == USERS
