"""Ksplice's own mechanism, for replaced functions livepatch cannot reach.

Livepatch redirects a function through its ftrace entry; code built without one (all of
``lib/``, whose Makefile removes the ftrace flags, and ``notrace`` functions) has none.
Ksplice never needed ftrace: it stopped the machine, checked every task's stack against the
old code and wrote a jump over the old entry. livesplice does the same for exactly those
functions, inside the update's livepatch module (``ksplice_module/ksplice.c``; how the
module stops, checks and writes is described there):

create   :func:`select_functions` picks the replaced functions without a ``call __fentry__``
         and refuses those the jump cannot replace safely (:func:`refusals`);
         :func:`split_plan` moves them out of the klp_funcs into the module's Ksplice
         table (:func:`glue_tables`), :func:`copy_module_source` adds ``ksplice.c``.
apply    run-pre matching (the same as livepatch's) gives each old entry's address and
         bytes (:func:`module_params`); the module's pre_patch callback stops the machine
         and writes the jumps; a busy stack refuses the load (-EBUSY) and apply retries
         (:func:`load_retrying`) before naming the task (CODE_BUSY), as the process target
         and Uptrack do.
view     ``/sys/module/<module>/parameters/spliced`` (:func:`spliced`).
undo     writing 0 there (:func:`unsplice`), with the same checks and retries, before the
         livepatch is disabled and unloaded.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.errors import CodeBusy, LivespliceError, UsageError
from livesplice.update.format import Hook, Section, Target

if TYPE_CHECKING:
    from livesplice.kernel.klp import ModulePlan
    from livesplice.kernel.package import KernelJson

JMP_LEN = 5  # jmp rel32 written over the old entry
RETRIES = 3  # attempts when a task is busy in the old code (Uptrack retried twice)
RETRY_DELAY = 1.0  # seconds between attempts: let the busy task leave
SOURCE = Path(__file__).parent / "ksplice_module" / "ksplice.c"
SYSFS_MODULE = Path("/sys/module")
_REFUSED = re.compile(r"livesplice: (apply|undo) refused \((-?\d+)\): (.*)")
Progress = Callable[[str], None]


def _has_fentry(s: Section) -> bool:
    """A ``call __fentry__`` at the entry (offset 1 or 5: after an endbr64)."""
    return any(r.symbol == "__fentry__" and r.offset in (1, 5) for r in s.relocs)


def _pre_of(t: Target, s: Section) -> Section | None:
    return next((p for p in t.sections if p.role == "pre" and p.key == s.replaces), None)


def select_functions(targets: list[Target]) -> list[tuple[Target, Section, Section | None]]:
    """The replaced functions without an ftrace entry, with their pre sections: livepatch
    cannot redirect them. ``.cold`` parts are not functions (only their parent jumps there)."""
    from livesplice.kernel.kdiff import is_cold

    out = []
    for t in targets:
        for s in t.sections:
            if s.role != "replacement" or is_cold(s.name):
                continue
            pre = _pre_of(t, s)
            if not _has_fentry(pre or s):
                out.append((t, s, pre))
    return out


def refusals(chosen: list[tuple[Target, Section, Section | None]], hooks: list[Hook]) -> list[str]:
    """Why the jump cannot safely replace some of ``chosen`` (empty: all can)."""
    out: list[str] = []
    rule = "[rule: functions without fentry]"
    for t, s, pre in chosen:
        where = f"{s.unit}: {s.name}"
        if t.kind != "kernel":
            out.append(
                f"{where}: no ftrace entry {rule}: livepatch cannot redirect it and "
                f"livesplice's Ksplice path switches only vmlinux code ({t.name} is a "
                "module); patch its callers instead"
            )
        elif pre is None:
            out.append(
                f"{where}: no ftrace entry and no pre code {rule}: the jump needs "
                "the old function to exist"
            )
        elif pre.size < JMP_LEN:
            out.append(
                f"{where}: {pre.size} bytes {rule}: too short for a {JMP_LEN}-byte "
                "jump over its entry"
            )
        else:
            inside = _branches_into_entry(pre)
            if inside:
                out.append(
                    f"{where}: the old code branches to offset {inside:#x} {rule}: "
                    f"the {JMP_LEN}-byte jump over the entry would be entered in its "
                    "middle"
                )
    if chosen and hooks:
        out.append(
            f"{chosen[0][1].unit}: {chosen[0][1].name}: hooks beside a function "
            f"without fentry {rule}: the Ksplice path does not run LIVESPLICE_* hooks "
            "yet; make the update without hooks"
        )
    return out


def _branches_into_entry(pre: Section) -> int:
    """The first offset in 1..4 that a direct branch of the old function targets (0: none):
    the 5-byte jump would overwrite the instruction it lands on. Branches are told by the
    shared x86-64 rules (livesplice.arch.x86_64), as both matchers tell them."""
    from livesplice.arch.x86_64 import decode

    for insn in decode(pre.bytes, 0):
        target = insn.branch_target
        if target is not None and 0 < target < JMP_LEN:
            return target
    return 0


def split_plan(plan: ModulePlan, chosen: list[tuple[Target, Section, Section | None]]) -> None:
    """Move ``chosen`` from the plan's klp_funcs to its Ksplice table (same labels)."""
    from livesplice.kernel.klp import object_of

    sizes = {(object_of(t), s.name): s.size for t, s, _ in chosen}
    keep = []
    for obj, name, label in plan.funcs:
        if (obj, name) in sizes:
            plan.ksplice.append((obj, name, label, sizes[(obj, name)]))
        else:
            keep.append((obj, name, label))
    plan.funcs = keep


