"""StopWindow: the stack scanner on known stacks, then real multi-threaded programs."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))

from ptrace_targets import Target, build, jmp_rel32

from livesplice.errors import CodeBusy, TargetGone
from livesplice.process.ptrace import Tracee
from livesplice.process.stopwindow import (
    BusyRanges,
    StopWindow,
    ThreadsBusy,
    call_return_sites,
    scan_stacks,
)

# ------------------------------------------------------------------ the scanner

# call +1 MB (a function outside every busy range); ret  -> return site at +5
CALL_THEN_RET = bytes.fromhex("e800001000c3")


def ranges_of(
    spec: list[tuple[int, int, str]], code: dict[int, bytes] | None = None, precise: bool = True
) -> BusyRanges:
    code = code or {}
    return BusyRanges.build(spec, lambda a, n: code.get(a), precise)


def stacks(*lists: list[int]) -> tuple[np.ndarray, np.ndarray]:
    words = np.array([w for s in lists for w in s], dtype=np.uint64)
    bounds = np.zeros(len(lists) + 1, dtype=np.uint64)
    bounds[1:] = np.cumsum([len(s) for s in lists])
    return words, bounds


def test_call_return_sites() -> None:
    # call rel32; call *%rax; nop; ret
    code = bytes.fromhex("e800000000ffd090c3")
    assert call_return_sites(code, 0x1000) == {0x1005, 0x1007}
    assert call_return_sites(b"\x0f\xff\xff\xff", 0x1000) is None  # undecodable


def test_scanner_finds_known_hits_at_every_position() -> None:
    r = ranges_of(
        [(0x1000, 0x1006, "f"), (0x2000, 0x2006, "g")],
        {0x1000: CALL_THEN_RET, 0x2000: CALL_THEN_RET},
    )
    assert r.return_sites == {0x1005, 0x2005}
    noise = [0, 7, 0xFFFF_FFFF_FFFF_FFFF, 0x1006, 0x0FFF, 0x2006, 0x1500]
    words, bounds = stacks(
        [0x1005, *noise],  # first word of the first stack
        [*noise, 0x2005],  # last word of a middle stack
        noise,  # nothing
        [],  # an empty (unreadable) stack
        [*noise[:3], 0x1005, *noise[3:]],  # last stack, middle
    )
    assert scan_stacks(words, bounds, r) == {0: 0, 1: 1, 4: 0}


def test_scanner_precise_ignores_pointers_conservative_does_not() -> None:
    code = {0x1000: CALL_THEN_RET}
    spec = [(0x1000, 0x1006, "f")]
    words, bounds = stacks([0x1000, 0x1003], [0x1005])  # fn pointer + mid-insn; return addr
    assert scan_stacks(words, bounds, ranges_of(spec, code)) == {1: 0}
    assert scan_stacks(words, bounds, ranges_of(spec, code, precise=False)) == {0: 0, 1: 0}
    # a return site at the very end (call to a noreturn function as the last instruction)
    r = ranges_of([(0x1000, 0x1005, "f")], {0x1000: bytes.fromhex("e800001000")})
    assert scan_stacks(*stacks([0x1005]), r) == {0: 0}


def test_return_sites_after_calls_to_a_busy_leaf_do_not_count() -> None:
    # f: call g; ret    g (a leaf): nop; ret
    f = bytes.fromhex("e8fb0f0000c3")  # call 0x2000 from 0x1000
    g = bytes.fromhex("90c3")
    r = ranges_of([(0x1000, 0x1006, "f"), (0x2000, 0x2002, "g")], {0x1000: f, 0x2000: g})
    # a stale copy of "return into f after call g" is not a frame: g is a leaf, and a thread
    # inside g is busy by its ip
    assert scan_stacks(*stacks([0x1005]), r) == {}
    # but an ip interrupted inside g (a signal frame) is
    assert scan_stacks(*stacks([0x2001]), r) == {0: 1}
    assert scan_stacks(*stacks([0x2000]), r) == {}  # g's entry: a function pointer
    # g tail-calls elsewhere: not a leaf, the return site counts again
    g_tail = bytes.fromhex("90e9fb6f0000")
    r = ranges_of([(0x1000, 0x1006, "f"), (0x2000, 0x2006, "g")], {0x1000: f, 0x2000: g_tail})
    assert scan_stacks(*stacks([0x1005]), r) == {0: 0}
    # an indirect call is never dropped
    r = ranges_of(
        [(0x1000, 0x1003, "f"), (0x2000, 0x2002, "g")], {0x1000: bytes.fromhex("ffd0c3"), 0x2000: g}
    )
    assert scan_stacks(*stacks([0x1002]), r) == {0: 0}


def test_scanner_agrees_with_brute_force_on_random_stacks() -> None:
    rnd = random.Random(1234)
    spec = []
    code = {}
    for i in range(40):
        start = 0x400000 + i * 0x1000 + rnd.randrange(0, 0x100)
        blob = CALL_THEN_RET * rnd.randrange(1, 20)
        spec.append((start, start + len(blob), f"f{i}"))
        code[start] = blob
    r = ranges_of(spec, code)
    sites = sorted(r.return_sites)
    # instruction boundaries no call returns to (a signal frame's ip): each call after the first
    ips = {a + 6 * k for a, b, _ in spec for k in range(1, (b - a) // 6)}
    for _ in range(50):
        lists = []
        for _ in range(rnd.randrange(1, 30)):
            s = [rnd.randrange(0x3F0000, 0x430000) for _ in range(rnd.randrange(0, 300))]
            if s and rnd.random() < 0.3:
                s[rnd.randrange(len(s))] = rnd.choice(sites)
            if s and rnd.random() < 0.1:
                s[rnd.randrange(len(s))] = rnd.choice(sorted(ips))
            lists.append(s)
        want = {}
        for i, s in enumerate(lists):
            for w in s:
                if w in r.return_sites or w in ips:
                    want[i] = next(k for k, (a, b, _) in enumerate(sorted(spec)) if a <= w <= b)
                    break
        assert scan_stacks(*stacks(*lists), r) == want


# ------------------------------------------------------------------ real processes


@pytest.fixture(scope="module")
def spin_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("ptrace_spin", tmp_path_factory.mktemp("stopwindow_progs"))


@pytest.fixture
def spawn(spin_exe: Path) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(*args: str) -> Target:
        tg = Target(spin_exe, *args)
        started.append(tg)
        return tg

    yield start
    for tg in started:
        tg.stop()


def fn_range(tg: Target, name: str) -> tuple[int, int, str]:
    addr, size = tg.symbol(name)
    return addr, addr + size, name


def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def patch_target_fn(tg: Target, t: Tracee, **kw: object) -> tuple[StopWindow, object]:
    start, end, _ = fn_range(tg, "target_fn")
    other = tg.symbol("other_fn")[0]
    w = StopWindow(t, [(start, end, "target_fn")], **kw)  # type: ignore[arg-type]
    return w, w.run([(start, jmp_rel32(start, other))])


def test_single_thread_patch(spawn: Callable[..., Target]) -> None:
    tg = spawn("0")
    with Tracee(tg.pid) as t:
        _, stats = patch_target_fn(tg, t, retries=20, interval=0.01)
    assert stats.threads == 1 and stats.attempts >= 1 and stats.pause_us > 0  # type: ignore[attr-defined]
    wait_for(lambda: tg.cmd("seen") == "1")


def test_64_threads_spinning_in_and_around_the_function(spawn: Callable[..., Target]) -> None:
    tg = spawn("64")
    tg.wait_threads(65)
    with Tracee(tg.pid) as t:
        _, stats = patch_target_fn(tg, t, retries=50, interval=0.01)
    assert stats.threads == 65  # type: ignore[attr-defined]
    wait_for(lambda: tg.cmd("seen") == "64")  # every worker now calls other_fn; none crashed
    assert tg.alive()


def test_busy_threads_abort_cleanly(spawn: Callable[..., Target]) -> None:
    tg = spawn("2", "stuck", "deep")
    tg.wait_threads(5)
    time.sleep(0.05)
    stuck = fn_range(tg, "stuck_fn")
    deep = fn_range(tg, "deep_fn")
    with Tracee(tg.pid) as t:
        code_before = [t.read(a, b - a) for a, b, _ in (stuck, deep)]
        w = StopWindow(t, [stuck, deep], retries=3, interval=0.05)
        writes = [(stuck[0], b"\xcc" * 5), (deep[0], b"\xcc" * 5)]
        with pytest.raises(CodeBusy) as info:
            w.run(writes, inside=lambda: pytest.fail("inside must not run"))
        assert [t.read(a, b - a) for a, b, _ in (stuck, deep)] == code_before
    err = info.value
    assert isinstance(err, ThreadsBusy)
    names = {
        tid: Path(f"/proc/{tg.pid}/task/{tid}/comm").read_text().strip() for tid in tg.threads()
    }
    got = {(b.name, b.function, b.where) for b in err.busy}
    assert got == {("stuck", "stuck_fn", "ip"), ("deep", "deep_fn", "stack")}
    for b in err.busy:
        assert names[b.tid] == b.name
    text = err.render()
    assert "stuck_fn" in text and "deep_fn" in text and "CODE_BUSY" in text
    assert str(err.busy[0].tid) in text
    # unchanged and still running
    n = int(tg.cmd("calls"))
    wait_for(lambda: int(tg.cmd("calls")) > n)
    assert tg.cmd("seen") == "0"


def test_stale_pointer_on_a_stack_is_not_busy_unless_conservative(
    spawn: Callable[..., Target],
) -> None:
    tg = spawn("1", "holder")
    tg.wait_threads(3)
    time.sleep(0.05)
    answer = fn_range(tg, "answer")
    with Tracee(tg.pid) as t:
        StopWindow(t, [answer], retries=1).run([])  # precise: not busy
        with pytest.raises(ThreadsBusy) as info:
            StopWindow(t, [answer], retries=1, precise=False).run([])
    assert [(b.name, b.where) for b in info.value.busy] == [("holder", "stack")]


def test_signals_during_the_window_are_delivered_after(spawn: Callable[..., Target]) -> None:
    tg = spawn("4")
    tg.wait_threads(5)
    with Tracee(tg.pid) as t:
        start, end, _ = fn_range(tg, "target_fn")
        w = StopWindow(t, [(start, end, "target_fn")], retries=20, interval=0.01)

        def inside() -> None:
            os.kill(tg.pid, signal.SIGUSR1)
            time.sleep(0.05)  # pending now; no thread can take it while all are stopped

        w.run([(start, t.read(start, 5))], inside=inside)
    # (while traced, the thread that takes the signal waits for the tracer to pass it on:
    # detach does; so ask the program only now)
    wait_for(lambda: tg.cmd("usr1") == "1")


def test_target_killed_inside_the_window_is_target_gone(spawn: Callable[..., Target]) -> None:
    tg = spawn("8")
    tg.wait_threads(9)
    start, end, _ = fn_range(tg, "target_fn")
    t = Tracee(tg.pid)
    w = StopWindow(t, [(start, end, "target_fn")], retries=20, interval=0.01)

    def inside() -> None:
        os.kill(tg.pid, signal.SIGKILL)
        time.sleep(0.2)  # the stopped threads wake into their exit

    with pytest.raises(TargetGone):
        w.run([(start, b"\xcc" * 5)], inside=inside)
    t.detach()


def test_code_changed_since_planning_aborts_with_nothing_written(
    spawn: Callable[..., Target],
) -> None:
    """The caller recorded other bytes than the entry holds now (someone else wrote there):
    the window writes nothing and says so."""
    from livesplice.process.stopwindow import CodeChanged

    tg = spawn("0")
    start, end, _ = fn_range(tg, "target_fn")
    other = tg.symbol("other_fn")[0]
    with Tracee(tg.pid) as t:
        before = t.read(start, 5)
        w = StopWindow(t, [(start, end, "target_fn")], retries=3, interval=0.01)
        with pytest.raises(CodeChanged):
            w.run([(start, jmp_rel32(start, other))], expect=[b"\xcc" * 5])
        assert t.read(start, 5) == before
        stats = w.run([(start, jmp_rel32(start, other))], expect=[before])
    assert stats.attempts >= 1
    wait_for(lambda: tg.cmd("seen") == "1")
