"""How ``create`` shows its stages on stderr: live at a terminal, timestamped lines in a log.

The engine reports :class:`~livesplice.progress.StageEvent` s; this module is the only place
that turns them into text. At a terminal a live display (rich, the library most Python CLIs
use for this; imported only then) shows every stage with a running clock and the diff's
n/N objects. Anywhere else (a CI log, a security team's queue runner, a pipe) each stage
start and end is one line with a UTC timestamp, so a log read later says when each stage
ran and how long it took. ``--quiet`` shows nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from livesplice.progress import ProgressCallback, StageEvent

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def progress_printer(args: argparse.Namespace) -> Callable[[str], None]:
    """The progress callback of the kernel and service commands (apply, undo, upgrade): a
    line on stderr, none with --json (stdout then holds exactly one JSON document and stderr
    stays free of chatter)."""

    def say(msg: str) -> None:
        if not getattr(args, "json", False):
            print(f"livesplice: {msg}", file=sys.stderr, flush=True)

    return say


# a log line for the diff's n/N at most this often (the end of the stage is always logged)
LOG_UPDATE_INTERVAL = 5.0


def describe(event: StageEvent) -> str:
    """``diff done in 12.3 s (40/40 objects)``: the words of one event, without a timestamp."""
    counted = f"{event.done}/{event.total} objects" if event.total is not None else ""
    extra = ", ".join(x for x in (counted, event.note) if x)
    if event.state == "start":
        return f"{event.stage} ..." + (f" ({event.note})" if event.note else "")
    if event.state == "update":
        return f"{event.stage}: {counted} ({event.elapsed:.1f} s)"
    verb = "done in" if event.state == "done" else "failed after"
    return f"{event.stage} {verb} {event.elapsed:.1f} s" + (f" ({extra})" if extra else "")


class LogLines:
    """One UTC-timestamped line per stage start and end (and the diff's count now and then)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last_update = 0.0

    def __call__(self, event: StageEvent) -> None:
        """Write the event as one timestamped line (the diff's n/N at most every few seconds)."""
        now = time.monotonic()
        if event.state == "update" and now - self.last_update < LOG_UPDATE_INTERVAL:
            return
        self.last_update = now
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # the timestamp first: a log reader (the eval's create_step) takes the first line
        # starting with "livesplice: " as the error, and progress is not one
        print(f"{stamp} livesplice: {describe(event)}", file=self.stream, flush=True)


class LiveDisplay:
    """A rich progress display: one row per stage, a spinner and running clock while it runs."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: StageEvent) -> None:
        """Start, advance or finish the stage's row of the display."""
        count = f"{event.done}/{event.total} objects" if event.total is not None else ""
        label = f"{event.stage}" + (f" ({event.note})" if event.note else "")
        task = self.tasks.get(event.stage)
        if task is None or event.state == "start":
            task = self.progress.add_task(label, total=None, count=count, mark="")
            self.tasks[event.stage] = task
        if event.state == "update":
            self.progress.update(task, count=count)
        elif event.state in ("done", "failed"):
            mark = "[green]✓[/green]" if event.state == "done" else "[red]✗ failed[/red]"
            self.progress.update(task, count=count, mark=mark, total=1, completed=1)
            self.progress.stop_task(task)


@contextmanager
def create_progress(quiet: bool, stream: TextIO | None = None) -> Iterator[ProgressCallback | None]:
    """The progress callback for one ``create``: None with ``quiet``, live at a terminal,
    log lines otherwise. The live display is stopped (its last frame left on screen) before
    the caller prints the result or an error."""
    stream = stream if stream is not None else sys.stderr
    if quiet:
        yield None
        return
    if not stream.isatty():
        yield LogLines(stream)
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(finished_text=""),
        TextColumn("{task.fields[mark]}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[count]}"),
    )
    with Progress(*columns, console=Console(file=stream)) as progress:
        yield LiveDisplay(progress)
