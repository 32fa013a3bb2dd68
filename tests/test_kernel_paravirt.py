"""Run-pre matching of code the kernel rewrote at boot (paravirt and alternative sites), on
real objects: tests/kernel/pvsites/pvsites.c built with kbuild against the lab tree (the
kernel's own PVOP macros, gcc-12 as Debian's build).

The running code each test matches against is written here by hand from what a native boot
of Debian's 6.1 kernel does (arch/x86/kernel/alternative.c apply_paravirt, then
apply_alternatives with X86_FEATURE_XENPV absent): the sites are found independently, from
the ``call *pv_ops+N(%rip)`` relocations, not from the tables the code under test reads.

Skips with the reason when the lab cannot run (LIVESPLICE_KERNEL_TESTS=1: a failure).
Cost: one module build (~5 s).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernel_support import prepared_lab
from livesplice.diff.elfmodel import ElfObject, load_object
from livesplice.kernel.kmatch import _Mismatch, compare_code
from livesplice.kernel.patchsites import BootFacts, add_nops, read_sites
from livesplice.update.format import Manifest, PatchSite, Reloc, Section, Target

SOURCE = Path(__file__).parent / "kernel" / "pvsites"
BASE = 0xFFFFFFFF81200000
SLOT_FN = 0xFFFFFFFF81054320  # what the test's pv_ops slots hold
PARAVIRT_NOP = 0xFFFFFFFF81001000


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> ElfObject:
    from livesplice.kernel.lab import build_module

    lab = prepared_lab()
    moddir = tmp_path_factory.mktemp("pvsites")
    for f in SOURCE.iterdir():
        shutil.copy(f, moddir / f.name)
    build_module(lab, moddir)
    return load_object(moddir / "pvsites.o", "pvsites.c")


def pre_section(obj: ElfObject, name: str) -> Section:
    """The pre section create would ship for function ``name``, with its sites."""
    sec = obj.section(f".text.{name}")
    assert sec is not None
    relocs = []
    for r in sec.relocs:
        sym = r.symbol
        if sym.section is None or sym.bind != "local":
            relocs.append(Reloc(r.offset, r.type, sym.name, r.addend))
        else:
            relocs.append(Reloc(r.offset, r.type, f"pvsites.c:{sym.section.name}", r.addend))
    return Section(
        key=f"pvsites.c:{sec.name}",
        role="pre",
        name=name,
        unit="pvsites.c",
        align=16,
        size=sec.size,
        data=sec.data.hex(),
        relocs=relocs,
        executable=True,
        sites=read_sites(obj).get(sec.name, []),
    )


def pv_calls(sec: Section) -> list[tuple[int, int]]:
    """(offset, pv_ops slot) of every ``call *pv_ops+8*slot(%rip)`` (ff 15 disp32)."""
    code = sec.bytes
    return [
        (r.offset - 2, (r.addend + 4) // 8)
        for r in sec.relocs
        if r.symbol == "pv_ops" and code[r.offset - 2 : r.offset] == b"\xff\x15"
    ]


def booted(sec: Section, native: dict[int, bytes]) -> bytes:
    """The section as the running kernel shows it: the fentry call a 5-byte nop, the
    return thunk jump ``ret; int3...``, each pv call replaced by ``native[slot]``."""
    code = bytearray(sec.bytes)
    for r in sec.relocs:
        if r.symbol == "__fentry__":
            code[r.offset - 1 : r.offset + 4] = add_nops(5)
        if r.symbol == "__x86_return_thunk":
            code[r.offset - 1 : r.offset + 4] = b"\xc3\xcc\xcc\xcc\xcc"
    for off, slot in pv_calls(sec):
        code[off : off + 6] = native[slot]
    return bytes(code) + b"\xcc" * 64


def call_to(target: int, at: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)


# native forms (XENPV absent: the ALT_NOT(XENPV) replacements of paravirt.h, padded with
# the kernel's nops: 3 bytes 0f 1f 00, 4 bytes 0f 1f 40 00, 5 bytes 0f 1f 44 00 00)
PTE_VAL = bytes.fromhex("4889f80f1f00")  # mov %rdi,%rax
SAVE_FL = bytes.fromhex("9c580f1f4000")  # pushf; pop %rax
CLI = bytes.fromhex("fa0f1f440000")
STI = bytes.fromhex("fb0f1f440000")
NATIVE = {62: PTE_VAL, 30: SAVE_FL, 31: CLI, 32: STI}
FACTS = BootFacts(
    pv_op=lambda slot: SLOT_FN, paravirt_nop=PARAVIRT_NOP, paravirt_bug=0xFFFFFFFF81002000
)


def test_sites_are_read_from_the_tables(obj: ElfObject) -> None:
    sec = pre_section(obj, "lsp_irq_save")
    calls = pv_calls(sec)
    assert [slot for _off, slot in calls] == [30, 31, 32]
    for off, slot in calls:
        kinds = sorted(
            (s.kind, s.pv_type if s.kind == "paravirt" else s.feature)
            for s in sec.sites
            if s.offset == off
        )
        # paravirt slot + ALT_NOT(X86_FEATURE_XENPV) = 0x8000 | (8*32+16)
        assert kinds == [("alternative", 0x8110), ("paravirt", slot)]
    flush = pre_section(obj, "lsp_flush_tlb")
    assert [(s.kind, s.length) for s in flush.sites] == [("paravirt", 6)]


def test_native_forms_match(obj: ElfObject) -> None:
    for name in ("lsp_pte_val", "lsp_irq_save"):
        sec = pre_section(obj, name)
        compare_code(sec, booted(sec, NATIVE), BASE, FACTS)


def test_direct_call_of_the_slot_function(obj: ElfObject) -> None:
    """A pv call outside an alternative becomes ``call <pv_ops slot>`` + a 1-byte nop; a
    slot holding _paravirt_nop becomes 6 bytes of nops; a call elsewhere is refused."""
    sec = pre_section(obj, "lsp_flush_tlb")
    ((off, slot),) = pv_calls(sec)
    assert slot == 35  # mmu.flush_tlb_user
    compare_code(sec, booted(sec, {slot: call_to(SLOT_FN, BASE + off) + b"\x90"}), BASE, FACTS)
    nop_facts = BootFacts(pv_op=lambda s: PARAVIRT_NOP, paravirt_nop=PARAVIRT_NOP)
    compare_code(sec, booted(sec, {slot: add_nops(6)}), BASE, nop_facts)
    elsewhere = booted(sec, {slot: call_to(SLOT_FN + 16, BASE + off) + b"\x90"})
    with pytest.raises(_Mismatch, match=r"paravirt site \(pv_ops slot 35\), 6 bytes: found e8"):
        compare_code(sec, elsewhere, BASE, FACTS)


def test_wrong_instruction_at_a_site_is_refused_naming_the_site(obj: ElfObject) -> None:
    sec = pre_section(obj, "lsp_pte_val")
    wrong = booted(sec, {62: bytes.fromhex("4889f00f1f00")})  # mov %rsi,%rax
    with pytest.raises(_Mismatch) as e:
        compare_code(sec, wrong, BASE, FACTS)
    why = e.value.why
    assert "paravirt site (pv_ops slot 62) + alternative (feature !8*32+16)" in why
    assert "found 4889f00f1f00 (mov rax, rsi" in why
    assert "replacement 4889f8 padded with nops" in why


def test_outside_the_sites_compared_as_before(obj: ElfObject) -> None:
    sec = pre_section(obj, "lsp_irq_save")
    good = bytearray(booted(sec, NATIVE))
    last_site = max(s.offset + s.length for s in sec.sites)
    i = next(k for k in range(last_site, sec.size) if good[k] not in (0xC3, 0xCC))
    good[i] ^= 0x01
    with pytest.raises(_Mismatch) as e:
        compare_code(sec, bytes(good), BASE, FACTS)
    assert "site" not in e.value.why and e.value.offset >= last_site


def test_without_sites_the_native_code_is_a_mismatch(obj: ElfObject) -> None:
    """An update made before sites were shipped (or a section without them) refuses the
    native forms: the issue's report, `expected ff1500000000 ... found 4889f8`."""
    sec = pre_section(obj, "lsp_pte_val")
    running = booted(sec, NATIVE)
    sec.sites = []
    with pytest.raises(_Mismatch, match=r"expected ff1500000000 .*found 4889f8"):
        compare_code(sec, running, BASE, FACTS)