def glue_tables(entries: list[tuple[str, str, str, int]], code: list[tuple[str, int]]) -> list[str]:
    """The C tables ``ksplice.c`` reads: the switched functions in ``ksplice_addr=``
    order, and every piece of shipped code (label, size) -- undo must find no task in any
    of it, ``.cold`` parts and new functions (reached by a tail call) included, because
    rmmod frees it all."""
    labels = dict.fromkeys([*(label for _o, _n, label, _s in entries), *(c for c, _ in code)])
    out = [f"extern char {label}[];" for label in labels]
    out += [
        "int lsp_ksplice_apply(struct klp_object *obj);",
        f"const int lsp_ksplice_n = {len(entries)};",
        "char *const lsp_ksplice_new[] = { "
        + ", ".join(label for _o, _n, label, _s in entries)
        + " };",
        "const char *const lsp_ksplice_name[] = { "
        + ", ".join(f'"{name}"' for _o, name, _l, _s in entries)
        + " };",
        f"const int lsp_code_n = {len(code)};",
        "char *const lsp_code[] = { " + ", ".join(c for c, _ in code) + " };",
        "const unsigned long lsp_code_size[] = { " + ", ".join(str(n) for _, n in code) + " };",
        "",
    ]
    return out


def copy_module_source(moddir: Path) -> str:
    """Place ``ksplice.c`` beside the generated sources; its object's name for Kbuild."""
    shutil.copyfile(SOURCE, moddir / SOURCE.name)
    return "ksplice.o"


# ---------------------------------------------------------------------------------------
# apply / view / undo on the running kernel
# ---------------------------------------------------------------------------------------


def module_params(
    kernel: KernelJson, functions: dict[str, int], read: Callable[[int, int], bytes]
) -> list[str]:
    """``ksplice_addr=``/``ksplice_head=`` from run-pre matching: where each old function
    is and the bytes the jump will replace, as matching read them. The module writes only
    if it finds those bytes there inside the stop."""
    entries = kernel.get("ksplice", [])
    if not entries:
        return []
    addrs, heads = [], []
    for e in entries:
        addr = functions.get(f"{e['object']}.{e['name']}")
        if addr is None:
            raise UsageError(
                f"run-pre matching did not find {e['name']}",
                advice="the update does not fit the running kernel",
            )
        addrs.append(f"{addr:#x}")
        heads.append(f"{int.from_bytes(read(addr, JMP_LEN), 'little'):#x}")
    return [f"ksplice_addr={','.join(addrs)}", f"ksplice_head={','.join(heads)}"]


