"""Progress of long operations (dump, compress, decompress), for whoever listens: the CLI's bar."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# (task id, description, done, total); total 0 means unknown; done == -1 means finished.
Listener = Callable[[int, str, int, int], None]

_listener: Listener | None = None
_lock = threading.Lock()
_next_id = 0


def set_listener(listener: Listener | None) -> None:
    global _listener
    _listener = listener


def relay() -> Listener:
    """A listener for another process's task reports: passed to ours under fresh task ids.

    A forked supervisor counts task ids from where its parent stood, so its ids would
    collide with the parent's own.
    """
    ids: dict[int, int] = {}

    def forward(task_id: int, description: str, done: int, total: int) -> None:
        global _next_id
        listener = _listener
        if listener is None:
            return
        if task_id not in ids:
            with _lock:
                _next_id += 1
                ids[task_id] = _next_id
        listener(ids[task_id], description, done, total)

    return forward


@contextmanager
def task(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Report a task; yields update(done_bytes).  Silent when nobody listens."""
    global _next_id
    listener = _listener
    if listener is None:
        yield lambda done: None
        return
    with _lock:
        _next_id += 1
        task_id = _next_id
    listener(task_id, description, 0, total)
    try:
        yield lambda done: listener(task_id, description, done, total)
    finally:
        listener(task_id, description, -1, total)


@contextmanager
def watch_directory(description: str, path: Path, total: int) -> Iterator[None]:
    """Report the growth of a directory CRIU writes into (CRIU itself reports no progress)."""
    if _listener is None:
        yield
        return
    stop = threading.Event()
    with task(description, total) as update:

        def poll() -> None:
            while not stop.wait(0.2):
                try:
                    update(sum(p.stat().st_size for p in path.iterdir() if p.is_file()))
                except OSError:
                    continue

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def mib_fraction(done: int, total: int) -> str:
    """`12.0/512.0 MiB`: binary units, as every other size ccr prints."""
    return f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"


def mib_rate(bytes_per_second: float | None) -> str:
    """`85.3 MiB/s`, or "" while no rate is known yet."""
    return "" if not bytes_per_second else f"{bytes_per_second / 2**20:.1f} MiB/s"
