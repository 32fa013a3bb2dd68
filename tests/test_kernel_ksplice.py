"""Ksplice's own mechanism for functions livepatch cannot reach (livesplice.kernel.ksplice).

* Without the lab: which replaced functions take the Ksplice path, and the ones the jump
  cannot replace safely (a module, too short, a branch into the first 5 bytes) refused.
* In the lab (skips with the reason when it cannot run; LIVESPLICE_KERNEL_TESTS=1 makes that
  a failure), one boot with 2 CPUs:

  - the real lib/rhashtable.c fix (CVE-2026-64563, corpus/kernel-public.csv: 6.1.176-1 ->
    6.1.187-1): lib/ has no ftrace entries, so create sends rhashtable_walk_start_check
    through the Ksplice path; apply writes `jmp` into the module at its entry (read back
    through /proc/kcore), /proc/net/netlink (which walks with rhashtable_walk_start) runs
    through it, rmmod is refused while the jump is there, undo restores the bytes;
  - busy: a thread sleeps inside copy_page_from_iter (lib/iov_iter.c: a pipe write from a
    userfaultfd page nobody fills); an update of that function is refused after the retries
    with CODE_BUSY naming the thread and the function, the kernel untouched (no module, old
    bytes, pipes work); once the thread is gone the same update applies, pipes run through
    the new code, undo.

Cost (cache ready, 2 cores): two creates (~30-60 s each) + one boot (~40 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livesplice.errors import ExitCode
from livesplice.kernel.ksplice import JMP_LEN, glue_tables, module_params, refusals
from livesplice.update.format import Reloc, Section, Target

CASES = Path(__file__).parent / "kernel"
CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "kernel-public.csv"
RHT_CVE = "CVE-2026-64563"


def _section(
    role: str,
    code: bytes,
    key: str = "lib/x.c:.text.f",
    fentry: bool = False,
    replaces: str | None = None,
) -> Section:
    call = Reloc(offset=1, type="R_X86_64_PLT32", symbol="__fentry__", addend=-4)
    relocs = [call] if fentry else []
    s = Section(
        key=key if role == "pre" else key + "#post",
        role=role,
        name="f",  # type: ignore[arg-type]
        unit="lib/x.c",
        align=16,
        size=len(code),
        data=code.hex(),
        relocs=relocs,
        executable=True,
    )
    if replaces is not None:
        s.replaces = replaces
    return s


def _target(pre: bytes, kind: str = "kernel", fentry: bool = False) -> Target:
    post = bytes.fromhex("31c0c3")  # xor eax,eax; ret
    return Target(
        name="vmlinux" if kind == "kernel" else "mod",
        kind=kind,  # type: ignore[arg-type]
        build_id="",
        changed_functions=["f"],
        new_functions=[],
        new_data=[],
        sections=[
            _section("pre", pre, fentry=fentry),
            _section("replacement", post, fentry=fentry, replaces="lib/x.c:.text.f"),
        ],
        symbols={},
    )


def _refused(t: Target) -> list[str]:
    from livesplice.kernel.ksplice import select_functions

    return refusals(select_functions([t]), [])


# push rbp; mov rbp,rsp; nop; ... ; ret: nothing branches into the first 5 bytes
PLAIN = bytes.fromhex("554889e5" + "90" * 8 + "5dc3")


def test_no_fentry_takes_the_ksplice_path_and_fentry_does_not() -> None:
    from livesplice.kernel.ksplice import select_functions

    assert [s.name for _t, s, _p in select_functions([_target(PLAIN)])] == ["f"]
    assert select_functions([_target(PLAIN, fentry=True)]) == []
    assert _refused(_target(PLAIN)) == []


def test_refused_where_the_jump_is_not_safe() -> None:
    module = _refused(_target(PLAIN, kind="kernel_module"))
    assert len(module) == 1 and "mod is a module" in module[0], module
    short = _refused(_target(bytes.fromhex("31c0c3")))
    assert len(short) == 1 and "3 bytes" in short[0] and "too short" in short[0], short
    # offset 5: jmp rel8 back to offset 1 (inside the 5 bytes the jump overwrites)
    loop = bytes.fromhex("554889e5" + "90" + "ebfa" + "5dc3")
    inside = _refused(_target(loop))
    assert len(inside) == 1 and "branches to offset 0x1" in inside[0], inside
    assert all("[rule: functions without fentry]" in r for r in [*module, *short, *inside])


def test_module_params_carry_what_matching_read() -> None:
    kernel = {"ksplice": [{"object": "vmlinux", "name": "f"}, {"object": "vmlinux", "name": "g"}]}
    memory = {0xFFFF0010: b"\x55\x48\x89\xe5\x90", 0xFFFF0020: b"\x0f\x1f\x44\x00\x00"}
    params = module_params(
        kernel, {"vmlinux.f": 0xFFFF0010, "vmlinux.g": 0xFFFF0020}, lambda addr, n: memory[addr][:n]
    )
    assert params == ["ksplice_addr=0xffff0010,0xffff0020", "ksplice_head=0x90e5894855,0x441f0f"]
    assert module_params({"ksplice": []}, {}, lambda a, n: b"") == []
    table = "\n".join(
        glue_tables(
            [("vmlinux", "f", "lsp_vmlinux_0", 40)], [("lsp_vmlinux_0", 40), ("lsp_vmlinux_1", 12)]
        )
    )
    assert "lsp_ksplice_n = 1;" in table and '{ "f" }' in table, table
    assert "lsp_code[] = { lsp_vmlinux_0, lsp_vmlinux_1 }" in table and "{ 40, 12 }" in table
    assert table.count("extern char lsp_vmlinux_0[];") == 1, table
    assert JMP_LEN == 5


# ---------------------------------------------------------------------------------------
# in the lab
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def updates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kernel_support import kernel_unavailable, prepared_lab
    from livesplice.eval.kernel_rows import read_kernel_csv
    from livesplice.kernel.corpus import make_patch, source_files
    from livesplice.kernel.debian import LabUnavailable
    from livesplice.kernel.target import create_kernel_update
    from test_kernel_target import signing_key

    lab = prepared_lab()
    out = tmp_path_factory.mktemp("ksplice")
    row = next(r for r in read_kernel_csv(CORPUS) if r.name == RHT_CVE)
    try:
        post = source_files(row.post_version, list(row.files))
    except LabUnavailable as e:
        kernel_unavailable(e.render())
    patches = {"rht": out / "rht.patch", "iov": CASES / "copy_page_from_iter-busy.patch"}
    patches["rht"].write_text(make_patch(lab.ksrc, post, list(row.files)))
    res: dict[str, Path] = {}
    for uid, patch in patches.items():
        manifest, path, _ = create_kernel_update(
            lab.ksrc, patch, update_id=uid, output=out / f"{uid}.update", signing_key=signing_key()
        )
        assert manifest is not None and path is not None
        res[uid] = path
    return res


def test_create_sends_lib_functions_through_the_ksplice_path(updates: dict[str, Path]) -> None:
    from livesplice.kernel.package import read_kernel_members

    for uid, fn in (("rht", "rhashtable_walk_start_check"), ("iov", "copy_page_from_iter")):
        _module, kernel = read_kernel_members(updates[uid])
        assert kernel["funcs"] == [], kernel  # not a klp_func: no ftrace entry to go through
        assert kernel["ksplice"] == [{"object": "vmlinux", "name": fn}], kernel


# the wrapper's environment (kernel/overlay.py), to import livesplice in the guest
ENTRY = (
    "PYTHONHOME=/opt/livesplice PYTHONPATH=/opt/livesplice/site "
    'LD_LIBRARY_PATH=/opt/livesplice/lib $PY -c "import sys; '
    "from livesplice.kernel.kmatch import KernelImage as K; "
    "i = K.open(); a = i.candidates(sys.argv[1], None)[0].addr; "
    "print('entry', sys.argv[1], i.read(a, 5).hex(), hex(a))\" "
)


def test_ksplice_apply_busy_undo_in_the_guest(updates: dict[str, Path]) -> None:
    from kernel_support import prepared_lab
    from livesplice.kernel.guest import Guest
    from livesplice.kernel.initramfs import GuestFile
    from livesplice.kernel.overlay import ensure_overlay
    from test_kernel_target import TRUST, trust_files

    lab = prepared_lab()
    rht, iov = "rhashtable_walk_start_check", "copy_page_from_iter"
    script = "\n".join(
        [
            "PY=$(ls /opt/livesplice/bin/python3* | head -1)",
            TRUST,
            ENTRY + rht,
            "livesplice apply rht.update || exit 10",
            ENTRY + rht,
            "cat /proc/net/netlink > /dev/null && echo netlink-read",
            "livesplice view",
            "rmmod livesplice_rht 2>/dev/null; echo rmmod-while-spliced=$?",
            "livesplice undo rht || exit 11",
            ENTRY + rht,
            "lsmod | grep -c livesplice_rht; echo rht-left",
            # busy: a thread asleep inside copy_page_from_iter
            ENTRY + iov,
            "$PY block.py > blk.out 2>&1 &",
            "BLK=$!",
            "n=0; while ! grep -q blocked blk.out; do sleep 0.1; n=$((n+1)); "
            "[ $n -gt 300 ] && { cat blk.out; exit 12; }; done",
            "cat blk.out",
            "livesplice apply iov.update; echo iov-apply=$?",
            ENTRY + iov,
            "ls /sys/kernel/livepatch | grep -c livesplice; echo livepatches-after-busy",
            "echo pipe-still-works | cat",
            "kill -9 $BLK; wait $BLK 2>/dev/null",
            "livesplice apply iov.update || exit 13",
            ENTRY + iov,
            "echo pipe-through-new-code | cat",
            # undo while a thread sleeps inside the NEW code: refused, the update stays
            "$PY block.py > blk2.out 2>&1 &",
            "BLK=$!",
            "n=0; while ! grep -q blocked blk2.out; do sleep 0.1; n=$((n+1)); "
            "[ $n -gt 300 ] && { cat blk2.out; exit 15; }; done",
            "cat blk2.out",
            "livesplice undo iov; echo iov-undo-busy=$?",
            "livesplice view",
            "kill -9 $BLK; wait $BLK 2>/dev/null",
            "livesplice undo iov || exit 14",
            ENTRY + iov,
            "echo pipe-after-undo | cat",
        ]
    )
    files = [
        GuestFile(updates["rht"], "rht.update"),
        GuestFile(updates["iov"], "iov.update"),
        GuestFile(CASES / "uffd_pipe_block.py", "block.py"),
        *trust_files(),
    ]
    guest = Guest(lab, cpus=2, timeout=300, extra_initrds=[ensure_overlay(lab.dir)])
    r = guest.run(script, files)
    out = r.output
    assert r.status == 0, out
    lines = out.splitlines()
    entries = {
        fn: [ln.split()[2:] for ln in lines if ln.startswith(f"entry {fn} ")] for fn in (rht, iov)
    }
    # rhashtable: original bytes, then jmp rel32 into the module, then the original again
    before, spliced, after = entries[rht]
    assert spliced[0].startswith("e9") and before[0] != spliced[0] and after == before, out
    target = (
        int(spliced[1], 16)
        + 5
        + int.from_bytes(bytes.fromhex(spliced[0][2:]), "little", signed=True)
    )
    assert target >= 0xFFFFFFFFA0000000, (hex(target), out)  # the module area, not vmlinux
    assert "netlink-read" in lines, out
    stops = [float(ln.split()[-2]) for ln in lines if "the machine was stopped for" in ln]
    assert len(stops) == 2 and all(0 < us < 5_000_000 for us in stops), out  # rht, iov
    assert f"vmlinux:{rht}@{before[1][2:]} (jump)" in out, out
    assert "rmmod-while-spliced=1" in lines, out
    assert lines[lines.index("rht-left") - 1] == "0", out
    # busy: refused after the retries, naming the thread and where it is; nothing changed
    blocked = [ln.split()[2] for ln in lines if ln.startswith("blocked ")]
    tid = blocked[0]
    assert f"iov-apply={int(ExitCode.CODE_BUSY)}" in lines, out
    assert "CODE_BUSY" in out and f"pid {tid} (" in out and f"{iov}+0x" in out, out
    assert "retrying" in out, out
    assert lines[lines.index("livepatches-after-busy") - 1] == "0", out
    i_before, i_busy, i_spliced, i_after = entries[iov]
    assert i_busy == i_before and i_after == i_before and i_spliced[0].startswith("e9"), out
    # undo busy: the thread is in the replacement code (the module), named; still applied
    busy_undo = out[out.rindex("blocked ") :]
    assert f"iov-undo-busy={int(ExitCode.CODE_BUSY)}" in lines, out
    assert f"pid {blocked[1]} (" in busy_undo and "[livesplice_iov]" in busy_undo, out
    assert f"vmlinux:{iov}@{i_before[1][2:]} (jump)" in busy_undo, out
    for word in ("pipe-still-works", "pipe-through-new-code", "pipe-after-undo"):
        assert word in lines, out
