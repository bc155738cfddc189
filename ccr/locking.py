"""Exclusive file locks taken within a deadline (MaxWait), released on exit."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ccr.errors import MaxWaitExceeded


@contextmanager
def exclusive_lock(path: Path, max_wait: float | None, busy: str) -> Iterator[None]:
    """Hold an flock on path; after max_wait seconds (None: forever) raise MaxWaitExceeded.

    busy says who holds the lock, e.g. "another checkpoint of job 42 is still running".

    flock is released by the kernel when the holder dies, so a killed ccr never leaves a
    lock behind.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if max_wait is None else time.monotonic() + max_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise MaxWaitExceeded(f"{busy} after MaxWait={max_wait:g}s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
