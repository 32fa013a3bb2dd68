"""Run-pre matching when several same-named functions all match (kmatch._interchangeable).

A ``static inline`` function gcc emits out of line in several units (Debian's vmlinux has
several ``pfn_swap_entry_to_page``) matches the pre code at every copy. Matching may then pick
any copy only when the copies behave alike: the update does not replace the function, and
every relocation field reaches the same address in all of them. These tests run the real
run_pre_match_kernel on a KernelImage whose "kcore" is a file holding two copies
(no lab needed; milliseconds).

And the other half of a fix to code with patch sites: create ships the NEW code's
``.parainstructions``/``.altinstructions`` entries, the replacements and the static_cpu_has()
fragments in the module (kdiff), refusing relocations livepatch would write after the module
loader patched a site. On tests/kernel/pvcopy built twice with kbuild against the lab tree
(skips with the reason without it; LIVESPLICE_KERNEL_TESTS=1: a failure); ~8 s.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from livesplice.errors import NoMatch
from livesplice.kernel.kmatch import KernelImage, KSym, run_pre_match_kernel
from livesplice.update.format import Reloc, Section, Target

KEY = "mm/x.c:.text.g"
DATA = "mm/x.c:.data.counter"
# mov rax, [rip+counter]; mov rcx, [rip+counter+8]; ret
CODE = bytes.fromhex("488b0500000000488b0d00000000c3")
RELOCS = [
    Reloc(offset=3, type="R_X86_64_PC32", symbol=DATA, addend=-4),
    Reloc(offset=10, type="R_X86_64_PC32", symbol=DATA, addend=4),
]
VBASE = 0xFFFFFFFF81000000
COPY_A, COPY_B = VBASE + 0x1000, VBASE + 0x2000
T, U = VBASE + 0x8000, VBASE + 0x9000  # counter of one unit, of another


def running(base: int, first: int, second: int) -> bytes:
    """CODE linked at ``base``, its two fields referring to a counter at ``first`` and one
    at ``second`` (R_X86_64_PC32: S + A - P)."""
    code = bytearray(CODE)
    for r, sym in zip(RELOCS, (first, second), strict=True):
        value = sym + r.addend - (base + r.offset)
        code[r.offset : r.offset + 4] = value.to_bytes(4, "little", signed=True)
    return bytes(code)


def image(tmp_path: Path, copies: dict[int, bytes]) -> KernelImage:
    """kallsyms with one ``g`` per copy (in address order), memory from a file."""
    mem = tmp_path / "kcore"
    with mem.open("wb") as f:
        for addr, code in copies.items():
            f.seek(addr - VBASE)
            f.write(code + b"\xcc" * 64)
        f.truncate(0x10000)
    syms = [KSym(a, "t", "g", None) for a in sorted(copies)]
    fd = os.open(mem, os.O_RDONLY)
    return KernelImage(syms, fd, [(VBASE, 0, 0x10000)])


def target(replaced: bool = False) -> Target:
    pre = Section(
        key=KEY,
        role="pre",
        name="g",
        unit="mm/x.c",
        align=16,
        size=len(CODE),
        data=CODE.hex(),
        relocs=list(RELOCS),
        executable=True,
    )
    sections = [pre]
    if replaced:
        post = Section(
            key=KEY + "#post",
            role="replacement",
            name="g",
            unit="mm/x.c",
            align=16,
            size=1,
            data="c3",
            executable=True,
            replaces=KEY,
        )
        sections.append(post)
    return Target(
        name="vmlinux",
        kind="kernel",
        build_id="",
        changed_functions=[],
        new_functions=[],
        new_data=[],
        sections=sections,
        symbols={},
    )


# shipped code calls g: a klp symbol whose sympos matching decides
KERNEL = {
    "klp_symbols": [{"object": "vmlinux", "name": "g", "key": KEY, "learn": None, "count": 0}]
}


def match(tmp_path: Path, b_first: int, b_second: int, replaced: bool = False) -> object:
    img = image(
        tmp_path, {COPY_A: running(COPY_A, T, T), COPY_B: running(COPY_B, b_first, b_second)}
    )
    try:
        return run_pre_match_kernel(img, [target(replaced)], KERNEL)
    finally:
        os.close(img.fd)


def test_copies_reaching_the_same_data_are_one_function(tmp_path: Path) -> None:
    m = match(tmp_path, T, T)
    assert m.functions == {"vmlinux.g": COPY_A}  # type: ignore[attr-defined]
    assert m.klp_sympos == {"vmlinux.g": 1}  # type: ignore[attr-defined]  # the first copy
    assert m.learned[DATA] == T  # type: ignore[attr-defined]


def test_copies_reading_their_own_data_stay_ambiguous(tmp_path: Path) -> None:
    with pytest.raises(NoMatch) as e:
        match(tmp_path, U, U)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]


def test_every_field_is_compared_not_one_address_per_symbol(tmp_path: Path) -> None:
    """The second copy's first field reaches another unit's counter, its last one the same
    address as the first copy's: the learned map (one address per symbol, the last
    reference's) is equal for both copies; the field-by-field trail is not."""
    with pytest.raises(NoMatch) as e:
        match(tmp_path, U, T)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]


def test_a_replaced_function_is_never_one_of_interchangeable_copies(tmp_path: Path) -> None:
    """Which copy livepatch redirects matters: identical copies of a function the update
    replaces stay an error."""
    with pytest.raises(NoMatch) as e:
        match(tmp_path, T, T, replaced=True)
    assert e.value.details == ["vmlinux: g: 2 candidates match (ambiguous)"]


