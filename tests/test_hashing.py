"""ccr.storage.hashing: threaded digests equal the libraries' own, in order, memory bounded."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccr.errors import IntegrityError
from ccr.storage.hashing import ThreadedDigest, file_digest, new_hash


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(max_size=5000), max_size=30),
    st.integers(1, 10_000),
    st.sampled_from(["blake3", "sha256"]),
)
def test_same_digest_as_the_library_in_order(
    chunks: list[bytes], backlog: int, algorithm: str
) -> None:
    threaded = ThreadedDigest(algorithm, backlog=backlog)
    for chunk in chunks:
        threaded.update(chunk)
    assert threaded.size == sum(map(len, chunks))
    whole = b"".join(chunks)
    expected = blake3.blake3(whole) if algorithm == "blake3" else hashlib.sha256(whole)
    assert threaded.hexdigest() == expected.hexdigest()


def test_unknown_algorithm_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="md5"):
        new_hash("md5")


def test_backlog_bounds_what_waits() -> None:
    # A worker held up: update() must block once the backlog is full, not queue everything.
    gate = threading.Event()
    threaded = ThreadedDigest("sha256", backlog=3 << 20)
    threaded._worker().submit(gate.wait)  # occupy the worker (started on first use)
    queued: list[int] = []

    def feed() -> None:
        for _ in range(10):
            threaded.update(bytes(1 << 20))
            queued.append(1)

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join(0.5)
    assert feeder.is_alive() and len(queued) <= 4
    gate.set()
    feeder.join()
    assert threaded.hexdigest() == hashlib.sha256(bytes(10 << 20)).hexdigest()


def test_context_manager_ends_the_thread_on_error() -> None:
    before = threading.active_count()
    try:
        with ThreadedDigest() as digest:
            digest.update(b"x" * 100_000)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert threading.active_count() == before


def test_file_digest(tmp_path: Path) -> None:
    data = random.Random(3).randbytes((9 << 20) + 7)  # more than two of its reads
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_digest(path) == blake3.blake3(data).hexdigest()
    assert file_digest(path, "sha256") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == blake3.blake3(b"").hexdigest()
