"""The guest half of one kernel corpus row: the shell script it runs, and reading its output.

One boot per row (a crash or a warning is then that row's alone, and a boot costs ~2 s of
the row's ~1 min). The script, in this order:

1. ``dmesg -c``: what the boot printed is not the update's doing.
2. (b) only when the update patches a module: apply with the module NOT loaded, load it
   (livepatch patches it as it loads: ``/sys/kernel/livepatch/<patch>/<module>/patched``),
   run the check, undo. The module stays loaded, which is what (a) needs.
3. (a) load the modules (the update's and the row's ``modules``), run the check
   (``before``), apply, run the check (``after``), undo, run the check (``after-undo``).

Everything the host needs is printed between markers (``@@KEVAL begin NAME@@`` ...
``@@KEVAL end NAME RC@@``, ``@@KEVAL value NAME VALUE@@``, ``@@KEVAL phase NAME@@``) and
judged on the host (:func:`read_guest_output`), so the judgement is testable on canned
output. After each phase the script prints ``dmesg -c``; a line matching :data:`UNSAFE`
in a phase where livesplice's code or the fixed code ran makes the row **unsafe**. The
checks' ``before`` and ``after-undo`` runs exercise the vulnerable code, which may warn by
itself: their dmesg is printed but not counted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

# The kernel's reports of its own trouble (lib/bug.c, arch/x86/kernel/dumpstack.c,
# arch/x86/kernel/traps.c) and livepatch's failures (kernel/livepatch/core.c, transition.c).
UNSAFE = re.compile(
    r"BUG:|WARNING:|Oops|general protection|kernel BUG at|livepatch: .* failed|"
    r"Unable to handle kernel"
)
# phases whose dmesg counts: livesplice acted, or the fixed code ran
COUNTED_PHASES = ("b-apply", "b-loaded", "b-undo", "apply", "after", "undo")
CHECK_TIMEOUT = 120  # seconds for one run of a check script in the guest

_MARK = re.compile(r"^@@KEVAL (begin|end|value|phase) (\S+)(?: (.*))?@@$")
_STATE = re.compile(r"^STATE:\s*(fixed|vulnerable)\s*$")


def guest_script(
    *,
    update: str,
    update_id: str,
    patch_module: str,
    patched_modules: Sequence[str],
    extra_modules: Sequence[str],
    check: str | None,
    sysfs: str = "/sys",
) -> str:
    """The row's shell script (busybox sh), run in /payload as root.

    :param update: the update file's path in the guest.
    :param patch_module: the livepatch's name (its /sys/kernel/livepatch directory).
    :param patched_modules: modules the update patches: phase (b) when not empty.
    :param check: the check script's path in the guest (its directory is the cwd), or None.
    :param sysfs: where sysfs is (tests run the script on the host with a directory of their own).
    """
    q = shlex.quote
    mods = " ".join(q(m) for m in [*patched_modules, *extra_modules])
    lines = [
        "PY=$(ls /opt/livesplice/bin/python3* | head -1); export PY",
        'mark() { echo "@@KEVAL $*@@"; }',
        # step NAME CMD...: stdout+stderr in a block, its status on the end marker
        'step() { n=$1; shift; mark begin $n; "$@" > /tmp/step.out 2>&1; rc=$?; '
        "cat /tmp/step.out; mark end $n $rc; return $rc; }",
        "kmsg() { mark begin dmesg.$1; dmesg -c; mark end dmesg.$1 0; }",
    ]
    if check:
        d, _, f = check.rpartition("/")
        lines.append(
            f"check() {{ mark phase $1; (cd {q(d or '.')} && "
            f"step check.$1 timeout {CHECK_TIMEOUT} sh ./{q(f)}); kmsg $1; }}"
        )
    else:
        lines.append("check() { mark phase $1; kmsg $1; }")
    apply = f"step apply.$1 livesplice apply --json {q(update)}"
    undo = f"step undo.$1 livesplice undo {q(update_id)}"
    lines += [
        f"stop={sysfs}/module/{patch_module}/parameters/stop_ns",
        f"apply() {{ mark phase $1; {apply}; r=$?; "
        "[ -r $stop ] && mark value stop_ns.$1 $(cat $stop); kmsg $1; return $r; }",
        f"undo() {{ mark phase $1; {undo}; r=$?; kmsg $1; return $r; }}",
        "dmesg -c > /dev/null",
    ]
    if patched_modules:
        lines += [
            "if apply b-apply; then",
            *[
                f"  modprobe {q(m)}; mark value patched.{m} "
                f"$(cat {sysfs}/kernel/livepatch/{patch_module}/{m.replace('-', '_')}/patched "
                "2>/dev/null || echo missing)"
                for m in patched_modules
            ],
            *[f"  modprobe {q(m)}" for m in extra_modules],
            "  check b-loaded",
            "  undo b-undo || { mark value alive 1; exit 0; }",
            "fi",
        ]
    if mods:
        lines.append(f"for m in {mods}; do modprobe $m || mark value modprobe-failed $m; done")
    lines += [
        "check before",
        "if apply apply; then",
        "  check after",
        "  undo undo && check after-undo",
        "fi",
        "mark value alive 1",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class GuestRun:
    """The guest's output of one row, cut at the markers."""

    blocks: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # name -> text, rc
    values: dict[str, str] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)  # in the order they began
    stray: list[str] = field(default_factory=list)  # lines outside any block

    def text(self, name: str) -> str:
        """The text of the guest's block ``name`` ("" when the guest never reached it)."""
        return self.blocks.get(name, ("", None))[0]

    def status(self, name: str) -> int | None:
        """The exit status the guest recorded for block ``name`` (None: it never finished)."""
        return self.blocks.get(name, ("", None))[1]

    @property
    def alive(self) -> bool:
        """The script reached its end: the guest still ran commands after undo."""
        return self.values.get("alive") == "1"


