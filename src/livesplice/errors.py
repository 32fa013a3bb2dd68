"""One exception hierarchy for every failure a user can meet.

Inside the engine, failures are typed (like Ksplice's ``abort_t``: NO_MATCH, CODE_BUSY, ...).
Only the CLI turns them into a paragraph a person can act on and into a documented exit code.
Every error carries:

* ``reason`` -- one short line: what went wrong;
* ``details`` -- the evidence (a list of lines: symbols, offsets, compiler output, threads);
* ``advice`` -- what the user or the patch author can do next.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of the ``livesplice`` command.

    Each has its meaning in :data:`EXIT_MEANINGS`, from which scripts/gen_docs.py writes the
    tables in README.md and docs/ARCHITECTURE.md (tests/test_docs.py checks they agree).
    """

    OK = 0
    FAILED = 1
    USAGE = 2
    REFUSED = 3
    BUILD_FAILED = 4
    NO_MATCH = 5
    CODE_BUSY = 6
    TARGET_GONE = 7
    NO_PERMISSION = 8
    NOT_APPLIED = 9
    HOOK_FAILED = 10
    REMOTE_FAILED = 11
    PARTIAL = 12
    TARGET_UNCHANGED = 13


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: 'success (including "no code changes: nothing to do")',
    ExitCode.FAILED: "internal error in livesplice (a bug: please report it with the output)",
    ExitCode.USAGE: "bad usage or input (missing tree or file, patch does not apply, "
    "malformed update)",
    ExitCode.REFUSED: "patch refused: a change that cannot be spliced safely (each reason listed)",
    ExitCode.BUILD_FAILED: "the build failed (the compiler's output is shown)",
    ExitCode.NO_MATCH: "run-pre matching failed: the running code is not what the update was "
    "built from; nothing was changed",
    ExitCode.CODE_BUSY: "a thread (or kernel task) stayed inside a function being replaced; "
    "nothing changed",
    ExitCode.TARGET_GONE: "the target process is gone (or the lab guest crashed or hung)",
    ExitCode.NO_PERMISSION: "no permission to trace or modify the target",
    ExitCode.NOT_APPLIED: "the update is not applied (undo/view)",
    ExitCode.HOOK_FAILED: "a hook failed; the update was rolled back",
    ExitCode.REMOTE_FAILED: "a system call run inside the target failed (e.g. `mmap` out of "
    "memory); the target's registers were restored and nothing was applied",
    ExitCode.PARTIAL: "several targets, and some failed or could not be inspected (each is "
    "listed with what is wrong); the others succeeded",
    ExitCode.TARGET_UNCHANGED: "create --target: the named outputs are unchanged but the patch "
    "changes other outputs of the build (each listed, with how to build for them); no update "
    'written. Not "nothing to do": the patch does change shipped code',
}


class LivespliceError(Exception):
    """Base class: a failure with a code, a reason, evidence and advice."""

    code: ExitCode = ExitCode.FAILED
    abort: str = "FAILED"

    def __init__(
        self,
        reason: str,
        details: Iterable[str] = (),
        advice: str = "",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = list(details)
        self.advice = advice

    def render(self) -> str:
        """The paragraph the CLI prints."""
        lines = [f"livesplice: {self.abort}: {self.reason}"]
        lines.extend(f"  {d}" for d in self.details)
        if self.advice:
            lines.append(f"what to do: {self.advice}")
        return "\n".join(lines)


class UsageError(LivespliceError):
    """Bad usage or bad input: the user can fix the command line or the file."""

    code = ExitCode.USAGE
    abort = "BAD_INPUT"


class PatchDoesNotApply(UsageError):
    """The patch does not apply to the source tree."""

    abort = "PATCH_DOES_NOT_APPLY"


class SourceUnavailable(UsageError):
    """A Debian source or binary package version cannot be fetched from the archive."""

    abort = "SOURCE_UNAVAILABLE"


class MalformedUpdate(UsageError):
    """The update file is damaged, truncated or not an update."""

    abort = "MALFORMED_UPDATE"


class PatchRefused(LivespliceError):
    """The diff found changes that code swapping alone cannot make safe."""

    code = ExitCode.REFUSED
    abort = "REFUSED"


class TargetUnchanged(LivespliceError):
    """``create --target``: the named outputs did not change, other outputs did.

    Deliberately not "nothing to do" (exit 0): a security team reads that as "this package is
    not affected", while the fix lands in another output (nginx's src/mail/ in the dynamic
    module ngx_mail_module.so). ``outputs`` holds the changed outputs as plain data (name,
    kind, functions, notes) for ``create --json``.
    """

    code = ExitCode.TARGET_UNCHANGED
    abort = "TARGET_UNCHANGED"

    def __init__(
        self,
        reason: str,
        details: Iterable[str] = (),
        advice: str = "",
        outputs: Iterable[dict[str, object]] = (),
    ) -> None:
        super().__init__(reason, details, advice)
        self.outputs = list(outputs)


class BuildFailed(LivespliceError):
    """The project's own build failed (its compiler output is in details)."""

    code = ExitCode.BUILD_FAILED
    abort = "BUILD_FAILED"


class NoMatch(LivespliceError):
    """Run-pre matching failed: the running code is not what the update was built from."""

    code = ExitCode.NO_MATCH
    abort = "NO_MATCH"


class CodeBusy(LivespliceError):
    """A thread (or kernel task) stayed inside code being replaced; nothing was changed."""

    code = ExitCode.CODE_BUSY
    abort = "CODE_BUSY"


class TargetGone(LivespliceError):
    """The target process exited (or the lab guest crashed or hung)."""

    code = ExitCode.TARGET_GONE
    abort = "TARGET_GONE"
    crash_signal = 0  # set when the process died of a crash signal while being patched


class TargetStopped(UsageError):
    """The process is job-stopped (SIGSTOP): loading needs code run in it; we do not wake it."""

    abort = "TARGET_STOPPED"


class NoPermission(LivespliceError):
    """Not allowed to trace or modify the target."""

    code = ExitCode.NO_PERMISSION
    abort = "NO_PERMISSION"


class NotApplied(LivespliceError):
    """undo/view of an update that is not applied."""

    code = ExitCode.NOT_APPLIED
    abort = "NOT_APPLIED"


class HookFailed(LivespliceError):
    """An update hook reported failure; the update was rolled back."""

    code = ExitCode.HOOK_FAILED
    abort = "HOOK_FAILED"


class RemoteCallFailed(LivespliceError):
    """A system call or function call run inside the target failed (mmap ENOMEM, EMFILE, ...).

    The target is fine (its registers were restored); it lacked a resource we asked it for.
    """

    code = ExitCode.REMOTE_FAILED
    abort = "REMOTE_FAILED"