# ---------------------------------------------------------------------------------------
# create: the new code's sites travel in the module (kdiff), on a real kbuild object
# ---------------------------------------------------------------------------------------


Shipped = Callable[[set[str]], tuple[list[Section], list[str]]]


@pytest.fixture(scope="module")
def ship(tmp_path_factory: pytest.TempPathFactory) -> Shipped:
    """tests/kernel/pvcopy built as pre and post (-DLSP_POST) once; the function diffs them
    as create does with the given exports: (the replacement + the module sections create
    adds for the unit, refusals)."""
    from kernel_support import prepared_lab
    from livesplice.kernel.lab import build_module

    lab = prepared_lab()
    objs = {}
    for variant, flags in (("pre", ""), ("post", "-DLSP_POST")):
        d = tmp_path_factory.mktemp(variant)
        for f in (Path(__file__).parent / "kernel" / "pvcopy").iterdir():
            shutil.copy(f, d / f.name)
        if flags:
            (d / "Kbuild").write_text((d / "Kbuild").read_text() + f"ccflags-y += {flags}\n")
        build_module(lab, d)
        objs[variant] = d / "pvcopy.o"

    def run(exports: set[str]) -> tuple[list[Section], list[str]]:
        from livesplice.diff.elfmodel import load_object
        from livesplice.diff.engine import DiffJob, diff_many
        from livesplice.kernel.kdiff import (
            attach_patch_sites,
            copy_special_entries,
            kernel_ignored,
            ship_aux_fragments,
        )

        ignored = tuple(sorted({*kernel_ignored(objs["pre"]), *kernel_ignored(objs["post"])}))
        (ud,) = diff_many([DiffJob(objs["pre"], objs["post"], "pvcopy.c", ignored)])
        assert not ud.refusals, ud.refusals
        pre, post = load_object(objs["pre"], "pvcopy.c"), load_object(objs["post"], "pvcopy.c")
        attach_patch_sites(ud, pre)
        aux, problems = ship_aux_fragments(ud, pre, post, "pvcopy")
        tables, more = copy_special_entries(ud, pre, post, "pvcopy", exports, aux)
        assert not any(
            s.role == "pre" and s.key == "pvcopy.c:.altinstr_aux" for s in ud.sections
        )  # nothing shipped reaches the old fragments
        (code,) = (s for s in ud.sections if s.role == "replacement")
        return [code, *aux, *tables], problems + more

    return run


EXPORTED = {"pv_ops", "boot_cpu_data", "lsp_fast", "lsp_slow"}


def test_new_code_sites_and_replacements_travel_in_the_module(ship: Shipped) -> None:
    secs, problems = ship(EXPORTED)
    assert problems == []
    code = secs[0]
    assert code.name == "lsp_flags"
    by_name: dict[str, list[Section]] = {}
    for s in secs[1:]:
        by_name.setdefault(s.name, []).append(s)
    # one entry per pv call of local_irq_save/restore, each naming its site in the new code
    para = by_name[".parainstructions"]
    pv_fields = [r.offset for r in code.relocs if r.symbol == "pv_ops"]
    assert sorted(s.relocs[0].addend for s in para) == [o - 2 for o in pv_fields]
    assert all(s.relocs[0].symbol == code.key and s.size == 16 for s in para)
    # every alternative with a replacement carries it; the new call's replacement is
    # `call lsp_fast`, its field a relocation of the copy
    alts = by_name[".altinstructions"]
    repl = {s.key: s for s in by_name[".altinstr_replacement"]}
    for a in alts:
        assert a.relocs[0].symbol == code.key and a.size == 12
        for r in a.relocs[1:]:
            assert r.offset == 4 and r.symbol in repl
            # its own bytes, as long as the entry says (static_cpu_has's empty replacement
            # sits at the same offset as the call's: one section for both was a bug)
            assert repl[r.symbol].size == a.bytes[11]
    calls = [s for s in repl.values() if s.bytes[:1] == b"\xe8"]
    assert [[r.symbol for r in c.relocs] for c in calls] == [["lsp_fast"]]


def test_static_cpu_has_jumps_into_its_own_fragment(ship: Shipped) -> None:
    """The ``jmp 6f`` of static_cpu_has() leads to a copy of its .altinstr_aux fragment
    (testb ... boot_cpu_data; jnz t_yes; jmp t_no), whose jumps come back into the new code."""
    secs, _ = ship(EXPORTED)
    code = secs[0]
    (frag,) = (s for s in secs if s.name == ".altinstr_aux")
    (jmp,) = (r for r in code.relocs if r.symbol == frag.key)
    assert code.bytes[jmp.offset - 1] == 0xE9 and jmp.addend == -4  # lands on its start
    assert frag.executable
    assert [r.symbol for r in frag.relocs] == ["boot_cpu_data", code.key, code.key]
    assert frag.bytes[-5:-4] == b"\xe9"  # up to its closing jmp, nothing of other fragments


def test_klp_relocations_in_sites_or_replacements_are_refused(ship: Shipped) -> None:
    """lsp_slow (the site's original call) and lsp_fast (its replacement's) are not
    exported: livepatch would write their fields after the loader patched the site."""
    _, problems = ship({"pv_ops", "boot_cpu_data"})
    assert len(problems) == 2, problems
    assert "replacement refers to lsp_fast, which livepatch resolves only after" in problems[0]
    assert "site at +0x" in problems[1] and "refers to lsp_slow" in problems[1]
    assert all(p.endswith("[rule: special sections]") for p in problems)
