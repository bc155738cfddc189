"""Lazy restore: ccr serves a restored tree's private memory by userfaultfd, from the images.

CRIU restores the tree without the pages of its private anonymous mappings (`lazy_pages`
in the restore request) and, as CRIU's own `criu lazy-pages` daemon expects, hands each
task's userfaultfd to whoever listens on `lazy-pages.socket` in the restore's work dir
(criu/uffd.c: a stream of `int vpid` + the fd by SCM_RIGHTS per task, a negative vpid and
no fd for a zombie, then LAZY_PAGES_RESTORE_FINISHED).  Two processes then hold every uffd:

* the keeper (Keeper, a thread of the restore's supervisor) receives them from CRIU, so
  none is ever held by one process only, and kills the job if the server dies or fails;
* the server (`python -m ccr.engines.page_server`, Server) reads the faults and events,
  answers each fault with UFFDIO_COPY of the whole zstd frame that holds it (8 MiB: the
  window around the fault first), while a worker per core copies every other frame in
  order (the background fill).  When every page is in (and every stored file it served
  from matched its digest) it says so and exits; the uffds are closed, which from then on
  is harmless: the only missing pages left are holes, which read as zeros anyway.

Were the uffds closed while pages are still missing, the kernel would let the job read
zeros there: with two holders that takes both dying; one dying makes the other kill the
job (SIGKILL of its PID namespace's init) first.  A frame that fails its zstd checksum,
or a stored file whose digest does not match its signed manifest, kills the job with the
file named: the faulting thread never gets the page.

What is never lazy (CRIU's vma_entry_can_be_lazy and is_stack): shared memory (MAP_SHARED,
SysV shm, memfd and tmpfs mappings), file mappings, hugetlb, mlocked (MAP_LOCKED)
mappings, vDSO/vvar/vsyscall, and the page holding each thread's stack pointer.  CRIU
restores those before the tree runs.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import errno
import json
import mmap
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from ccr.deadline import Deadline
from ccr.errors import CcrError, IntegrityError
from ccr.storage.manifest import FileEntry, Frame, frames_of

PAGE = mmap.PAGESIZE
SOCKET_NAME = "lazy-pages.socket"
# criu/uffd.c: sent by the restore once every task has its uffd.
RESTORE_FINISHED = 0x52535446
# Pagemap flags (criu/include/pagemap.h).
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
# The window copied first around a fault; the rest of its frame follows at once.  256 KiB
# is 64 pages: a sequential reader faults once per frame, not once per page.
FAULT_WINDOW = 256 << 10
# A fault in a hole (a page never touched before the dump) maps the zero page over the
# hole around it, up to this much.
ZERO_WINDOW = 2 << 20
# Threads copying frames in the background: the CPUs ccr may use (zstd and UFFDIO_COPY
# both run without the GIL).
WORKERS = max(1, min(len(os.sched_getaffinity(0)), 32))

# linux/userfaultfd.h (x86-64 and arm64 share these numbers).
_UFFD_EVENT_PAGEFAULT, _UFFD_EVENT_FORK, _UFFD_EVENT_REMAP = 0x12, 0x13, 0x14
_UFFD_EVENT_REMOVE, _UFFD_EVENT_UNMAP = 0x15, 0x16
_MSG_SIZE = 32


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    return ((2 if read_only else 3) << 30) | (size << 16) | (0xAA << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class _Zero(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_WAKE = _iowr(0x02, ctypes.sizeof(_Range), read_only=True)
UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _iowr(0x04, ctypes.sizeof(_Zero))

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class NotLazy(CcrError):
    """This checkpoint cannot be restored lazily (said why); an eager restore can."""


class ProcessGone(Exception):
    """The address space of a uffd is gone (its process exited)."""


# --- what the images say -------------------------------------------------------------------


@dataclass
class Segment:
    """Lazy pages contiguous in a task's memory and in its pages file, inside one VMA."""

    vaddr: int
    size: int
    offset: int  # in the raw pages file


@dataclass
class TaskPages:
    """One task's lazy memory: where it lies in its pages file, and what CRIU reads itself."""

    vpid: int
    pages_file: str  # raw name, e.g. pages-3.img
    segments: list[Segment] = field(default_factory=list)
    vmas: list[tuple[int, int]] = field(default_factory=list)  # lazy VMAs (registered)
    eager: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) CRIU reads


# mmap flags and CRIU's VMA status bits (criu/include/image.h).
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_LOCKED, _MAP_HUGETLB = 0x02, 0x20, 0x2000, 0x40000
_VMA_AREA_VSYSCALL, _VMA_AREA_VDSO, _VMA_AREA_VVAR = 1 << 2, 1 << 3, 1 << 12


def lazy_vma(vma: dict[str, Any]) -> bool:
    """CRIU's vma_entry_can_be_lazy: what its restorer registers with the task's uffd."""
    flags, status = int(vma.get("flags", 0)), int(vma.get("status", 0))
    private_anon = _MAP_PRIVATE | _MAP_ANONYMOUS
    special = (_VMA_AREA_VSYSCALL, _VMA_AREA_VDSO, _VMA_AREA_VVAR)
    return (
        flags & private_anon == private_anon
        and not flags & (_MAP_LOCKED | _MAP_HUGETLB)
        and not any(status & bit == bit for bit in special)
    )


_PAGEMAP = re.compile(r"pagemap-([0-9]+)\.img")


