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
    """Documented exit codes of the ``livesplice`` command (see README)."""

    OK = 0
    FAILED = 1  # internal failure: a bug in livesplice, reported with a traceback hint
    USAGE = 2  # bad usage or bad input (missing tree, malformed update, patch does not apply)
    REFUSED = 3  # the patch contains a change that cannot be spliced safely
    BUILD_FAILED = 4  # the project's own build failed (compiler output attached)
    NO_MATCH = 5  # run-pre matching failed: running code is not what the update was built from
    CODE_BUSY = 6  # a thread stayed inside a function being replaced; nothing was changed
    TARGET_GONE = 7  # the target process exited (or never existed)
    NO_PERMISSION = 8  # not allowed to trace/modify the target
    NOT_APPLIED = 9  # undo/view of an update that is not applied
    HOOK_FAILED = 10  # an update hook reported failure; the update was rolled back
    REMOTE_FAILED = 11  # a system call or call run inside the target failed (e.g. mmap ENOMEM)
    PARTIAL = 12  # several targets: some succeeded, some failed or could not be inspected


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
    code = ExitCode.USAGE
    abort = "BAD_INPUT"


class PatchDoesNotApply(UsageError):
    abort = "PATCH_DOES_NOT_APPLY"


class MalformedUpdate(UsageError):
    abort = "MALFORMED_UPDATE"


class PatchRefused(LivespliceError):
    """The diff found changes that code swapping alone cannot make safe."""

    code = ExitCode.REFUSED
    abort = "REFUSED"


class BuildFailed(LivespliceError):
    code = ExitCode.BUILD_FAILED
    abort = "BUILD_FAILED"


class NoMatch(LivespliceError):
    code = ExitCode.NO_MATCH
    abort = "NO_MATCH"


class CodeBusy(LivespliceError):
    code = ExitCode.CODE_BUSY
    abort = "CODE_BUSY"


class TargetGone(LivespliceError):
    code = ExitCode.TARGET_GONE
    abort = "TARGET_GONE"


class TargetStopped(UsageError):
    """The process is job-stopped (SIGSTOP): loading needs code run in it; we do not wake it."""

    abort = "TARGET_STOPPED"


class NoPermission(LivespliceError):
    code = ExitCode.NO_PERMISSION
    abort = "NO_PERMISSION"


class NotApplied(LivespliceError):
    code = ExitCode.NOT_APPLIED
    abort = "NOT_APPLIED"


class HookFailed(LivespliceError):
    code = ExitCode.HOOK_FAILED
    abort = "HOOK_FAILED"


class RemoteCallFailed(LivespliceError):
    """A system call or function call run inside the target failed (mmap ENOMEM, EMFILE, ...).

    The target is fine (its registers were restored); it lacked a resource we asked it for.
    """

    code = ExitCode.REMOTE_FAILED
    abort = "REMOTE_FAILED"
