"""Store checkpoint image files as zstd frames, (de)compressed a frame per CPU, checksummed."""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar, cast

import zstandard

from ccr.errors import IntegrityError, StorageError, UsageError
from ccr.storage.hashing import DEFAULT_ALGORITHM, ThreadedDigest, digest_of
from ccr.storage.manifest import FRAME_BYTES, FileEntry, Frame

# Level 1 with threads=-1 (perf-baselines.md §3, scripts/bench.py): on training-like pages it
# compresses at ~700 MB/s on 2 cores; levels 3 and 9 stored no less (4 GiB: 2.34x at level 1,
# 2.21x at 3, 2.28x at 9) and took 1.3x and 4x as long.
DEFAULT_LEVEL = 1
MAX_LEVEL: int = zstandard.MAX_COMPRESSION_LEVEL
# ZSTD_minCLevel() of libzstd >= 1.4: the fastest "negative" level.
MIN_LEVEL = -(1 << 17)

SUFFIX = ".zst"
# Files below this stay uncompressed (codec "none"): CRIU's metadata images (tens of KB in
# all) gain nothing worth a frame each, and kept raw they stay readable by crit.
SMALL_FILE = 64 * 1024

# Raw bytes per zstd frame.  Independent frames let both directions use every core: libzstd
# decodes a frame on one thread (~1.3 GB/s here), so one frame per file capped restores at
# that.  8 MiB frames cost <1% of ratio at level 1 (1 GiB realistic pages: 467.8 vs 464.8 MB)
# and keep what is in flight small: (workers + 1) frames, raw and compressed.
FRAME_SIZE = FRAME_BYTES
# Frames stating more (or no) content size are decoded as a stream, not in memory: files
# written before ccr cut frames (one frame per file), or by other zstd tools.
_MAX_FRAME = 64 << 20
# Reads while unpacking or copying: large enough that Python's per-call cost vanishes,
# small enough that memory stays flat.
_CHUNK = 4 << 20

Progress = Callable[[int], None]

# Threads per file: the CPUs this process may run on (a Slurm step's cpuset, not the node's).
WORKERS = max(1, min(len(os.sched_getaffinity(0)), 32))

_SPEC = re.compile(r"zstd(?::(-?[0-9]{1,7}))?")


@dataclass(frozen=True)
class Codec:
    """How image files are stored: "zstd" at a level, or "none" (level 0)."""

    name: str
    level: int

    @property
    def spec(self) -> str:
        """The text parse_codec reads back ("zstd:1", "none"), e.g. for a manifest."""
        return f"zstd:{self.level}" if self.name == "zstd" else "none"


def parse_codec(text: str) -> Codec:
    """Read "none", "zstd" (DEFAULT_LEVEL) or "zstd:LEVEL"; anything else is a UsageError."""
    spec = text.strip().lower()
    if spec == "none":
        return Codec("none", 0)
    match = _SPEC.fullmatch(spec)
    if match is not None:
        if match.group(1) is None:
            return Codec("zstd", DEFAULT_LEVEL)
        level = int(match.group(1))
        # Level 0 means "libzstd's default" (3), which would make the stored level lie.
        if level != 0 and MIN_LEVEL <= level <= MAX_LEVEL:
            return Codec("zstd", level)
    raise UsageError(
        f"bad compression {text!r}: use none, zstd or zstd:LEVEL "
        f"(LEVEL 1..{MAX_LEVEL}, or {MIN_LEVEL}..-1 for zstd's fast levels)"
    )


def compress_file(src: Path, dst: Path, level: int) -> tuple[int, str]:
    """Compress src into dst (0600, fsync'd) as zstd frames of FRAME_SIZE raw bytes each.

    Every frame carries its content size and checksum and is compressed on its own thread.

    Returns the compressed size and the digest (BLAKE3) of the compressed bytes, both taken while
    writing.  On failure dst is removed and StorageError raised.
    """
    with _frame_buffers_reused():
        _, size, digest, _ = _compress(src, dst, level, None)
    return size, digest


def decompress_file(src: Path, dst: Path) -> int:
    """Decompress the zstd file src into dst (0600); return the decompressed size.

    A corrupted or truncated src raises IntegrityError naming it; dst is then removed.
    dst is not fsync'd: restores unpack into scratch space that a crash makes moot.
    """
    with _frame_buffers_reused():
        return _decompress(src, dst, None, None)