def task_pages(images: Path) -> list[TaskPages]:
    """Each task's lazy layout, from its pagemap and mm images in images (raw)."""
    from pycriu import images as pimg

    tasks = []
    for path in sorted(images.glob("pagemap-*.img")):
        match = _PAGEMAP.fullmatch(path.name)
        if match is None:
            continue  # pagemap-shmem-*: shared memory, restored by CRIU
        vpid = int(match.group(1))
        with path.open("rb") as fh:
            entries = pimg.load(fh)["entries"]
        with (images / f"mm-{vpid}.img").open("rb") as fh:
            vmas = [v for v in pimg.load(fh)["entries"][0].get("vmas", []) if lazy_vma(v)]
        spans = sorted((int(v["start"]), int(v["end"])) for v in vmas)
        task = TaskPages(vpid, f"pages-{int(entries[0]['pages_id'])}.img", vmas=spans)
        offset = 0
        for pe in entries[1:]:
            flags = int(pe.get("flags", PE_PRESENT))
            size = int(pe["nr_pages"]) * PAGE
            if not flags & PE_PRESENT:
                if flags & PE_PARENT:
                    raise NotLazy("its pages are in a parent checkpoint (an incremental dump)")
                if flags & PE_LAZY:
                    raise NotLazy("its pages were never stored (a lazy dump)")
                continue
            if flags & PE_LAZY:
                _split_at_vmas(task, int(pe["vaddr"]), size, offset)
            else:
                task.eager.append((offset, size))
            offset += size
        tasks.append(task)
    return tasks


def _split_at_vmas(task: TaskPages, vaddr: int, size: int, offset: int) -> None:
    # UFFDIO_COPY stays inside one VMA (criu/uffd.c collect_iovs splits alike).  CRIU cuts
    # its pagemap into entries of at most 1 MiB: runs that continue the last segment in
    # memory, in the file and in the same VMA extend it (4 GiB: 4096 entries, a few runs).
    end = vaddr + size
    first = max(0, bisect.bisect_right(task.vmas, (vaddr, 1 << 64)) - 1)
    for start, stop in task.vmas[first:]:
        if start >= end:
            break
        lo, hi = max(vaddr, start), min(end, stop)
        if lo >= hi:
            continue
        last = task.segments[-1] if task.segments else None
        if (
            last is not None
            and last.vaddr + last.size == lo
            and last.offset + last.size == offset + lo - vaddr
            and lo > start  # (not across a VMA boundary)
        ):
            last.size += hi - lo
        else:
            task.segments.append(Segment(lo, hi - lo, offset + lo - vaddr))


def frame_index(path: Path, max_frame: int = 64 << 20) -> list[Frame]:
    """The frames of a zstd file (RFC 8878 §3.1), from their headers: a few bytes per block."""
    frames: list[Frame] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end, pos, raw = os.fstat(fd).st_size, 0, 0
        while pos < end:
            head = os.pread(fd, 18, pos)
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528 or len(head) < 6:
                raise IntegrityError(f"compressed checkpoint file {path} is corrupted (bad frame)")
            fhd = head[4]
            single = (fhd >> 5) & 1
            fcs_len = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
            if fcs_len == 0:
                raise NotLazy(f"{path.name} has a frame without a content size")
            size = int.from_bytes(head[at : at + fcs_len], "little") + (256 if fcs_len == 2 else 0)
            if size > max_frame:
                raise NotLazy(f"{path.name} is stored as frames over {max_frame >> 20} MiB")
            block = pos + at + fcs_len
            while True:
                bh = os.pread(fd, 3, block)
                if len(bh) < 3:
                    raise IntegrityError(f"compressed checkpoint file {path} is truncated")
                value = int.from_bytes(bh, "little")
                kind = (value >> 1) & 3
                block += 3 + (1 if kind == 1 else value >> 3)
                if value & 1:
                    break
            block += 4 if (fhd >> 2) & 1 else 0
            if block > end:
                raise IntegrityError(f"compressed checkpoint file {path} is truncated")
            frames.append(Frame(raw, size, pos, block - pos))
            raw, pos = raw + size, block
    finally:
        os.close(fd)
    return frames


@dataclass
class ServedFile:
    """A stored pages file the server reads: compressed (frames) or not (whole)."""

    name: str  # raw name
    path: str  # the stored file
    codec: str
    raw_size: int
    digest: str
    algorithm: str
    frames: list[Frame] = field(default_factory=list)
    # The signed digest of each frame as stored (a manifest's FileEntry.frames, format 4):
    # each frame is checked before a byte of it is served.  Empty: only the whole file's
    # digest, checked in the background (Plan.verify).
    digests: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What the server needs: the files it serves from and each task's layout."""

    files: list[ServedFile]
    tasks: list[TaskPages]
    # Stored files checked against their digests in the background (uncompressed pages
    # files the eager path would have hashed before CRIU runs): (path, digest, algorithm).
    verify: list[tuple[str, str, str]] = field(default_factory=list)
    fill_rate: int = 0  # bytes a second the background fill may copy; 0: no limit

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        files = [
            ServedFile(**{**f, "frames": [Frame(*fr.values()) for fr in f["frames"]]})
            for f in data["files"]
        ]
        tasks = [
            TaskPages(
                t["vpid"],
                t["pages_file"],
                [Segment(**s) for s in t["segments"]],
                [tuple(v) for v in t["vmas"]],  # type: ignore[misc]
                [tuple(e) for e in t["eager"]],  # type: ignore[misc]
            )
            for t in data["tasks"]
        ]
        verify = [tuple(v) for v in data["verify"]]
        return cls(files, tasks, verify, int(data.get("fill_rate", 0)))  # type: ignore[arg-type]

    @property
    def lazy_bytes(self) -> int:
        return sum(s.size for t in self.tasks for s in t.segments)


# Uncompressed pages files are served (and, in format 4 manifests, digested) in pieces of
# this many bytes (compression.FRAME_SIZE).
_RAW_STEP = 8 << 20
_PAGES = re.compile(r"pages-[0-9]+\.img")


