"""Fault injection for tests: die exactly at a named point of an operation.

Setting ``LIVESPLICE_KILL_AT=<point>`` makes livesplice SIGKILL itself when it reaches
``checkpoint(<point>)``. The tests use it to prove that a tool killed at any step of apply or
undo leaves the target running, truthfully described by ``view`` and repairable by ``undo``.
Without the variable, a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "LIVESPLICE_KILL_AT"


def checkpoint(point: str) -> None:
    """Die (SIGKILL, no clean-up of any kind) here when LIVESPLICE_KILL_AT names ``point``."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def armed() -> bool:
    """Whether any checkpoint can fire (LIVESPLICE_KILL_AT is set): lets a hot path skip
    building checkpoint names."""
    return ENV in os.environ
