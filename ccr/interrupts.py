"""Ctrl-C and SIGTERM for the commands that change state (run, create, restart).

The first SIGINT or SIGTERM raises Interrupted where the command is; the code it unwinds
through rolls back what it started (CRIU killed, scratch removed, tree resumed) and says
so in `lines`.  Later signals are only noted, so a second Ctrl-C cannot break a rollback
half-way.  Inside shielded() (a checkpoint being published, say) the signal is only noted:
the work finishes and the caller asks pending() afterwards.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `lines` say what state it left (one sentence each)."""

    def __init__(self, signum: int = signal.SIGINT, lines: list[str] | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.lines: list[str] = list(lines or [])
        # Set by a background start that was interrupted: its report if the step runs anyway.
        self.started: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    raised = False  # the one Interrupted this process raises has been raised
    shield = 0
    pending: int | None = None


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT for Python's own)."""
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _State.pending is None:
        _State.pending = signum
    if _State.shield or _State.raised:
        return
    _State.raised = True
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise Interrupted (once) in this process."""
    _State.raised = False
    _State.pending = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def pending() -> int | None:
    """The signal that arrived (inside a shield or not), if any."""
    return _State.pending


def take_deferred() -> int | None:
    """A signal that arrived inside a shield without raising, once; None if none did."""
    if _State.raised or _State.pending is None:
        return None
    signum, _State.pending = _State.pending, None
    return signum


@contextmanager
def shielded() -> Iterator[None]:
    """Defer Interrupted while the block runs (past a point of no return)."""
    _State.shield += 1
    try:
        yield
    finally:
        _State.shield -= 1