def deferred(entry: FileEntry) -> bool:
    """Whether a lazy restart checks this stored file's digest after the tree runs (the
    server, reading it anyway) rather than before: the pages files."""
    raw = entry.name.removesuffix(".zst") if entry.codec == "zstd" else entry.name
    return _PAGES.fullmatch(raw) is not None


def prepare(
    stored: Path,
    entries: list[FileEntry],
    raw_dir: Path | None,
    frames: dict[str, dict[str, Any]] | None = None,
) -> Plan:
    """Make the image CRIU restores lazily; return what the server serves from.

    raw_dir (compressed checkpoints): every file is unpacked there (and its digest checked)
    except the tasks' pages files, which become sparse files holding only the pages CRIU
    itself reads (the non-lazy ones: a few MiB); the server reads the rest from the stored
    frames.  None (uncompressed): CRIU reads the stored directory as it is.
    """
    from ccr.engines.compression import SUFFIX, decompress_dir

    by_raw = {(e.name.removesuffix(SUFFIX) if e.codec == "zstd" else e.name): e for e in entries}
    if raw_dir is not None:
        decompress_dir(stored, raw_dir, [e for e in entries if not deferred(e)])
    tasks = task_pages(raw_dir or stored)
    task_files = {t.pages_file for t in tasks}
    plan = Plan([], tasks)
    for raw, entry in sorted(by_raw.items()):
        if not deferred(entry):
            continue
        if raw not in task_files:  # shared memory's pages: CRIU restores them
            if raw_dir is not None:
                decompress_dir(stored, raw_dir, [entry])
            else:
                plan.verify.append((str(stored / entry.name), entry.digest, entry.algorithm))
            continue
        served = ServedFile(
            raw,
            str(stored / entry.name),
            entry.codec,
            entry.raw_size,
            entry.digest,
            entry.algorithm,
        )
        if entry.codec == "zstd":
            served.frames = frames_of(entry, (frames or {}).get(entry.name)) or frame_index(
                stored / entry.name
            )
            if sum(f.size for f in served.frames) != entry.raw_size:
                raise IntegrityError(
                    f"checkpoint file {stored / entry.name} unpacks to "
                    f"{sum(f.size for f in served.frames)} bytes, manifest says {entry.raw_size}"
                )
            assert raw_dir is not None
            eager = [r for t in tasks if t.pages_file == raw for r in t.eager]
            _write_sparse(stored / entry.name, raw_dir / raw, served, eager)
        digests = list(getattr(entry, "frames", None) or [])
        pieces = len(served.frames) if entry.codec == "zstd" else -(-entry.raw_size // _RAW_STEP)
        if (
            digests
            and len(digests) == pieces
            and (entry.codec == "zstd" or getattr(entry, "frame_bytes", 0) == _RAW_STEP)
        ):
            served.digests = digests
        else:
            plan.verify.append((str(stored / entry.name), entry.digest, entry.algorithm))
        plan.files.append(served)
    return plan


def _write_sparse(src: Path, dst: Path, served: ServedFile, ranges: list[tuple[int, int]]) -> None:
    """dst: served's raw size, holding only ranges (decoded from their frames)."""
    import zstandard

    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, served.raw_size)
        dctx = zstandard.ZstdDecompressor()
        with src.open("rb", buffering=0) as fh:
            for frame in served.frames:
                wanted = [
                    (max(o, frame.raw), min(o + n, frame.raw + frame.size))
                    for o, n in ranges
                    if o < frame.raw + frame.size and o + n > frame.raw
                ]
                if not wanted:
                    continue
                fh.seek(frame.at)
                try:
                    data = dctx.decompress(fh.read(frame.length))
                except zstandard.ZstdError as exc:
                    raise IntegrityError(
                        f"compressed checkpoint file {src} is corrupted ({exc})"
                    ) from None
                view = memoryview(data)
                for lo, hi in wanted:
                    os.pwrite(fd, view[lo - frame.raw : hi - frame.raw], lo)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)


# --- the server ----------------------------------------------------------------------------