def read_guest_output(output: str) -> GuestRun:
    """Cut the guest's output into blocks, values and phases (a truncated last block, from a
    crashed guest, is kept with status None)."""
    run = GuestRun()
    current: str | None = None
    buf: list[str] = []
    for line in output.splitlines():
        m = _MARK.match(line)
        if m is None:
            (buf if current is not None else run.stray).append(line)
            continue
        kind, name, rest = m.group(1), m.group(2), (m.group(3) or "").strip()
        if kind == "begin":
            current, buf = name, []
        elif kind == "end" and name == current:
            rc = int(rest) if rest.lstrip("-").isdigit() else None
            run.blocks[name] = ("\n".join(buf), rc)
            current = None
        elif kind == "value":
            run.values[name] = rest
        elif kind == "phase":
            run.phases.append(name)
    if current is not None:
        run.blocks[current] = ("\n".join(buf), None)
    return run


def check_state(text: str) -> str | None:
    """The last ``STATE: fixed|vulnerable`` line a check printed."""
    states = [m.group(1) for m in map(_STATE.match, text.splitlines()) if m]
    return states[-1] if states else None


_STAMP = re.compile(r"^\[\s*[\d.]+\]\s*|\b(?:CPU|PID): \d+ ")


def trouble_site(line: str) -> str:
    """A kernel trouble line without what changes from boot to boot (the timestamp, the CPU
    and the PID): ``WARNING: at crypto/testmgr.c:5907 alg_test.cold+0x7c/0xf5``."""
    return " ".join(_STAMP.sub("", line.strip()).split())


def unsafe_lines(run: GuestRun, baseline: frozenset[str] = frozenset()) -> list[str]:
    """Kernel trouble printed while livesplice acted or the fixed code ran, phase-tagged.

    ``baseline``: :func:`trouble_site` of lines the same kernel printed when the same
    modules were loaded with no update at all (:func:`baseline_script`) -- the kernel's own,
    not counted (seen: Debian 6.1.187-1 amd64's ecdh-nist-p256 self-test WARNING whenever
    ``bluetooth`` loads under QEMU's qemu64 CPU)."""
    out = []
    for phase in COUNTED_PHASES:
        for line in run.text(f"dmesg.{phase}").splitlines():
            if UNSAFE.search(line) and trouble_site(line) not in baseline:
                out.append(f"{phase}: {line.strip()}")
    return out


def baseline_script(modules: Sequence[str]) -> str:
    """A boot of the same kernel loading ``modules`` with no update: its dmesg, in one block."""
    q = shlex.quote
    return (
        "dmesg -c > /dev/null\n"
        f"for m in {' '.join(q(m) for m in modules)}; do modprobe $m; done\n"
        'echo "@@KEVAL begin dmesg.baseline@@"; dmesg -c; echo "@@KEVAL end dmesg.baseline 0@@"\n'
    )


def baseline_sites(output: str) -> frozenset[str]:
    """The trouble sites a :func:`baseline_script` boot printed."""
    text = read_guest_output(output).text("dmesg.baseline")
    return frozenset(trouble_site(x) for x in text.splitlines() if UNSAFE.search(x))