def compress_dir(
    src_dir: Path,
    dst_dir: Path,
    codec: Codec,
    progress: Progress | None = None,
    frames: dict[str, dict[str, Any]] | None = None,
) -> list[FileEntry]:
    """Store every regular file of src_dir in dst_dir (created 0700 if missing) with codec.

    With "zstd", a file of SMALL_FILE bytes or more becomes `<name>.zst`; smaller ones are
    copied unchanged with codec "none".  Every file is 0600 and fsync'd, and so is dst_dir.
    progress, if given, gets the raw bytes done so far (cumulative over the directory).
    Returns the entries sorted by source name; sizes and digests are those of the stored
    bytes, raw_size that of the original.  frames, if given, gets each compressed file's
    frame table: {"raw": FRAME_SIZE, "stored": [length of each frame]} (what lets a lazy
    restart find any frame without reading the file: StepManifest.frame_tables).
    """
    if codec.name not in ("zstd", "none"):
        raise UsageError(f"unknown codec {codec.name!r}")
    dst_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = 0

    def report(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done)

    entries: list[FileEntry] = []
    taken: set[str] = set()
    for path in _regular_files(src_dir):
        raw_size = path.stat().st_size
        packed = codec.name == "zstd" and raw_size >= SMALL_FILE
        name = path.name + SUFFIX if packed else path.name
        if name in taken:
            raise StorageError(f"cannot store both {name} and {path.name} in {dst_dir}")
        taken.add(name)
        if packed:
            lengths: list[int] = []
            with _frame_buffers_reused():
                raw_size, size, digest, digests = _compress(
                    path, dst_dir / name, codec.level, report, lengths
                )
            entries.append(
                FileEntry(name, size, digest, raw_size=raw_size, codec="zstd", frames=digests)
            )
            if frames is not None:
                frames[name] = {"raw": FRAME_SIZE, "stored": lengths}
        else:
            pieces: list[str] = []
            size, digest = _copy(path, dst_dir / name, None, report, pieces)
            entries.append(
                FileEntry(name, size, digest, raw_size=size, frames=pieces, frame_bytes=FRAME_BYTES)
            )
    _fsync_dir(dst_dir)
    return entries


def decompress_dir(
    src_dir: Path,
    dst_dir: Path,
    entries: list[FileEntry],
    progress: Progress | None = None,
    *,
    verify: bool = True,
) -> None:
    """Restore the files that compress_dir listed in entries into dst_dir, original names.

    With verify (the default) each stored file's size and digest are checked against its
    entry in the same read pass, so callers need not run verify_files first (a second read
    of everything); a mismatch raises IntegrityError naming the file.  Files go one after
    the other, largest first, each decoded a frame per thread, so progress, if given, is
    called from those threads, with the raw bytes done so far.  On failure the files written
    into dst_dir are removed.
    """
    dst_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    plan: list[tuple[FileEntry, Path, Path]] = []
    targets: set[str] = set()
    for entry in entries:
        _check_name(entry.name, src_dir)
        if entry.codec == "zstd" and entry.name.endswith(SUFFIX) and len(entry.name) > 4:
            target = entry.name[: -len(SUFFIX)]
        elif entry.codec == "none":
            target = entry.name
        else:
            raise IntegrityError(
                f"checkpoint file {src_dir / entry.name} has unknown codec {entry.codec!r}"
            )
        if target in targets:
            raise IntegrityError(f"checkpoint {src_dir} lists {target} twice")
        targets.add(target)
        plan.append((entry, src_dir / entry.name, dst_dir / target))

    lock = threading.Lock()
    done = 0

    def report(nbytes: int) -> None:
        nonlocal done
        with lock:
            done += nbytes
            if progress is not None:
                progress(done)

    # Largest first: a bad pages file, the likeliest to be damaged, fails the restore early.
    plan.sort(key=lambda item: item[0].size, reverse=True)
    try:
        for entry, src, dst in plan:
            expect = entry if verify else None
            if entry.codec == "zstd":
                with _frame_buffers_reused():
                    raw = _decompress(src, dst, expect, report)
                if verify and raw != entry.raw_size:
                    raise IntegrityError(
                        f"checkpoint file {src} unpacks to {raw} bytes, manifest says "
                        f"{entry.raw_size} (corrupted)"
                    )
            else:
                _copy(src, dst, expect, report)
    except BaseException:
        for _, _, dst in plan:
            dst.unlink(missing_ok=True)
        raise


