"""read_verified (a stored file's bytes, each frame checked before it leaves) and ccr's side
of CRIU's image-streamer protocol, driven here as CRIU drives it (criu/img-streamer.c):
request, reply, a pipe's write end over SCM_RIGHTS, then the file through the pipe.
The real CRIU runs in tests/test_restart_stream_e2e.py."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ccr.engines.compression import FRAME_SIZE, Codec, compress_dir, read_verified
from ccr.engines.imagestream import SOCKET_NAME, ImageServer, PipeWriter, Source
from ccr.errors import IntegrityError
from ccr.storage.manifest import FORMAT, FileEntry, Frame, StepManifest, frames_of


def blob(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    half = size // 2
    return (
        rng.randbytes(half)
        + (b"text-like line of a page image\n" * (size // 31 + 1))[: size - half]
    )


SIZES = [0, 1, 4096, FRAME_SIZE - 1, FRAME_SIZE, FRAME_SIZE + 1, 2 * FRAME_SIZE + 12345]


def stored(tmp_path: Path, data: bytes, codec: str) -> tuple[Path, FileEntry]:
    path, entry, _ = stored_with_table(tmp_path, data, codec)
    return path, entry


def stored_with_table(
    tmp_path: Path, data: bytes, codec: str
) -> tuple[Path, FileEntry, list[Frame] | None]:
    """The stored file, its entry and its frame table (as StepManifest.frame_tables gives
    it to a restart; None for files stored whole)."""
    src = tmp_path / "dump"
    src.mkdir(exist_ok=True)
    (src / "pages-1.img").write_bytes(data)
    c = Codec("zstd", 1) if codec == "zstd" else Codec("none", 0)
    tables: dict[str, dict[str, Any]] = {}
    [entry] = compress_dir(src, tmp_path / codec, c, frames=tables)
    return tmp_path / codec / entry.name, entry, frames_of(entry, tables.get(entry.name)) or None


def collect(pieces: Iterator[bytes | memoryview]) -> bytes:
    """The pieces' bytes, each copied before the next is asked for (buffers are reused)."""
    out = bytearray()
    for piece in pieces:
        out += piece
    return bytes(out)


def old(entry: FileEntry) -> FileEntry:
    """The entry as a format-3 manifest had it: one digest for the whole file."""
    return replace(entry, frames=[], frame_bytes=0)


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_framed_and_old(tmp_path: Path, codec: str, size: int) -> None:
    data = blob(size)
    path, entry, table = stored_with_table(tmp_path, data, codec)
    if size >= 64 << 10 or codec == "none":
        assert len(entry.frames) == max(1, -(-size // FRAME_SIZE))
    if codec == "zstd" and size >= 64 << 10:
        assert table is not None and len(table) == len(entry.frames)
        assert collect(read_verified(path, entry, table)) == data  # frames read at offsets
    assert collect(read_verified(path, entry)) == data  # frames found by walking the file
    assert collect(read_verified(path, old(entry))) == data


def flip(path: Path, at: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x55]))


@pytest.mark.parametrize("codec", ["zstd", "zstd-table", "none"])
def test_a_bad_frame_never_leaves(tmp_path: Path, codec: str) -> None:
    """Format 4: the frames before the damaged one come out, not one byte of it."""
    data = blob(3 * FRAME_SIZE)
    path, entry, table = stored_with_table(tmp_path, data, codec.removesuffix("-table"))
    flip(path, path.stat().st_size - 10)  # in the third (last) frame
    got = bytearray()
    with pytest.raises(IntegrityError, match=f"{path} is corrupted .*frame 2"):
        for piece in read_verified(path, entry, table if codec.endswith("-table") else None):
            got += piece
    assert bytes(got) == data[: 2 * FRAME_SIZE]


def test_old_entries_are_checked_at_the_end(tmp_path: Path) -> None:
    """Format 3 (uncompressed): one digest, known only after the last byte."""
    data = blob(3 * FRAME_SIZE)
    path, entry = stored(tmp_path, data, "none")
    flip(path, 10)
    got = bytearray()
    with pytest.raises(IntegrityError, match=f"{path} is corrupted \\(checksum mismatch\\)"):
        for piece in read_verified(path, old(entry)):
            got += piece
    assert len(got) == len(data)


