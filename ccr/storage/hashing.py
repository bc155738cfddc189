"""SHA-256 of byte streams, computed on a thread of its own so it overlaps I/O and codecs."""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

# Reads when hashing a whole file: few enough calls that Python's cost per call vanishes.
_CHUNK = 4 << 20


class ThreadedSha256:
    """SHA-256 of what update() is given, in that order, hashed on a worker thread.

    hashlib releases the GIL on large buffers, so the caller goes on reading, writing or
    (de)compressing while the hash catches up: on 2 CPUs that is the difference between
    zstd keeping pace with the `zstd` CLI and running at 60% of it.  Once `backlog` bytes
    wait for the worker, update() blocks until they fall below it: memory stays bounded.
    Buffers must not change after update() (pass bytes, not a reused bytearray).
    Use it as a context manager, or call hexdigest(), so the thread ends.
    """

    def __init__(self, backlog: int = 16 << 20) -> None:
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ccr-sha256")
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._waiting = 0
        self._backlog = backlog
        self.size = 0

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._pending.append((self._pool.submit(self._digest.update, data), len(data)))
        self._waiting += len(data)
        while self._waiting > self._backlog and len(self._pending) > 1:
            future, size = self._pending.popleft()
            future.result()
            self._waiting -= size

    def hexdigest(self) -> str:
        """Wait for the backlog, end the thread, and return the digest."""
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        while self._pending:
            self._pending.popleft()[0].result()
        self._waiting = 0

    def __enter__(self) -> ThreadedSha256:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hashing overlaps the reads)."""
    with path.open("rb", buffering=0) as fh, ThreadedSha256() as digest:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
