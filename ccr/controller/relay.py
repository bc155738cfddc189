"""A foreground `ccr run` shows the step's output as it is written (like `tail -f`).

The step itself always writes to a file (CRIU reopens a file on restore; it cannot dump a
terminal it does not own).  The relay copies what is appended to ccr's own stdout / stderr,
so a batch log (`slurm-%j.out`) or a terminal sees it, and remembers how far it got in the
step's registry record: a later `ccr run` that resumes the step goes on from there.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

POLL = 0.1  # seconds between looks at the files
SAVE = 1.0  # seconds between saves of the offsets


@dataclass
class Source:
    """One file to follow, from offset, into sink."""

    path: Path
    offset: int
    sink: BinaryIO

    def same_as_sink(self) -> bool:
        """The file *is* where we would copy it to (`ccr run -o log > log`): nothing to do."""
        try:
            a, b = os.stat(self.path), os.fstat(self.sink.fileno())
        except (OSError, ValueError):
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def start_offset(path: Path, saved: int | None) -> int:
    """Where to begin: where an earlier relay stopped, else the file's current end."""
    if saved is not None:
        return saved
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Relay:
    """Copies what is appended to each source into its sink, from a thread."""

    def __init__(self, sources: list[Source], save: Callable[[list[int]], None]) -> None:
        self.sources = sources
        self._save = save
        self._saved = [s.offset for s in sources]
        self._stop = threading.Event()
        self._skip = [s.same_as_sink() for s in sources]
        self._broken = [False for _ in sources]
        self._thread = threading.Thread(target=self._run, name="ccr-relay", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Copy what is left (the tree has ended), then save how far we got."""
        self._stop.set()
        self._thread.join()
        self.drain()
        self.save()

    def _run(self) -> None:
        last_save = time.monotonic()
        while not self._stop.wait(POLL):
            self.drain()
            if time.monotonic() - last_save >= SAVE:
                self.save()
                last_save = time.monotonic()

    def drain(self) -> None:
        for i, src in enumerate(self.sources):
            if self._broken[i]:
                continue
            try:
                size = src.path.stat().st_size
                if size < src.offset:  # truncated, or deleted and recreated: start over
                    src.offset = 0
                if self._skip[i]:
                    src.offset = size  # already there: counts as shown
                if size == src.offset:
                    continue
                with src.path.open("rb") as fh:
                    fh.seek(src.offset)
                    while chunk := fh.read(1 << 16):
                        src.sink.write(chunk)
                        src.offset += len(chunk)
                src.sink.flush()
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                self._broken[i] = True  # our stdout is gone (EPIPE): the step runs on regardless

    def save(self) -> None:
        offsets = [s.offset for s in self.sources]
        if offsets != self._saved:
            self._save(offsets)
            self._saved = offsets