@pytest.mark.parametrize("codec", ["zstd", "zstd-table", "none"])
def test_truncated_and_extended_files_are_refused(tmp_path: Path, codec: str) -> None:
    data = blob(2 * FRAME_SIZE + 100)
    path, entry, table = stored_with_table(tmp_path, data, codec.removesuffix("-table"))
    frames = table if codec.endswith("-table") else None
    original = path.read_bytes()
    path.write_bytes(original[: len(original) - 50])
    with pytest.raises(IntegrityError, match=str(path)):
        collect(read_verified(path, entry, frames))
    path.write_bytes(original + b"\0" * 10)
    with pytest.raises(IntegrityError, match=str(path)):
        collect(read_verified(path, entry, frames))


def test_manifest_format_follows_what_it_holds() -> None:
    base = StepManifest(
        job_id=1, step_id=0, argv=["x"], cwd="/", output="/o", hostname="h", uid=0, gid=0,
        root_pid=1, pids=[1], criu_version="4", created=0.0, leave_running=True,
    )  # fmt: skip
    base.files = [FileEntry("a", 1, "d", 1, frames=["f"], frame_bytes=FRAME_SIZE)]
    assert FORMAT == 4 and base.to_dict()["format"] == 4
    base.files = [FileEntry("a", 1, "d", 1)]
    data = base.to_dict()
    assert data["format"] == 2 and "frames" not in data["files"][0]  # an older ccr reads it


# --- the protocol ------------------------------------------------------------------------


class FakeCriu:
    """CRIU's side of img-streamer.c, in Python."""

    def __init__(self, directory: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(directory / SOCKET_NAME))

    def open(self, name: str) -> int | None:
        raw = name.encode()
        body = b"\x0a" + bytes([len(raw)]) + raw  # names here are < 128 bytes
        self.sock.sendall(struct.pack("<I", len(body)) + body)
        head = self.sock.recv(4)
        reply = self.sock.recv(struct.unpack("<I", head)[0])
        if reply != b"\x08\x01":
            return None
        r, w = os.pipe()
        self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        os.close(w)
        return r

    @staticmethod
    def read_all(fd: int) -> bytes:
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        os.close(fd)
        return bytes(out)


def gate_verdict(gate: Path) -> str:
    """What the action script reads at post-restore."""
    fd = os.open(gate, os.O_RDWR)
    try:
        return os.read(fd, 16).decode().strip()
    finally:
        os.close(fd)


def test_server_serves_stored_files_and_says_what_is_missing(tmp_path: Path) -> None:
    data = blob(2 * FRAME_SIZE + 7)
    path, entry = stored(tmp_path, data, "zstd")
    meta = tmp_path / "meta.img"
    meta.write_bytes(b"metadata")
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    server = ImageServer(
        sock_dir,
        {"pages-1.img": Source(path, entry), "inventory.img": Source(meta)},
        tmp_path / "g",
    )
    try:
        criu = FakeCriu(sock_dir)
        assert criu.open("memfd.img") is None
        fd = criu.open("inventory.img")
        assert fd is not None and criu.read_all(fd) == b"metadata"
        fd = criu.open("pages-1.img")
        assert fd is not None and criu.read_all(fd) == data
        assert gate_verdict(tmp_path / "g") == "ok"
        assert server.stats.failure is None
        assert server.sent() == len(data) + len(b"metadata")
    finally:
        server.close()