# Frames read_verified keeps decoding ahead of its consumer: a consumer that waits on its
# reader (CRIU faulting in fresh memory) must not stall the decoding too.  At WORKERS
# frames ahead a streamed 1 GiB restore spent 0.7 s of 2.2 waiting for decoded frames.
# Bounded: (AHEAD + 1) frames, raw and stored, at most ~200 MiB with 32 workers.
AHEAD = min(2 * WORKERS + 1, 16)


def read_verified(
    src: Path, entry: FileEntry, frames: list[Frame] | None = None
) -> Iterator[bytes | memoryview]:
    """The raw bytes of the stored file src, in order and in pieces, checked against entry.

    For restores that hand the bytes on as they come (a stream to CRIU): nothing is
    written anywhere, and at most WORKERS + 1 frames (raw and stored) are in memory.
    Format 4 (entry.frames): each frame's digest is checked before any of its bytes are
    yielded, so no unverified byte ever leaves.  Older entries have only the whole file's
    digest: it is checked after the last piece, so a caller must hold back the effect of
    what it was given until the iteration ended (framed_entry tells which kind it is).
    A mismatch, a corrupted or a truncated file raises IntegrityError naming src.
    A piece may be a view of a buffer reused later: it is valid until the next is asked for.
    frames, a zstd file's frame table (StepManifest.frame_tables, with format 4), lets every
    frame be read, checked and decoded on a worker at its offset instead of walking the file.
    """
    ifh = _open_source(src, stored=True)
    with ifh, _frame_buffers_reused():
        try:
            # Read once, front to back: a larger readahead keeps a cold disk streaming.
            os.posix_fadvise(ifh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if entry.codec == "zstd" and frames and framed_entry(entry):
                yield from _read_zstd_framed(ifh.fileno(), src, entry, frames)
            elif entry.codec == "zstd":
                yield from _read_zstd(ifh, src, entry)
            elif entry.codec == "none":
                yield from _read_raw(ifh, src, entry)
            else:
                raise IntegrityError(f"checkpoint file {src} has unknown codec {entry.codec!r}")
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"compressed checkpoint file {src} is corrupted ({exc})") from None
        except OSError as exc:
            raise StorageError(f"cannot read {src}: {exc.strerror or exc}") from None


def framed_entry(entry: FileEntry) -> bool:
    """Whether read_verified checks entry's bytes before it yields them (format 4)."""
    return bool(entry.frames)


def _frame_mismatch(src: Path, index: int, offset: int) -> IntegrityError:
    return IntegrityError(
        f"checkpoint file {src} is corrupted (checksum mismatch in frame {index}, "
        f"at stored byte {offset})"
    )


def _read_raw(ifh: FileIO, src: Path, entry: FileEntry) -> Iterator[bytes | memoryview]:
    """read_verified of an uncompressed file: pieces read and hashed on workers, a few ahead."""
    if not framed_entry(entry):
        yield from _read_raw_whole(ifh, src, entry)
        return
    yield from _read_raw_framed(ifh.fileno(), src, entry)


