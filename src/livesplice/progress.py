"""Progress of a long ``create``: named stages with their elapsed time, told to a callback.

A real package's create runs for minutes (a pre build, a post build, a diff of every
recompiled object); a person at a terminal, or a security team's queue log, must see which
stage it is in and how long each took. The engine never prints (docs/ARCHITECTURE.md): the
steps report :class:`StageEvent` s to the caller's :data:`ProgressCallback`, and the CLI
(``cli_progress.py``) shows them. Without a callback nothing is reported and nothing costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

StageState = Literal["start", "update", "done", "failed"]


@dataclass(frozen=True)
class StageEvent:
    """One moment of one stage.

    ``stage`` is what a person calls it ("pre build", "patch", "post build", "diff",
    "package"); ``elapsed`` is seconds since the stage started (0 at "start");
    ``done``/``total`` count the stage's items where it has them (the diff's objects);
    ``note`` qualifies the stage ("reused from the prebuild cache").
    """

    stage: str
    state: StageState
    elapsed: float
    done: int | None = None
    total: int | None = None
    note: str = ""


ProgressCallback = Callable[[StageEvent], None]


class Stages:
    """Times the stages of one operation and tells ``callback`` about each (None: silent)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    @contextmanager
    def stage(self, name: str, *, note: str = "") -> Iterator[Callable[[int, int], None]]:
        """Run the ``with`` body as stage ``name``; it gets ``advance(done, total)`` to report
        items as they finish (the diff knows its total only once it has looked at the build).

        An exception leaving the body is reported as "failed" (so a live display can stop
        cleanly before the error is printed) and propagates unchanged.
        """
        start = time.monotonic()
        count: list[int | None] = [None, None]  # done, total: the last reported

        def tell(state: StageState) -> None:
            if self.callback is not None:
                elapsed = 0.0 if state == "start" else time.monotonic() - start
                self.callback(StageEvent(name, state, elapsed, count[0], count[1], note))

        def advance(done: int, total: int) -> None:
            count[:] = [done, total]
            tell("update")

        tell("start")
        try:
            yield advance
        except BaseException:
            tell("failed")
            raise
        tell("done")