class Fatal(Exception):
    """Serving cannot go on (the message says why): the job must be killed.

    corrupt: a stored file failed its check (IntegrityError's exit code for the restart)."""

    def __init__(self, message: str, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class _Source:
    """Reads raw byte ranges of one stored pages file: a decoded frame, or a mapped window."""

    def __init__(self, served: ServedFile) -> None:
        self.served = served
        self.fd = os.open(served.path, os.O_RDONLY | os.O_CLOEXEC)
        self.frames = served.frames
        self.base = 0
        if served.codec == "none":
            # The file is mapped once; UFFDIO_COPY reads straight from its page cache.
            size = max(served.raw_size, 1)
            mm = _libc.mmap
            mm.restype = ctypes.c_void_p
            mm.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            addr = mm(None, size, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise Fatal(f"cannot map {served.path}: {os.strerror(ctypes.get_errno())}")
            self.base = int(addr)
            step = _RAW_STEP  # the unit of the fill for uncompressed files
            self.frames = [
                Frame(off, min(step, served.raw_size - off), off, 0)
                for off in range(0, served.raw_size, step)
            ]
        self._local = threading.local()
        # The frames decoded last: a fault that raced the copy of its frame (and finds it
        # done) needs it once more.  WORKERS + 2 frames of 8 MiB.
        self._recent: dict[int, bytes] = {}
        self._recent_lock = threading.Lock()

    def _check(self, idx: int, data: Any) -> None:
        from ccr.storage.hashing import new_hash

        digest = new_hash(self.served.algorithm)
        # As unsigned bytes: BLAKE3 refuses a ctypes char array's format ("<c"), which is
        # what an uncompressed file's mapped piece is (format-4 manifests digest those).
        digest.update(cast(bytes, memoryview(data).cast("B")))  # (no copy)
        if digest.hexdigest() != self.served.digests[idx]:
            raise Fatal(
                f"checkpoint file {self.served.path} is corrupted "
                f"(frame {idx} at raw offset {self.frames[idx].raw}: checksum mismatch)",
                corrupt=True,
            )

    def frame_of(self, offset: int) -> int:
        lo, hi = 0, len(self.frames) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.frames[mid].raw <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def read(self, idx: int) -> tuple[int, Any]:
        """(address of frame idx's raw bytes, an object to keep alive while using them)."""
        frame = self.frames[idx]
        if self.served.codec == "none":
            if self.served.digests:
                self._check(idx, (ctypes.c_char * frame.size).from_address(self.base + frame.raw))
            return self.base + frame.raw, None
        with self._recent_lock:
            data = self._recent.get(idx)
        if data is not None:
            return ctypes.cast(data, ctypes.c_void_p).value or 0, data  # type: ignore[arg-type]
        import zstandard

        packed = os.pread(self.fd, frame.length, frame.at)
        if self.served.digests:
            self._check(idx, packed)
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            data = dctx.decompress(packed)  # checks the frame's checksum
        except zstandard.ZstdError as exc:
            raise Fatal(
                f"checkpoint file {self.served.path} is corrupted "
                f"(frame at raw offset {frame.raw}: {exc})",
                corrupt=True,
            ) from None
        if len(packed) != frame.length or len(data) != frame.size:
            raise Fatal(
                f"checkpoint file {self.served.path} is corrupted "
                f"(frame at raw offset {frame.raw} is not {frame.size} bytes)",
                corrupt=True,
            )
        with self._recent_lock:
            self._recent[idx] = data
            while len(self._recent) > WORKERS + 2:
                self._recent.pop(next(iter(self._recent)))
        # ctypes passes a bytes object as a pointer to its buffer (no copy).
        return ctypes.cast(data, ctypes.c_void_p).value or 0, data  # type: ignore[arg-type]


Key = tuple[str, int]  # (pages file, frame index)


class _SharedLock:
    """Copies share it (the workers copy into one address space at once); an event that
    changes the address space (unmap, remove, remap) takes it alone, and is let in first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Space:
    """One uffd: one address space of the restored tree (a task, or one it forked since)."""

    def __init__(self, fd: int, task: TaskPages) -> None:
        self.fd = fd
        self.task = task
        self.lock = _SharedLock()
        self.alive = True
        # [image start, image end, delta]: where the image's lazy VMAs are now (remaps move
        # them, unmaps and removes cut them).
        self.moves: list[list[int]] = [[s, e, 0] for s, e in task.vmas]

    def now(self, img: int, size: int) -> list[tuple[int, int, int]]:
        """(current address, offset in the piece, length) of the live parts of a piece."""
        out = []
        end = img + size
        for start, stop, delta in self.moves:
            lo, hi = max(img, start), min(end, stop)
            if lo < hi:
                out.append((lo + delta, lo - img, hi - lo))
        return out

    def image_address(self, addr: int) -> int | None:
        for start, stop, delta in self.moves:
            if start + delta <= addr < stop + delta:
                return addr - delta
        return None

    def cut(self, lo: int, hi: int) -> None:
        """Forget [lo, hi) (current addresses): unmapped, removed, or moved away."""
        kept = []
        for start, stop, delta in self.moves:
            a, b = start + delta, stop + delta
            if b <= lo or a >= hi:
                kept.append([start, stop, delta])
                continue
            if a < lo:
                kept.append([start, lo - delta, delta])
            if b > hi:
                kept.append([hi - delta, stop, delta])
        self.moves = kept

    def move(self, frm: int, to: int, size: int) -> None:
        moved = []
        for start, stop, delta in self.moves:
            a, b = max(start + delta, frm), min(stop + delta, frm + size)
            if a < b:
                moved.append([a - delta, b - delta, delta + to - frm])
        self.cut(frm, frm + size)
        self.cut(to, to + size)
        self.moves = sorted(self.moves + moved)


def _uffd_call(fd: int, request: int, arg: ctypes.Structure) -> int:
    """0, or the errno of a failed ioctl (the GIL is released meanwhile)."""
    if _ioctl(fd, request, ctypes.addressof(arg)) == 0:
        return 0
    return ctypes.get_errno()


def uffd_copy(fd: int, dst: int, src: int, size: int) -> int:
    """Copy size bytes to dst; pages already there are skipped.  The bytes copied.

    Raises ProcessGone when the address space is gone.  A range that is (no longer) one
    registered VMA (ENOENT: the job split, moved or unmapped it) is copied in halves down
    to single pages, and pages outside any VMA are skipped.
    """
    done = 0
    while size > 0:
        arg = _Copy(dst, src, size, 0, 0)
        err = _uffd_call(fd, UFFDIO_COPY, arg)
        if err == 0:
            return done + size
        got = max(0, int(arg.copy))
        dst, src, size, done = dst + got, src + got, size - got, done + got
        if err == errno.EAGAIN:
            if got == 0:
                time.sleep(0.0002)  # an event (fork, remap) is pending: the reader takes it
        elif err == errno.EEXIST:
            dst, src, size = dst + PAGE, src + PAGE, size - PAGE
        elif err == errno.ENOENT:
            if size <= PAGE:
                return done
            half = (size // 2 + PAGE - 1) // PAGE * PAGE
            done += uffd_copy(fd, dst, src, half)
            dst, src, size = dst + half, src + half, size - half
        elif err in (errno.ESRCH, errno.ENOSPC):
            raise ProcessGone
        else:
            raise Fatal(f"UFFDIO_COPY at {dst:#x} failed: {os.strerror(err)}")
    return done


def uffd_zero(fd: int, start: int, size: int) -> None:
    while size > 0:
        arg = _Zero(_Range(start, size), 0, 0)
        err = _uffd_call(fd, UFFDIO_ZEROPAGE, arg)
        if err == 0:
            return
        got = max(0, int(arg.zeropage))
        start, size = start + got, size - got
        if err == errno.EAGAIN:
            if got == 0:
                time.sleep(0.0002)
        elif err in (errno.EEXIST, errno.ENOENT):
            _uffd_call(fd, UFFDIO_WAKE, _Range(start, PAGE))
            start, size = start + PAGE, size - PAGE
        elif err in (errno.ESRCH, errno.ENOSPC):
            raise ProcessGone
        else:
            raise Fatal(f"UFFDIO_ZEROPAGE at {start:#x} failed: {os.strerror(err)}")


class Server:
    """The page-fault handler and background fill (runs in its own process)."""

    def __init__(self, plan: Plan, ctl: socket.socket) -> None:
        self.plan = plan
        self.ctl = ctl
        self.sources = {f.name: _Source(f) for f in plan.files}
        self.tasks = {t.vpid: t for t in plan.tasks}
        # Each frame's pieces: (image address, offset in the frame, length).
        self.pieces: dict[Key, list[tuple[int, int, int]]] = {}
        self.frames_of: dict[int, list[Key]] = {}
        for task in plan.tasks:
            source = self.sources[task.pages_file]
            keys: list[Key] = []
            for seg in task.segments:
                off, end = seg.offset, seg.offset + seg.size
                while off < end:
                    idx = source.frame_of(off)
                    frame = source.frames[idx]
                    stop = min(end, frame.raw + frame.size)
                    key = (task.pages_file, idx)
                    if key not in self.pieces:
                        self.pieces[key] = []
                        keys.append(key)
                    img = seg.vaddr + off - seg.offset
                    self.pieces[key].append((img, off - frame.raw, stop - off))
                    off = stop
            self.frames_of[task.vpid] = sorted(keys, key=lambda k: k[1])
        self.lock = threading.Condition()
        self.pending: dict[Key, set[Space]] = {}  # frames some space still needs
        self.claimed: set[Key] = set()
        self.spaces: dict[int, Space] = {}  # by fd
        self.faults: deque[tuple[Space, int]] = deque()  # (space, page address) to serve
        self.finished = False  # CRIU sent every task's uffd
        self.failure: str | None = None
        self.corrupt = False
        self.root = 0
        self.copied = 0
        self.filled = 0  # bytes of frames the background fill served (for fill_rate)
        self.began = time.monotonic()
        self.verified = not plan.verify

    # control channel ---------------------------------------------------------------------
    def _send(self, kind: bytes, body: bytes = b"", fd: int | None = None) -> None:
        fds = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            self.ctl.sendmsg([kind + body], fds)
        except OSError:
            pass

    def _control(self) -> bool:
        """Take one message from the keeper; False when the keeper is gone."""
        try:
            msg, anc, _, _ = self.ctl.recvmsg(256, socket.CMSG_SPACE(4))
        except OSError:
            return False
        if not msg:
            return False
        fds = [
            fd
            for level, kind, data in anc
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in array.array("i", data[: len(data) - len(data) % 4])
        ]
        if msg[:1] == b"T":
            (vpid,) = struct.unpack("i", msg[1:5])
            self._add_space(fds[0], self.tasks.get(vpid) or TaskPages(vpid, ""), None)
        elif msg[:1] == b"E":
            with self.lock:
                self.finished = True
                self.lock.notify_all()
        elif msg[:1] == b"R":
            (self.root,) = struct.unpack("i", msg[1:5])
        return True

    def _add_space(self, fd: int, task: TaskPages, parent: Space | None) -> Space:
        os.set_blocking(fd, False)
        space = Space(fd, task)
        with self.lock:
            if parent is not None:
                space.moves = [list(m) for m in parent.moves]
                keys = [k for k, spaces in self.pending.items() if parent in spaces]
                keys += [k for k in self.claimed if k not in keys and k[0] == task.pages_file]
            else:
                keys = self.frames_of.get(task.vpid, []) if task.pages_file else []
            for key in keys:
                self.pending.setdefault(key, set()).add(space)
            self.spaces[fd] = space
            self.lock.notify_all()
        return space

    # copying -----------------------------------------------------------------------------
    def _claim(self) -> Key | None:
        with self.lock:
            while True:
                if self.failure is not None:
                    return None
                if not self.finished:
                    # Not before CRIU has restored every task: until its restorer registered
                    # the lazy VMAs, a copy would find no VMA (criu/uffd.c waits alike).
                    self.lock.wait(0.5)
                    continue
                for key in self.pending:
                    if key not in self.claimed:
                        self.claimed.add(key)
                        return key
                if self._complete():
                    self.lock.notify_all()
                    return None
                self.lock.wait(0.5)

    def _complete(self) -> bool:
        return self.finished and not self.pending and not self.claimed and self.verified

    def _serve(self, key: Key, fault: tuple[Space, int] | None = None) -> None:
        """Copy frame key into every space that needs it (claimed by the caller)."""
        try:
            src, keep = self.sources[key[0]].read(key[1])
            served: set[Space] = set()
            while True:
                with self.lock:
                    targets = [s for s in self.pending.get(key, ()) if s not in served]
                    if not targets:
                        self.pending.pop(key, None)
                        return
                for space in targets:
                    first = fault[1] if fault is not None and fault[0] is space else None
                    self._copy_into(space, key, src, first)
                    served.add(space)
                with self.lock:
                    left = self.pending.get(key)
                    if left is not None:
                        left.difference_update(targets)
            del keep
        finally:
            with self.lock:
                self.claimed.discard(key)
                self.lock.notify_all()

    def _copy_into(self, space: Space, key: Key, src: int, first: int | None) -> None:
        pieces = list(self.pieces[key])
        if first is not None:  # the window around the fault goes first
            for i, (img, off, size) in enumerate(pieces):
                if img <= first < img + size:
                    lo = max(img, first - first % FAULT_WINDOW)
                    hi = min(img + size, lo + FAULT_WINDOW)
                    rest = [(img, off, lo - img), (hi, off + hi - img, img + size - hi)]
                    pieces[i : i + 1] = [p for p in rest if p[2] > 0]
                    pieces.insert(0, (lo, off + lo - img, hi - lo))
                    break
        with space.lock.shared():
            if not space.alive:
                return
            try:
                for img, off, size in pieces:
                    for dst, sub, length in space.now(img, size):
                        self.copied += uffd_copy(space.fd, dst, src + off + sub, length)
            except ProcessGone:
                self._gone(space)

    def _copy_page(self, space: Space, key: Key, src: int, img: int, addr: int) -> None:
        for piece, off, size in self.pieces[key]:
            if piece <= img < piece + size:
                page = src + off + img - img % PAGE - piece
                with space.lock.shared():
                    if not space.alive:
                        return
                    try:
                        if uffd_copy(space.fd, addr, page, PAGE) == 0:
                            _uffd_call(space.fd, UFFDIO_WAKE, _Range(addr, PAGE))
                    except ProcessGone:
                        self._gone(space)
                return

    def _gone(self, space: Space) -> None:
        """space's process exited (called holding space.lock)."""
        space.alive = False
        with self.lock:
            for spaces in self.pending.values():
                spaces.discard(space)
            for key in [k for k, s in self.pending.items() if not s]:
                self.pending.pop(key)
            self.lock.notify_all()

    def _worker(self) -> None:
        try:
            while (key := self._claim()) is not None:
                self._serve(key)
                if self.plan.fill_rate:
                    with self.lock:
                        frame = self.sources[key[0]].frames[key[1]]
                        self.filled += frame.size
                        due = self.began + self.filled / self.plan.fill_rate
                    time.sleep(max(0.0, due - time.monotonic()))
        except Fatal as exc:
            self._fail(str(exc), exc.corrupt)
        except Exception as exc:  # noqa: BLE001 - any failure to serve kills the job
            self._fail(f"page server failed: {exc!r}")

    def _verifier(self) -> None:
        from ccr.storage.hashing import file_digest

        with self.lock:  # the CPUs are CRIU's until the tree runs
            while not self.finished and self.failure is None:
                self.lock.wait(0.5)
        try:
            for path, digest, algorithm in self.plan.verify:
                if file_digest(Path(path), algorithm) != digest:
                    self._fail(f"checkpoint file {path} is corrupted (checksum mismatch)", True)
                    return
        except Exception as exc:  # noqa: BLE001
            self._fail(f"cannot verify checkpoint files: {exc}")
            return
        with self.lock:
            self.verified = True
            self.lock.notify_all()

    def _fail(self, message: str, corrupt: bool = False) -> None:
        with self.lock:
            if self.failure is None:
                self.failure, self.corrupt = message, corrupt
            self.lock.notify_all()

    # events ------------------------------------------------------------------------------
    def _event(self, space: Space) -> None:
        try:
            data = os.read(space.fd, _MSG_SIZE * 64)
        except BlockingIOError:
            return
        except OSError:
            with space.lock.alone():
                self._gone(space)
            return
        for at in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            msg = data[at : at + _MSG_SIZE]
            event = msg[0]
            if event == _UFFD_EVENT_PAGEFAULT:
                (_flags, address) = struct.unpack_from("QQ", msg, 8)
                self._fault(space, address - address % PAGE)
            elif event == _UFFD_EVENT_FORK:
                (ufd,) = struct.unpack_from("I", msg, 8)
                # The keeper holds the child's uffd before anything else is done.
                self._send(b"F" + struct.pack("i", space.task.vpid), fd=ufd)
                self._add_space(ufd, space.task, space)
            elif event == _UFFD_EVENT_REMAP:
                frm, to, size = struct.unpack_from("QQQ", msg, 8)
                with space.lock.alone():
                    space.move(frm, to, size)
            elif event in (_UFFD_EVENT_REMOVE, _UFFD_EVENT_UNMAP):
                start, end = struct.unpack_from("QQ", msg, 8)
                # Never copied into again: a removed range reads as zeros from now on
                # (its faults get the zero page), an unmapped one is gone.
                with space.lock.alone():
                    space.cut(start, end)

    def _fault(self, space: Space, addr: int) -> None:
        """Queue a fault for the fault threads: the event reader never copies itself (a
        copy waits while an event is pending, and only the reader can take that event)."""
        with self.lock:
            self.faults.append((space, addr))
            self.lock.notify_all()

    def _fault_thread(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self.faults and self.failure is None and not self._complete():
                        self.lock.wait(0.5)
                    if not self.faults:
                        return
                    space, addr = self.faults.popleft()
                self._handle_fault(space, addr)
        except Fatal as exc:
            self._fail(str(exc), exc.corrupt)
        except Exception as exc:  # noqa: BLE001 - any failure to serve kills the job
            self._fail(f"page server failed: {exc!r}")

    def _handle_fault(self, space: Space, addr: int) -> None:
        img = space.image_address(addr)
        key = None
        if img is not None:
            source = self.sources.get(space.task.pages_file)
            for seg in space.task.segments:
                if seg.vaddr <= img < seg.vaddr + seg.size and source is not None:
                    key = (space.task.pages_file, source.frame_of(seg.offset + img - seg.vaddr))
                    break
        if key is None:
            self._zero(space, addr, img)
            return
        with self.lock:
            needed = space in self.pending.get(key, ())
            mine = needed and key not in self.claimed
            if mine:
                self.claimed.add(key)
        if mine:
            self._serve(key, (space, img))  # type: ignore[arg-type]
        elif not needed:
            # Copied meanwhile (the fault raced the copy), or a copy found no VMA there
            # then: copy that page again (if present: EEXIST, and the thread is woken).
            assert img is not None
            src, keep = self.sources[key[0]].read(key[1])
            self._copy_page(space, key, src, img, addr)
            del keep
        # (claimed by a worker: its copy wakes the thread)

    def _zero(self, space: Space, addr: int, img: int | None) -> None:
        """A page of no lazy segment: a hole (never touched before the dump) or removed."""
        lo, hi = addr, addr + PAGE
        if img is not None:
            limit_lo, limit_hi = addr - addr % ZERO_WINDOW, addr - addr % ZERO_WINDOW + ZERO_WINDOW
            for start, stop, delta in space.moves:
                if start + delta <= addr < stop + delta:
                    limit_lo, limit_hi = max(limit_lo, start + delta), min(limit_hi, stop + delta)
            for seg in space.task.segments:
                a = seg.vaddr + (addr - img)
                b = a + seg.size
                if b <= addr:
                    limit_lo = max(limit_lo, b)
                elif a > addr:
                    limit_hi = min(limit_hi, a)
            lo, hi = limit_lo, max(limit_hi, addr + PAGE)
        with space.lock.shared():
            if not space.alive:
                return
            try:
                uffd_zero(space.fd, lo, hi - lo)
            except ProcessGone:
                self._gone(space)

    # main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        began = self.began = time.monotonic()
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(WORKERS)]
        # Two fault threads: a fault on a frame not in yet costs its decode and copy (~10 ms
        # for 8 MiB), so one slow fault does not hold up another thread's.
        threads += [threading.Thread(target=self._fault_thread, daemon=True) for _ in range(2)]
        if self.plan.verify:
            threads.append(threading.Thread(target=self._verifier, daemon=True))
        for thread in threads:
            thread.start()
        poller = select.poll()
        poller.register(self.ctl.fileno(), select.POLLIN)
        polled: set[int] = set()
        try:
            while True:
                with self.lock:
                    if self.failure is not None:
                        raise Fatal(self.failure, self.corrupt)
                    if self._complete():
                        break
                    live = {fd for fd, s in self.spaces.items() if s.alive}
                for fd in live - polled:
                    poller.register(fd, select.POLLIN)
                for fd in polled - live:
                    poller.unregister(fd)
                    os.close(fd)
                polled = live
                for fd, what in poller.poll(50):
                    if fd == self.ctl.fileno():
                        if not self._control():
                            raise Fatal("the restore's supervisor (the uffd keeper) is gone")
                    elif fd in self.spaces:
                        if what & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                            with self.spaces[fd].lock.alone():
                                self._gone(self.spaces[fd])
                        else:
                            self._event(self.spaces[fd])
        except Fatal as exc:
            self._send(b"X", (b"I" if exc.corrupt else b"E") + str(exc).encode())
            # The keeper kills the job and says why, then closes the channel; if it does
            # not within 5 s (or is gone), the job is killed from here.
            self.ctl.settimeout(5)
            try:
                while self.ctl.recv(256):
                    pass
            except OSError:
                pass
            if self.root:
                try:
                    os.kill(self.root, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return 1
        done = {
            "fill_done": time.monotonic(),
            "fill_seconds": time.monotonic() - began,
            "bytes": self.copied,
        }
        self._send(b"D", json.dumps(done).encode())
        return 0


def main(argv: list[str]) -> int:  # pragma: no cover - the server process
    ctl = socket.socket(fileno=int(argv[1]))
    msg = b""
    while True:  # the plan comes first, in pieces (it may exceed one datagram)
        part = ctl.recv(1 << 20)
        if not part:
            return 1
        if part == b"P":
            break
        msg += part
    try:
        server = Server(Plan.from_json(msg.decode()), ctl)
    except Exception as exc:  # noqa: BLE001
        ctl.send(b"XE" + f"page server cannot start: {exc}".encode())
        return 1
    ctl.send(b"S")
    return server.run()


# --- the keeper (in the restore's supervisor) ----------------------------------------------


class Keeper:
    """Receives the uffds from CRIU, holds a copy of each, and runs the server.

    on_failure(message) is called (on a thread) when serving failed or the server died
    before every page was in: the caller must kill the job.  on_done(stats) when every
    page is in.
    """

    def __init__(self, work: Path, marker: Path) -> None:
        self.work = work
        self.marker = marker
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ccr.engines.page_server", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the restart is not the server's
        )
        theirs.close()
        self.uffds: list[int] = []
        self.done: dict[str, Any] | None = None
        self.failure: str | None = None
        self.corrupt = False  # the failure is a stored file that failed its check
        self._ready = threading.Event()
        self._over = threading.Event()
        # Set once the handlers below are (restored) or will never be (abort): an outcome
        # that comes before, while the supervisor still takes the tree over, waits for it.
        self._armed = threading.Event()
        self._listener: socket.socket | None = None
        self._receiver: threading.Thread | None = None
        self.on_failure: Callable[[str], None] = lambda _m: None  # kills the job
        self.on_done: Callable[[dict[str, Any]], None] = lambda _s: None

    def send_plan(self, plan: Plan) -> None:
        data = plan.to_json().encode()
        for at in range(0, len(data), 1 << 16):
            self.ctl.send(data[at : at + (1 << 16)])
        self.ctl.send(b"P")
        threading.Thread(target=self._watch, name="ccr-uffd-keeper", daemon=True).start()
        if not self._ready.wait(30) or self.failure is not None:
            raise CcrError(f"lazy restore: {self.failure or 'the page server did not start'}")

    def listen(self) -> None:
        """Bind lazy-pages.socket in the work dir (before CRIU connects to it)."""
        path = self.work / SOCKET_NAME
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound through a descriptor of the work dir: its path may exceed sun_path's 108
        # bytes (CRIU connects by the bare name, from inside the work dir).
        dirfd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.bind(f"/proc/self/fd/{dirfd}/{SOCKET_NAME}")
            os.chmod(path, 0o600)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise CcrError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        finally:
            os.close(dirfd)
        self._listener = sock
        self._receiver = threading.Thread(target=self._receive, name="ccr-uffd-recv", daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        """CRIU's stream: vpid, then its uffd; a negative vpid (a zombie) has none."""
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            while True:
                head = _recv_exact(conn, 4)
                if head is None:
                    break
                (vpid,) = struct.unpack("i", head)
                if vpid == RESTORE_FINISHED:
                    break
                if vpid < 0:
                    continue
                _, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in array.array("i", data[: len(data) - len(data) % 4]):
                            self.uffds.append(fd)
                            self.ctl.sendmsg(
                                [b"T" + struct.pack("i", vpid)],
                                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                            )
        self.ctl.send(b"E")

    def restored(
        self,
        root: int,
        on_failure: Callable[[str], None],
        on_done: Callable[[dict[str, Any]], None],
    ) -> None:
        """CRIU's restore returned with the tree rooted at root (its host PID): from now on
        on_failure(message) must kill it, and on_done(stats) hears the fill ended."""
        self.on_failure, self.on_done = on_failure, on_done
        self._armed.set()
        if self._receiver is not None:
            self._receiver.join(5)
        if self._listener is not None:
            self._listener.close()
            (self.work / SOCKET_NAME).unlink(missing_ok=True)
        try:
            self.ctl.send(b"R" + struct.pack("i", root))
        except OSError:
            pass

    def _watch(self) -> None:
        """Messages from the server until it ends; its death before "done" is a failure."""
        while True:
            try:
                msg, anc, _, _ = self.ctl.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except OSError:
                msg, anc = b"", []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.uffds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            kind_ = msg[:1]
            if kind_ == b"S":
                self._ready.set()
            elif kind_ == b"D":
                self.done = json.loads(msg[1:])
                break
            elif kind_ == b"X":
                self.corrupt = msg[1:2] == b"I"
                self.failure = msg[2:].decode(errors="replace")
                break
            elif not msg:
                code = self.proc.wait()
                self.failure = f"the page server died (exit status {code})"
                break
        if self.failure is not None:
            self._ready.set()
            self._armed.wait()
            self.on_failure(self.failure)  # the job dies before any uffd is let go
            try:
                self.ctl.shutdown(socket.SHUT_RDWR)  # the server's cue that it is done
            except OSError:
                pass
        self.proc.wait()
        self._close()
        if self.done is not None:
            self._armed.wait()
            self.on_done(self.done)
        self._over.set()

    def _close(self) -> None:
        self._close_uffds()
        self.ctl.close()

    def _close_uffds(self) -> None:
        for fd in self.uffds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.uffds = []

    def wait(self, timeout: float | None = None) -> bool:
        return self._over.wait(timeout)

    def abort(self) -> None:
        """The restore failed: stop the server (the tree is gone or being killed)."""
        self.marker.unlink(missing_ok=True)
        self.on_failure = lambda _m: None
        self._armed.set()
        if self._listener is not None:
            self._listener.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if not self._over.is_set() and not self.ctl._closed:  # type: ignore[attr-defined]
            self.ctl.close()
        self._close_uffds()


# FILL_STATUS, in the restore's work dir once the fill ended: {"ok": true, "fill_time": s}
# or {"ok": false, "error": line, "code": exit code}.  The marker (filling_marker: one per
# step, where a checkpoint of the step finds it) holds the keeper's PID while a fill runs.
FILL_STATUS = "fill.json"


def filling_marker(state_dir: Path, step: str) -> Path:
    return state_dir / "lazy" / f"{step}.filling"


def clear_status(work: Path, marker: Path) -> None:
    (work / FILL_STATUS).unlink(missing_ok=True)
    marker.parent.mkdir(mode=0o700, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")


def write_status(work: Path, marker: Path, status: dict[str, Any]) -> None:
    tmp = work / f".{FILL_STATUS}.{os.getpid()}"
    tmp.write_text(json.dumps(status))
    tmp.replace(work / FILL_STATUS)
    marker.unlink(missing_ok=True)


def wait_status(path: Path, marker: Path, timeout: float | None = None) -> dict[str, Any] | None:
    """The fill's outcome once it is known (None: timed out, or its keeper died unheard)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
        if not filling(marker):
            try:
                return dict(json.loads(path.read_text()))
            except (OSError, ValueError):
                return None
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def filling(marker: Path) -> bool:
    """Whether the lazy restore's fill that marker stands for runs (its keeper lives)."""
    try:
        pid = int(marker.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def wait_until_filled(marker: Path, deadline: Deadline, what: str) -> None:
    """Before a checkpoint of a lazily restored step: until every page is in, so the dump
    sees the whole memory (a page still missing would be dumped as a hole, a zero page)."""
    while filling(marker):
        if deadline.expired():
            raise deadline.exceeded(f"{what} (waiting for its memory after a lazy restart)")
        time.sleep(0.02)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
