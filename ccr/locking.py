"""Exclusive file locks taken within a deadline (MaxWait), released on exit."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ccr.deadline import Deadline
from ccr.errors import MaxWaitExceeded


@contextmanager
def exclusive_lock(path: Path, deadline: Deadline, busy: str) -> Iterator[None]:
    """Hold an flock on path; once deadline passes (none: wait forever) raise MaxWaitExceeded.

    busy says who holds the lock, e.g. "another checkpoint of job 42 is still running".

    flock is released by the kernel when the holder dies, so a killed ccr never leaves a
    lock behind.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline.expired():
                    raise MaxWaitExceeded(f"{busy} after {deadline}") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