def test_sites_travel_in_the_manifest(obj: ElfObject) -> None:
    from livesplice.update.format import manifest_from_dict

    sec = pre_section(obj, "lsp_irq_save")
    m = Manifest(
        id="pv",
        description="",
        compiler="",
        patch_sha256="",
        targets=[
            Target(
                name="vmlinux",
                kind="kernel",
                build_id="",
                changed_functions=[],
                new_functions=[],
                new_data=[],
                sections=[sec],
                symbols={},
            )
        ],
    )
    raw = json.loads(m.to_json())
    assert manifest_from_dict(raw).targets[0].sections[0].sites == sec.sites
    del raw["targets"][0]["sections"][0]["sites"]  # an update from before: still readable
    assert manifest_from_dict(raw).targets[0].sections[0].sites == []
    raw["targets"][0]["sections"][0]["sites"] = [
        {"kind": "paravirt", "offset": sec.size - 2, "length": 6, "pv_type": 30}
    ]
    with pytest.raises(ValueError, match=r"paravirt site .* outside the section"):
        manifest_from_dict(raw)
    raw["targets"][0]["sections"][0]["sites"] = [
        {"kind": "alternative", "offset": 0, "length": 2, "replacement": "909090"}
    ]
    with pytest.raises(ValueError, match="longer than the site"):
        manifest_from_dict(raw)
    assert PatchSite(kind="paravirt", offset=0, length=6).replacement == ""