def _read_raw_framed(fd: int, src: Path, entry: FileEntry) -> Iterator[memoryview]:
    """Format 4: each piece read (pread, at its offset) and checked on a worker.

    Pieces go into a ring of reused buffers (a fresh 8 MiB object per piece costs 2048 page
    faults on this VM); a piece's buffer is refilled AHEAD + 1 pieces later, after its
    consumer took it.
    """
    piece = entry.frame_bytes or FRAME_SIZE
    count = max(1, -(-entry.size // piece))
    if count != len(entry.frames):
        raise IntegrityError(
            f"checkpoint file {src} has {len(entry.frames)} frame digests for "
            f"{entry.size} bytes (corrupted manifest?)"
        )
    ring = [bytearray(min(piece, entry.size) or 1) for _ in range(min(count, AHEAD + 2))]

    def fill(index: int) -> memoryview:
        at = index * piece
        view = memoryview(ring[index % len(ring)])[: min(piece, entry.size - at)]
        _pread_exactly(fd, view, at, src, entry)
        if digest_of(view, entry.algorithm) != entry.frames[index]:
            raise _frame_mismatch(src, index, at)
        return view

    return _in_order(fd, src, entry, count, fill)


def _read_raw_whole(ifh: FileIO, src: Path, entry: FileEntry) -> Iterator[bytes]:
    """Older entries: one digest of the whole file, hashed on ThreadedDigest (which needs
    immutable bytes), known after the last piece."""
    piece = entry.frame_bytes or FRAME_SIZE
    whole = ThreadedDigest(entry.algorithm)
    size = 0
    try:
        while chunk := ifh.read(piece):
            whole.update(chunk)
            size += len(chunk)
            yield chunk
        if not size:
            yield b""  # an empty file: its one (empty) piece
    finally:
        whole.close()
    problem = _mismatch(src, entry, size, whole.hexdigest())
    if problem is not None:
        raise IntegrityError(problem)


def _read_zstd_framed(fd: int, src: Path, entry: FileEntry, frames: list[Frame]) -> Iterator[bytes]:
    """read_verified of a zstd file with its frame table: each frame read (pread, at its
    stored offset), checked and decoded on a worker."""
    if len(frames) != len(entry.frames):
        raise IntegrityError(
            f"manifest of {src.name}: {len(frames)} frames in its table, "
            f"{len(entry.frames)} digests"
        )
    local = threading.local()

    def unpack(index: int) -> bytes:
        frame = frames[index]
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < frame.length:
            buf = local.buf = bytearray(max(frame.length, FRAME_SIZE + (FRAME_SIZE >> 7)))
        view = memoryview(buf)[: frame.length]
        _pread_exactly(fd, view, frame.at, src, entry)
        if digest_of(view, entry.algorithm) != entry.frames[index]:
            raise _frame_mismatch(src, index, frame.at)
        dctx = getattr(local, "dctx", None)
        if dctx is None:
            dctx = local.dctx = zstandard.ZstdDecompressor()
        data = cast(bytes, dctx.decompress(view, max_output_size=frame.size))
        if len(data) != frame.size:
            raise zstandard.ZstdError(f"frame {index} is not {frame.size} bytes")
        return data

    return _in_order(fd, src, entry, len(frames), unpack)


_T = TypeVar("_T")


def _in_order(
    fd: int, src: Path, entry: FileEntry, count: int, task: Callable[[int], _T]
) -> Iterator[_T]:
    """task(0) ... task(count - 1) run on WORKERS threads, AHEAD ahead of the consumer, and
    their results yielded in order; then the stored file must end where entry says.

    Each piece read at its own offset, the disk streams while the consumer (CRIU, through a
    pipe) copies and faults in what it was given: read in the consumer's thread instead, a
    1 GiB uncompressed restore paid the disk's 1.2 s and CRIU's 1.0 s one after the other.
    """
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ccr-verify") as pool:
        pending: deque[Future[_T]] = deque()
        submitted = 0
        try:
            for _ in range(count):
                while submitted < count and len(pending) <= AHEAD:
                    pending.append(pool.submit(task, submitted))
                    submitted += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    if os.pread(fd, 1, entry.size):
        raise IntegrityError(
            f"checkpoint file {src} is longer than the {entry.size} bytes its manifest says"
        )


def _pread_exactly(fd: int, view: memoryview, at: int, src: Path, entry: FileEntry) -> None:
    """Fill view from the stored file at offset at; a short file is truncated."""
    got = 0
    while got < len(view) and (n := os.preadv(fd, [view[got:]], at + got)):
        got += n
    if got != len(view):
        raise IntegrityError(
            f"checkpoint file {src} is {at + got} bytes, manifest says {entry.size} (truncated?)"
        )


def _read_zstd(ifh: FileIO, src: Path, entry: FileEntry) -> Iterator[bytes | memoryview]:
    """read_verified of a zstd file: frames checked and decoded on workers, in order."""
    framed = framed_entry(entry)
    source = _WalkingReader(ifh, None if framed else entry.algorithm)
    walker = source.walker
    local = threading.local()

    def unpack(frame: bytes, index: int, at: int, size: int) -> bytes:
        if framed and (index >= len(entry.frames) or digest_of(frame) != entry.frames[index]):
            raise _frame_mismatch(src, index, at)
        dctx = getattr(local, "dctx", None)
        if dctx is None:
            dctx = local.dctx = zstandard.ZstdDecompressor()
        data = cast(bytes, dctx.decompress(frame))
        if len(data) != size:
            raise zstandard.ZstdError(f"frame {index} is not {size} bytes")
        return data

    parts: list[bytes] = []
    raw = index = 0
    start = 0  # stored offset of the frame being collected
    yielded = False
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="ccr-unzstd") as pool:
            pending: deque[Future[bytes]] = deque()
            while not walker.bad and (chunk := source.read(_CHUNK)):
                base = source.size - len(chunk)
                cut = 0
                for end, size in walker.take_ended():
                    parts.append(chunk[cut : end - base])
                    cut = end - base
                    frame = b"".join(parts)
                    parts.clear()
                    at, start = start, base + cut
                    if size is None:  # a skippable frame: nothing to decode
                        continue
                    pending.append(pool.submit(unpack, frame, index, at, size))
                    index += 1
                    raw += size
                    while len(pending) > AHEAD:
                        yielded = True
                        yield pending.popleft().result()
                parts.append(chunk[cut:])
                if walker.unsized:
                    break
            if walker.unsized:
                for future in pending:
                    future.cancel()
                pending.clear()
            while pending:
                yielded = True
                yield pending.popleft().result()
        if walker.unsized:
            # A file of one unsized (or huge) frame, from before ccr cut frames: one stream.
            if framed or yielded:
                raise IntegrityError(
                    f"compressed checkpoint file {src} is corrupted (a frame without its size)"
                )
            source.close()
            ifh.seek(0)
            source = _WalkingReader(ifh, entry.algorithm)
            walker = source.walker
            raw = 0
            for data in zstandard.ZstdDecompressor().read_to_iter(
                _io(source), read_size=_CHUNK, write_size=_CHUNK
            ):
                raw += len(data)
                yield data
        digest = source.hexdigest()
    finally:
        source.close()
    problem = None
    if walker.bad:
        problem = f"compressed checkpoint file {src} is corrupted (bad zstd frame structure)"
    if problem is None and framed and index != len(entry.frames):
        problem = (
            f"compressed checkpoint file {src} is corrupted ({index} frames, "
            f"manifest says {len(entry.frames)})"
        )
    if problem is None and digest is not None:
        problem = _mismatch(src, entry, source.size, digest)
    if problem is None and source.size != entry.size:
        problem = _mismatch(src, entry, source.size, entry.digest)
    if problem is None and not walker.complete:
        problem = f"compressed checkpoint file {src} is truncated (zstd frame incomplete)"
    if problem is None and raw != entry.raw_size:
        problem = (
            f"checkpoint file {src} unpacks to {raw} bytes, manifest says "
            f"{entry.raw_size} (corrupted)"
        )
    if problem is not None:
        raise IntegrityError(problem)


# --- internals -----------------------------------------------------------------------------


def _compress(
    src: Path,
    dst: Path,
    level: int,
    report: Progress | None,
    lengths: list[int] | None = None,
) -> tuple[int, int, str, list[str]]:
    """(raw size, compressed size, digest of the compressed bytes, digest of each frame) of
    src compressed to dst; lengths, if given, gets the length of each frame.

    This thread reads FRAME_SIZE pieces and writes (and hashes) their frames in order; the
    workers compress a piece each and digest its frame, at most WORKERS + 1 pieces being in
    flight.
    """
    local = threading.local()

    def pack(piece: memoryview) -> tuple[bytes, str]:
        cctx = getattr(local, "cctx", None)
        if cctx is None:  # a compression context is not thread-safe: one per worker
            cctx = local.cctx = zstandard.ZstdCompressor(
                level=level, write_checksum=True, write_content_size=True
            )
        frame = cast(bytes, cctx.compress(piece))
        return frame, digest_of(frame)

    # Pieces are read into a few reused buffers: a fresh 8 MiB object per piece would cost
    # page faults (and, on a VM, memory the host must hand back) for every frame.
    spare = [bytearray(FRAME_SIZE) for _ in range(WORKERS + 1)]
    raw = 0
    frames: list[str] = []
    try:
        with src.open("rb", buffering=0) as ifh:
            fd = _create(dst)
            try:
                with (
                    HashingWriter(fd) as sink,
                    ThreadPoolExecutor(WORKERS, thread_name_prefix="ccr-zstd") as pool,
                ):
                    pending: deque[tuple[Future[tuple[bytes, str]], bytearray, int]] = deque()
                    try:
                        while True:
                            buf = spare.pop()
                            size = _read_into(ifh, buf)
                            if size or raw == 0:  # an empty file still gets its empty frame
                                piece = memoryview(buf)[:size]
                                pending.append((pool.submit(pack, piece), buf, size))
                                raw += size
                            else:
                                spare.append(buf)
                            last = size < FRAME_SIZE
                            while pending and (len(pending) > WORKERS or last):
                                future, done, n = pending.popleft()
                                frame, frame_digest = future.result()
                                sink.write(frame)
                                frames.append(frame_digest)
                                if lengths is not None:
                                    lengths.append(len(frame))
                                spare.append(done)
                                if report is not None and n:
                                    report(n)
                            if last:
                                break
                    finally:
                        for future, _, _ in pending:
                            future.cancel()
                    digest = sink.hexdigest()
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        dst.unlink(missing_ok=True)
        raise StorageError(
            f"cannot compress {src} into {dst}: {exc.strerror or exc}", errno=exc.errno
        ) from None
    except zstandard.ZstdError as exc:
        dst.unlink(missing_ok=True)
        raise StorageError(f"cannot compress {src}: {exc}") from None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return raw, sink.size, digest, frames


def _decompress(src: Path, dst: Path, expect: FileEntry | None, report: Progress | None) -> int:
    """Unpack src into dst (0600), checking it against expect if given; the raw size.

    Files of sized frames (what _compress writes) are decoded a frame per worker, each
    written at its offset; others (one big frame, or frames without a size) as one stream.
    A corrupted, truncated or mismatching src raises IntegrityError naming it; errors remove
    dst.  dst is not fsync'd: restores unpack into scratch space that a crash makes moot.
    """
    ifh = _open_source(src, stored=True)
    source = _WalkingReader(ifh, expect.algorithm if expect else None)
    try:
        with ifh:
            fd = _create(dst)
            try:
                try:
                    size = _unpack_frames(source, fd, report)
                except _NotFramed:
                    source.close()
                    ifh.seek(0)
                    os.ftruncate(fd, 0)
                    source = _WalkingReader(ifh, expect.algorithm if expect else None)
                    size = _unpack_stream(source, fd, report)
                digest = source.hexdigest()
            finally:
                os.close(fd)
    except zstandard.ZstdError as exc:
        dst.unlink(missing_ok=True)
        raise IntegrityError(f"compressed checkpoint file {src} is corrupted ({exc})") from None
    except OSError as exc:
        dst.unlink(missing_ok=True)
        raise StorageError(
            f"cannot decompress {src} into {dst}: {exc.strerror or exc}", errno=exc.errno
        ) from None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    walker = source.walker
    problem = None
    if walker.bad:  # reading stopped there, so the size and digest checks would mislead
        problem = f"compressed checkpoint file {src} is corrupted (bad zstd frame structure)"
    if problem is None and expect is not None and digest is not None:
        problem = _mismatch(src, expect, source.size, digest)
    if problem is None and not walker.complete:
        # zstandard's streaming decoders stop quietly at the end of the input, mid-frame or
        # not (even before the checksum): only the frame walk tells a truncated file apart.
        problem = f"compressed checkpoint file {src} is truncated (zstd frame incomplete)"
    if problem is not None:
        dst.unlink(missing_ok=True)
        raise IntegrityError(problem)
    return size


class _NotFramed(Exception):
    """The file has a frame without a content size, or with one over _MAX_FRAME."""


def _unpack_frames(source: _WalkingReader, fd: int, report: Progress | None) -> int:
    """Decode each complete frame on a worker, written at its raw offset; the raw size."""
    local = threading.local()

    def unpack(frame: bytes, offset: int, size: int) -> None:
        dctx = getattr(local, "dctx", None)
        if dctx is None:
            dctx = local.dctx = zstandard.ZstdDecompressor()
        # One-shot: libzstd checks the frame's checksum and its stated size.
        data = dctx.decompress(frame)
        if len(data) != size:
            raise zstandard.ZstdError(f"frame at raw offset {offset} is not {size} bytes")
        view, done = memoryview(data), 0
        while done < size:
            done += os.pwrite(fd, view[done:], offset + done)
        if report is not None:
            report(size)

    walker = source.walker
    parts: list[bytes] = []
    raw = 0
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ccr-unzstd") as pool:
        pending: deque[Future[None]] = deque()
        try:
            while not walker.bad and (chunk := source.read(_CHUNK)):
                base = source.size - len(chunk)
                cut = 0
                for end, size in walker.take_ended():
                    parts.append(chunk[cut : end - base])
                    cut = end - base
                    frame = b"".join(parts)
                    parts.clear()
                    if size is None:  # a skippable frame: nothing to decode
                        continue
                    pending.append(pool.submit(unpack, frame, raw, size))
                    raw += size
                    while len(pending) > WORKERS:
                        pending.popleft().result()
                parts.append(chunk[cut:])
                if walker.unsized:
                    raise _NotFramed
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    return raw


def _unpack_stream(source: _WalkingReader, fd: int, report: Progress | None) -> int:
    """Decode src as one stream on this thread; the raw size."""
    sink = _CountingWriter(fd, report)
    zstandard.ZstdDecompressor().copy_stream(
        _io(source), _io(sink), read_size=_CHUNK, write_size=_CHUNK
    )
    return sink.size


def _copy(
    src: Path,
    dst: Path,
    expect: FileEntry | None,
    report: Progress | None,
    frames: list[str] | None = None,
) -> tuple[int, str]:
    """Copy src to dst (0600): (size, digest).

    Without expect (storing) dst is fsync'd; with expect (unpacking a stored file) size and
    digest are checked against it instead.  frames, if given, gets the digest of each
    FRAME_SIZE piece (format 4).
    """
    size = 0
    ifh = _open_source(src, stored=expect is not None)
    try:
        with ifh, ThreadedDigest(expect.algorithm if expect else DEFAULT_ALGORITHM) as digest:
            fd = _create(dst)
            try:
                while chunk := ifh.read(FRAME_SIZE):
                    if frames is not None:
                        frames.append(digest_of(chunk))
                    digest.update(chunk)
                    _write_all(fd, memoryview(chunk))
                    size += len(chunk)
                    if report is not None:
                        report(len(chunk))
                if expect is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
            hexdigest = digest.hexdigest()
            if frames is not None and not frames:
                frames.append(digest_of(b""))
    except OSError as exc:
        dst.unlink(missing_ok=True)
        raise StorageError(
            f"cannot copy {src} to {dst}: {exc.strerror or exc}", errno=exc.errno
        ) from None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    if expect is not None:
        problem = _mismatch(src, expect, size, hexdigest)
        if problem is not None:
            dst.unlink(missing_ok=True)
            raise IntegrityError(problem)
    return size, hexdigest


def _open_source(src: Path, stored: bool) -> FileIO:
    try:
        return src.open("rb", buffering=0)
    except FileNotFoundError:
        if stored:  # a stored file that is gone is a broken checkpoint
            raise IntegrityError(f"checkpoint file missing: {src}") from None
        raise StorageError(f"cannot read {src}: no such file") from None
    except OSError as exc:
        raise StorageError(f"cannot read {src}: {exc.strerror or exc}", errno=exc.errno) from None


def _mismatch(src: Path, expect: FileEntry, size: int, digest: str) -> str | None:
    # Same wording as manifest.verify_files, so users see one vocabulary.
    if size != expect.size:
        return f"checkpoint file {src} is {size} bytes, manifest says {expect.size} (truncated?)"
    if digest != expect.digest:
        return f"checkpoint file {src} is corrupted (checksum mismatch)"
    return None


def _io(stream: object) -> IO[bytes]:
    # zstandard calls only read() or write(); its stubs ask for a whole IO[bytes].
    return cast(IO[bytes], stream)


def _create(path: Path) -> int:
    # O_NOFOLLOW: a planted symlink must not redirect a root-owned write.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_into(fh: FileIO, buf: bytearray) -> int:
    """Fill buf from fh; fewer bytes only at the end of the file."""
    view = memoryview(buf)
    got = 0
    while got < len(buf) and (n := fh.readinto(view[got:])):
        got += n
    return got


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _regular_files(directory: Path) -> list[Path]:
    with os.scandir(directory) as it:
        names = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
    return [directory / name for name in names]


def _check_name(name: str, directory: Path) -> None:
    # Names come from a signed manifest, but a path must never leave the image directory.
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise IntegrityError(f"checkpoint {directory} lists a bad file name {name!r}")


class HashingWriter:
    """A sink for compressed output: writes to fd, hashing (on a thread) and counting.

    hexdigest() ends the hashing thread; so does leaving it as a context manager.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._digest = ThreadedDigest()
        self.size = 0

    def write(self, data: bytes) -> int:
        data = bytes(data) if not isinstance(data, bytes) else data
        self._digest.update(data)
        _write_all(self.fd, memoryview(data))
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._digest.__exit__(None, None, None)


class _CountingWriter:
    """copy_stream's sink for decompression: counts the raw bytes and reports progress."""

    def __init__(self, fd: int, report: Progress | None) -> None:
        self.fd = fd
        self.report = report
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        _write_all(self.fd, view)
        self.size += len(view)
        if self.report is not None:
            self.report(len(view))
        return len(view)


class _WalkingReader:
    """A source that feeds a frame walker (and, if given an algorithm, a digest) what it reads."""

    def __init__(self, fh: BinaryIO, algorithm: str | None) -> None:
        self.fh = fh
        self.walker = _FrameWalker()
        self.digest = ThreadedDigest(algorithm) if algorithm else None
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        if data:
            self.size += len(data)
            self.walker.feed(data)
            if self.digest is not None:
                self.digest.update(data)
        return data

    def hexdigest(self) -> str | None:
        return None if self.digest is None else self.digest.hexdigest()

    def close(self) -> None:
        if self.digest is not None:
            self.digest.__exit__(None, None, None)


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50


class _FrameWalker:
    """Follows the zstd frame format (RFC 8878 §3.1) across chunks, reading headers only.

    It tells whether the input ended exactly at the end of a frame.  zstandard's streaming
    decoders cannot: they return what they decoded when input runs out, even mid-block or
    before the checksum.  It also records where each frame ends and what its header says
    its content size is, so frames can be cut apart and decoded in parallel.  Cost: a few
    Python operations per block (<= 128 KiB raw).
    """

    def __init__(self) -> None:
        # The structure being collected: magic, fhd (descriptor), fcs (content size), block,
        # skipsize (of a skippable frame).
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0  # payload bytes to pass over before the next structure
        self._checksum = False
        self._fed = 0  # bytes fed before the current chunk
        self._size: int | None = None  # the current frame's content size
        self._ended: list[tuple[int, int | None]] = []
        self.frames = 0
        self.bad = False
        # A zstd frame's header stated no content size, or one over _MAX_FRAME.
        self.unsized = False

    @property
    def complete(self) -> bool:
        return (
            not self.bad
            and self.frames > 0
            and self._state == "magic"
            and not self._buf
            and self._skip == 0
        )

    def take_ended(self) -> list[tuple[int, int | None]]:
        """Frames fed to their end since the last call: (end offset in the input, size).

        The size is None for a skippable frame, which holds no content.
        """
        # A frame is known to end where its last block's header says, before that is fed.
        count = sum(1 for end, _ in self._ended if end <= self._fed)
        ended, self._ended = self._ended[:count], self._ended[count:]
        return ended

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and not self.bad:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                value = int.from_bytes(self._buf, "little")
                self._buf.clear()
                self._advance(value, self._fed + pos)
        self._fed += end

    def _advance(self, value: int, at: int) -> None:
        """Take the structure that ends at input offset at."""
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._state, self._need = "skipsize", 4
            else:
                self.bad = True
        elif self._state == "fhd":
            fcs_flag, single, reserved = value >> 6, (value >> 5) & 1, (value >> 3) & 1
            if reserved:
                self.bad = True
                return
            self._checksum = bool((value >> 2) & 1)
            window = 0 if single else 1
            dict_id = (0, 1, 2, 4)[value & 3]
            fcs = (1 if single else 0, 2, 4, 8)[fcs_flag]
            self._skip = window + dict_id
            if fcs:
                self._state, self._need = "fcs", fcs
            else:
                self._sized(None)
        elif self._state == "fcs":
            self._sized(value + 256 if self._need == 2 else value)
        elif self._state == "block":
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:  # reserved block type
                self.bad = True
                return
            self._skip = 1 if kind == 1 else size  # an RLE block stores one byte
            if last:
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4
                self._ended.append((at + self._skip, self._size))
                self.frames += 1
        else:  # skipsize
            self._skip = value
            self._state, self._need = "magic", 4
            self._ended.append((at + value, None))
            self.frames += 1

    def _sized(self, size: int | None) -> None:
        self._size = size
        if size is None or size > _MAX_FRAME:
            self.unsized = True
        self._state, self._need = "block", 3


# glibc mallopt() parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' documented defaults


@contextmanager
def _frame_buffers_reused() -> Iterator[None]:
    """Let glibc reuse freed frame buffers instead of unmapping and faulting them in again.

    Each frame's (de)compressed output is a new object of up to FRAME_SIZE bytes.  glibc
    serves those with a fresh mmap() and returns them with munmap(), so every frame pays
    2048 page faults and zeroing (on this VM: memory the host may have reclaimed); that cost
    measured 10-40% of compression throughput on incompressible pages.  Raising both
    thresholds keeps them in the heap for the operation; afterwards malloc_trim() hands the
    memory back (ccr's supervisors are long-lived) and the defaults return.  Elsewhere than
    glibc this does nothing.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    trim = getattr(_LIBC, "malloc_trim", None)
    if mallopt is None or trim is None:
        yield
        return
    with _TUNING_LOCK:
        global _TUNED
        if _TUNED == 0:
            mallopt(_M_MMAP_THRESHOLD, 4 * FRAME_SIZE)
            mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _TUNED += 1
    try:
        yield
    finally:
        with _TUNING_LOCK:
            _TUNED -= 1
            if _TUNED == 0:
                mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
                mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
                trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_TUNING_LOCK = threading.Lock()
_TUNED = 0
