"""MaxWait as one value: made once where a command starts, passed down to every wait.

A checkpoint waits on the job lock, the GPU driver, CRIU's socket and a node's coordinator;
each asks the same Deadline how long it may still wait, and each that runs out says the
user's own limit ("MaxWait=5s"), not what was left of it when that wait began.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ccr.errors import MaxWaitExceeded

# A wait given no time at all still gets this much (a socket or flock timeout of 0 would
# mean "do not block" or "block for ever", not "already late").
MIN_WAIT_S = 0.001


@dataclass(frozen=True)
class Deadline:
    """A moment on clock (time.monotonic: one clock for every process of the node, so a
    forked supervisor keeps its parent's deadline), or none; and the limit it came from."""

    at: float | None = None  # clock() value it passes at; None: never
    limit: float | None = None  # the user's value, in seconds (for messages)
    name: str = "MaxWait"  # what the limit is called where the user set it
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def after(
        cls,
        seconds: float | None,
        name: str = "MaxWait",
        clock: Callable[[], float] = time.monotonic,
    ) -> Deadline:
        """The deadline seconds from now (None: no deadline)."""
        if seconds is None:
            return cls(name=name, clock=clock)
        return cls(clock() + seconds, seconds, name, clock)

    @property
    def bounded(self) -> bool:
        return self.at is not None

    def remaining(self) -> float | None:
        """Seconds left (0 once passed); None: no deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - self.clock())

    def timeout(self) -> float | None:
        """remaining() as a timeout for a blocking call: at least MIN_WAIT_S; None: none."""
        left = self.remaining()
        return None if left is None else max(MIN_WAIT_S, left)

    def expired(self) -> bool:
        return self.at is not None and self.clock() >= self.at

    def __str__(self) -> str:
        if self.limit is None:
            return f"no {self.name}"
        return f"{self.name}={self.limit:g}s"

    def exceeded(self, what: str) -> MaxWaitExceeded:
        """The error for what (e.g. "CRIU dump") not finished in time: names the limit."""
        return MaxWaitExceeded(f"{what} did not finish within {self}")

    def check(self, what: str) -> None:
        """Raise exceeded(what) once the deadline has passed."""
        if self.expired():
            raise self.exceeded(what)


NO_DEADLINE = Deadline()