def _refusals_in_log() -> list[tuple[str, int, str]]:
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [(m[1], int(m[2]), m[3]) for m in _REFUSED.finditer(log)]


def _retry_while_busy(
    attempt: Callable[[], str | None],
    progress: Progress,
    retries: int,
    delay: float,
    what: str,
    advice: str,
) -> None:
    """Run ``attempt`` (None: done; a string: why it was busy) up to ``retries`` times,
    ``delay`` seconds apart, then raise CODE_BUSY with the last reason: a busy task usually
    leaves the code soon (Ksplice and Uptrack retried the same way)."""
    reason = ""
    for n in range(1, retries + 1):
        busy = attempt()
        if busy is None:
            return
        reason = busy
        if n < retries:
            progress(f"busy: {reason}; retrying in {delay:.0f} s ({n}/{retries})")
            time.sleep(delay)
    raise CodeBusy(f"{what} through {retries} attempts", [reason], advice)


def load_retrying(
    load: Callable[[], None], progress: Progress, retries: int = RETRIES, delay: float = RETRY_DELAY
) -> None:
    """Load the module; while its stop finds a task in the old code (-EBUSY), wait and
    retry, then raise CODE_BUSY naming the task (the module has unloaded itself: the
    kernel is untouched)."""

    def attempt() -> str | None:
        before = len(_refusals_in_log())
        try:
            load()
            return None
        except LivespliceError as e:
            new = _refusals_in_log()[before:]
            if not new or new[-1][1] != -errno.EBUSY:
                if new:
                    e.details = [*e.details, f"Ksplice path: {new[-1][2]}"]
                raise
            return new[-1][2]

    _retry_while_busy(
        attempt,
        progress,
        retries,
        delay,
        "a task stayed inside code being replaced",
        "the task sleeps in a function the update replaces; retry when it is "
        "idle (the kernel was not changed)",
    )


def stop_microseconds(module: str) -> float | None:
    """How long the module's last stop_machine lasted (µs), as it measured it."""
    try:
        return int((SYSFS_MODULE / module / "parameters" / "stop_ns").read_text()) / 1000
    except (OSError, ValueError):
        return None


def spliced(module: str) -> list[str]:
    """``name@address`` of each function the module has switched (empty: none, or not a
    module with a Ksplice part)."""
    try:
        text = (SYSFS_MODULE / module / "parameters" / "spliced").read_text()
    except OSError:
        return []
    return text.split()


def _write_spliced(module: str, value: str, progress: Progress, retries: int, delay: float) -> None:
    param = SYSFS_MODULE / module / "parameters" / "spliced"

    def attempt() -> str | None:
        try:
            param.write_text(value)
            return None
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise UsageError(f"writing {value} to {param} failed: {e.strerror}") from None
        try:
            return (SYSFS_MODULE / module / "parameters" / "busy").read_text().strip()
        except OSError:
            return "a task is inside the code"

    _retry_while_busy(
        attempt,
        progress,
        retries,
        delay,
        "a task stayed inside the replaced or replacement code",
        "the task sleeps in a function the update replaces; retry when it is "
        "idle (the update stays applied)",
    )


def unsplice(
    module: str, progress: Progress, retries: int = RETRIES, delay: float = RETRY_DELAY
) -> None:
    """Restore the old entries (undo), or raise CODE_BUSY with the update still applied."""
    _write_spliced(module, "0", progress, retries, delay)


def resplice(module: str, progress: Progress) -> None:
    """Write the jumps again: undo's way back when the livepatch part cannot be disabled."""
    _write_spliced(module, "1", progress, RETRIES, RETRY_DELAY)