def test_gate_says_bad_when_an_old_file_fails_at_its_end(tmp_path: Path) -> None:
    """CRIU read every byte of a format-3 file whose digest then fails: the verdict (what
    holds the tree at post-restore) is bad, naming nothing run."""
    data = blob(2 * FRAME_SIZE)
    path, entry = stored(tmp_path, data, "none")
    flip(path, 5)
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    server = ImageServer(sock_dir, {"pages-1.img": Source(path, old(entry))}, tmp_path / "g")
    try:
        criu = FakeCriu(sock_dir)
        fd = criu.open("pages-1.img")
        assert fd is not None
        got = criu.read_all(fd)
        assert len(got) == len(data)  # CRIU got it all, wrong byte included ...
        assert gate_verdict(tmp_path / "g") == "bad"  # ... and the tree never resumes
        assert server.stats.failure and str(path) in server.stats.failure
    finally:
        server.close()


def test_gate_drains_an_old_file_criu_stopped_reading(tmp_path: Path) -> None:
    """CRIU may close a pipe early (it read what it needed): an old-format file is still
    read to its end for its digest before the verdict."""
    data = blob(3 * FRAME_SIZE)
    path, entry = stored(tmp_path, data, "zstd")
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    server = ImageServer(sock_dir, {"pages-1.img": Source(path, old(entry))}, tmp_path / "g")
    verdict: list[str] = []
    try:
        criu = FakeCriu(sock_dir)
        fd = criu.open("pages-1.img")
        assert fd is not None
        assert len(os.read(fd, 4096)) > 0
        # CRIU keeps the pipe open without reading (a forked task holds it): the gate
        # must not wait for it to read on.
        waiter = threading.Thread(target=lambda: verdict.append(gate_verdict(tmp_path / "g")))
        waiter.start()
        waiter.join(60)
        assert verdict == ["ok"]
        os.close(fd)
    finally:
        server.close()


# --- PipeWriter: vmsplice of pieces, and the rule that keeps them unchanged until read ----


def slow_reader(
    fd: int, out: bytearray, chunk: int = 4096, pause: float = 0.0005
) -> threading.Thread:
    def run() -> None:
        while data := os.read(fd, chunk):
            out.extend(data)
            time.sleep(pause)
        os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_pipe_writer_splices_pages_not_copies(tmp_path: Path) -> None:
    """What CRIU reads is ccr's buffer itself: changed before it was read, the change shows
    (so the writer must keep pieces unchanged until read, which settle() ensures)."""
    r, w = os.pipe()
    buf = bytearray(b"a" * 8192)
    pipe = PipeWriter(w)
    assert pipe.write(memoryview(buf), lambda: False)
    buf[:] = b"b" * 8192  # CRIU has not read yet
    got = os.read(r, 16384)
    os.close(r)
    os.close(w)
    assert got == b"b" * 8192


@pytest.mark.parametrize("kind", ["ring", "fresh-bytes"])
def test_pipe_writer_keeps_pieces_until_read(kind: str) -> None:
    """read_verified's contract (a piece is valid until the one after next is asked for),
    with a ring of two buffers refilled as soon as allowed and a reader slower than the
    writer: every byte arrives as it was when it was written."""
    r, w = os.pipe()
    out = bytearray()
    reader = slow_reader(r, out)
    rng = random.Random(7)
    expected = bytearray()
    ring = [bytearray(48 << 10) for _ in range(2)]
    pipe = PipeWriter(w)
    for index in range(40):
        pipe.settle(1, lambda: False)  # as a pump does before asking for the next piece
        data = rng.randbytes(48 << 10)
        expected += data
        if kind == "ring":
            buf = ring[index % 2]
            buf[:] = data
            piece: bytes | memoryview = memoryview(buf)
        else:
            piece = bytes(data)  # freed (and its memory reused) once the writer lets go
        assert pipe.write(piece, lambda: False)
        del piece
    pipe.settle(0, lambda: False)
    os.close(w)
    reader.join(30)
    assert bytes(out) == bytes(expected)


def test_pipe_writer_stops_when_the_reader_is_gone() -> None:
    r, w = os.pipe()
    pipe = PipeWriter(w)
    assert pipe.write(b"x" * 4096, lambda: False)
    os.close(r)
    pipe.settle(0, lambda: False)  # returns: nobody can read what is left
    assert not pipe.write(b"y" * (2 << 20), lambda: False)
    os.close(w)
