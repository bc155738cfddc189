"""Restore through CRIU's image-streamer protocol: ccr serves every image file to `criu
restore --stream` through a pipe, decoding and verifying the stored files in that one pass.

Why (figures in docs/benchmarks.md): restoring a compressed checkpoint from a decoded
scratch copy needed RAM (tmpfs) or disk for the whole image besides the process, and an
uncompressed one was read twice (once to hash it, once by CRIU).  Streamed, the extra
memory is the frames in flight (WORKERS + 1, 8 MiB raw each, plus pipe buffers), whatever
the image size, and every byte is read once.

The protocol (criu/img-streamer.c): CRIU connects to `streamer-serve.sock` in its -D
directory; for each image it sends a request (u32 length, protobuf `filename`), reads
the reply (u32 length, protobuf `exists`) and, if it exists, sends the write end of a
fresh pipe (SCM_RIGHTS, one dummy byte), from which it then reads the file sequentially.
RPC refuses --stream (criu/cr-service.c), so CRIU runs from its command line, with the
options engines.criu keeps in one place.

Safety: format-4 files have a digest per frame, checked before the frame's bytes enter the
pipe; older files only a whole-file digest, known after their last byte was sent.  So the
tree may not run before every file CRIU read is verified: an action script holds CRIU at
"post-restore" (all memory restored, no task resumed yet) until ccr's verdict; a bad
verdict makes CRIU kill the tree it built, and the restore fails naming the file.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import secrets
import select
import shlex
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr import identity
from ccr.deadline import NO_DEADLINE, Deadline
from ccr.engines import criu as criu_engine
from ccr.engines import process
from ccr.engines.compression import framed_entry, read_verified
from ccr.errors import CcrError, CriuError, IntegrityError, StorageError
from ccr.storage.imageset import meminfo
from ccr.storage.manifest import FileEntry, Frame

SOCKET_NAME = "streamer-serve.sock"  # criu/img-streamer.c, restore side
GATE_ACTION = "post-restore"
# Pipes to CRIU get a frame's worth of buffer (root may exceed pipe-max-size, 1 MiB by
# default; else that): a frame goes in one write, and CRIU and ccr wake each other
# 128x less often than with the default 64 KiB.
PIPE_BYTES = (8 << 20, 1 << 20)
_LOCAL_PIECE = 1 << 20
# How long the action script waits for ccr's verdict before failing the restore itself
# (ccr gone): longer than any restore ccr waits for.
GATE_TIMEOUT_S = 3600

# Opened read-write, the FIFO never blocks the open itself, so `read -t` bounds the wait.
_SCRIPT = """#!/bin/bash
# ccr: hold the restored tree at post-restore until ccr verified every image byte CRIU read.
[ "$CRTOOLS_SCRIPT_ACTION" = "{action}" ] || exit 0
read -r -t {timeout} verdict <>{gate} && [ "$verdict" = ok ]
"""


@dataclass
class Source:
    """Where one image's bytes come from: a stored file (decoded and verified on the way)
    or a local file already verified (ccr's small decoded copy of CRIU's metadata)."""

    path: Path
    entry: FileEntry | None = None
    frames: list[Frame] | None = None  # a zstd file's frame table (StepManifest.frame_tables)

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The file's bytes in pieces, each valid until the next is asked for."""
        if self.entry is not None:
            yield from read_verified(self.path, self.entry, self.frames)
            return
        with self.path.open("rb", buffering=0) as fh:
            while chunk := fh.read(_LOCAL_PIECE):
                yield chunk

    @property
    def checked_first(self) -> bool:
        """Every byte is verified before it is sent (no need to wait for the file's end)."""
        return self.entry is None or framed_entry(self.entry)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc_vmsplice() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).vmsplice
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_VMSPLICE = _libc_vmsplice()
_SPLICE_F_NONBLOCK = 2


def _address(piece: bytes | memoryview) -> int | None:
    """Where piece's bytes lie in this process, if vmsplice can take them from there."""
    if isinstance(piece, bytes):
        return ctypes.cast(ctypes.c_char_p(piece), ctypes.c_void_p).value
    if not piece.readonly and piece.c_contiguous and piece.nbytes:
        return ctypes.addressof(ctypes.c_char.from_buffer(piece))
    return None


class PipeWriter:
    """Writes pieces into one pipe to CRIU, by vmsplice(2) where it can.

    vmsplice puts references to the piece's pages in the pipe, so CRIU's read copies
    straight from ccr's buffer: one copy of every image byte fewer than write(2), and the
    pipe's lock is held for page references instead of a copy (on 2 CPUs, ccr's writes and
    CRIU's faulting reads spun on that lock: 8% of a 1 GiB restore's CPU time).  The cost
    is a rule: a piece must not change, nor its memory be reused, while the pipe still
    holds any of its bytes.  The writer keeps each piece's object until then; what CRIU has
    read is what was sent less what is still in the pipe (FIONREAD), and settle(n) waits
    until at most n pieces may still be in the pipe.  read_verified's pieces stay valid
    until the one after next is asked for, so a pump settles to 1 before asking.
    """

    def __init__(self, fd: int, on_sent: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.sent = 0
        self.blocked = 0.0  # seconds waiting for CRIU to read
        self._on_sent = on_sent
        self._held: deque[tuple[object, int]] = deque()  # (piece, its end in the stream)
        self._splice = _VMSPLICE is not None
        for size in PIPE_BYTES:
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
                break
            except OSError:
                continue  # a smaller pipe only costs wake-ups
        os.set_blocking(fd, False)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT)

    def write(self, piece: bytes | memoryview, stopped: Callable[[], bool]) -> bool:
        """Send all of piece; False once the reader is gone (CRIU took what it needed) or
        stopped() says to stop."""
        view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else None
        size = len(piece) if view is None else view.nbytes
        base = _address(piece if view is None else view) if self._splice else None
        if base is not None:
            self._held.append((piece, self.sent + size))
        done = 0
        while done < size:
            if stopped():
                return False
            try:
                if base is not None:
                    n = self._vmsplice(base + done, size - done)
                else:
                    n = os.write(self.fd, (view if view is not None else memoryview(piece))[done:])
            except BlockingIOError:
                self._wait()
                continue
            except BrokenPipeError:
                return False
            except OSError as exc:
                if base is None or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                    raise
                base = None  # a kernel without vmsplice for this: write(2) the rest
                self._splice = False
                continue
            done += n
            self.sent += n
            if self._on_sent is not None:
                self._on_sent(n)
        return True

    def _vmsplice(self, address: int, size: int) -> int:
        iov = _Iovec(address, size)
        n = int(_VMSPLICE(self.fd, ctypes.byref(iov), 1, _SPLICE_F_NONBLOCK))
        if n >= 0:
            return n
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))

    def _wait(self) -> None:
        waited = time.monotonic()
        self._poller.poll(50)
        self.blocked += time.monotonic() - waited

    def _read_by_reader(self) -> int | None:
        """Bytes CRIU has read so far; None once nobody can read the pipe any more."""
        for _, revents in self._poller.poll(0):
            if revents & (select.POLLERR | select.POLLHUP):
                return None
        buf = array.array("i", [0])
        fcntl.ioctl(self.fd, termios.FIONREAD, buf, True)
        return self.sent - buf[0]

    def settle(self, keep: int, stopped: Callable[[], bool]) -> None:
        """Wait until at most `keep` spliced pieces may still have bytes in the pipe (the
        others are released); at once if the reader is gone or stopped() says so."""
        pause = 0.0002
        while len(self._held) > keep:
            read = self._read_by_reader()
            if read is None or stopped():
                self._held.clear()  # nobody will read them: nothing to protect
                return
            while self._held and self._held[0][1] <= read:
                self._held.popleft()
            if len(self._held) > keep:
                time.sleep(pause)  # CRIU is still copying (with 8 MiB pieces: rare)
                pause = min(pause * 2, 0.005)


@dataclass
class StreamStats:
    """What serving cost: bytes sent to CRIU, and the bytes of the stored files read."""

    sent_bytes: int = 0
    files: int = 0
    # Wall seconds a file was being served, summed over files (they overlap with CRIU).
    serve_time: float = 0.0
    # Seconds CRIU waited at post-restore for the last verdicts.
    gate_wait: float = 0.0
    failure: str | None = None
    # Per file: (name, bytes sent, seconds served, of which waiting for CRIU to read,
    # of which waiting for ccr's decoding), written to stream.log beside CRIU's log.
    served: list[tuple[str, int, float, float, float]] = field(default_factory=list)


@dataclass
class _Feed:
    name: str
    thread: threading.Thread
    checked_first: bool
    drain: threading.Event = field(default_factory=threading.Event)


class ImageServer:
    """Serves sources to one `criu restore --stream` whose -D is directory."""

    def __init__(self, directory: Path, sources: dict[str, Source], gate: Path) -> None:
        self.directory = directory
        self.sources = sources
        self.gate = gate
        self.stats = StreamStats()
        self._lock = threading.Lock()
        self._feeds: list[_Feed] = []
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(directory / SOCKET_NAME))
        self._listener.listen(1)
        if not gate.exists():
            os.mkfifo(gate, 0o600)
        self._threads = [
            threading.Thread(target=self._serve, name="ccr-stream", daemon=True),
            threading.Thread(target=self._answer_gate, name="ccr-stream-gate", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- requests ---------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self._listener.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            conn.settimeout(None)
            self._conn = conn
            while not self._stop.is_set():
                name = self._request(conn)
                if name is None:
                    return
                source = self.sources.get(name)
                reply = b"\x08" + (b"\x01" if source is not None else b"\x00")
                conn.sendall(struct.pack("<I", len(reply)) + reply)
                if source is None:
                    continue
                _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
                fds = [
                    int.from_bytes(data[:4], "little")
                    for level, kind, data in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                ]
                if not fds:
                    self._fail(f"CRIU sent no pipe for {name}")
                    return
                self._feed(name, source, fds[0])
        except OSError as exc:
            if not self._stop.is_set():
                self._fail(f"image stream to CRIU broke: {exc.strerror or exc}")

    @staticmethod
    def _exact(conn: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _request(self, conn: socket.socket) -> str | None:
        """The file name of CRIU's next request (img_streamer_request_entry); None at EOF."""
        head = self._exact(conn, 4)
        if head is None:
            return None
        body = self._exact(conn, struct.unpack("<I", head)[0])
        if body is None or body[:1] != b"\x0a":
            return None
        length, pos, shift = 0, 1, 0
        while pos < len(body):
            byte = body[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        name = body[pos : pos + length].decode(errors="replace")
        # Names come from CRIU; a path never leaves the sources (a dict of plain names).
        return name

    # -- feeding one pipe -------------------------------------------------------------------
    def _feed(self, name: str, source: Source, fd: int) -> None:
        feed = _Feed(name, threading.Thread(), source.checked_first)
        feed.thread = threading.Thread(
            target=self._pump, args=(feed, source, fd), name=f"ccr-stream-{name}", daemon=True
        )
        with self._lock:
            self._feeds.append(feed)
            self.stats.files += 1
        feed.thread.start()

    def _pump(self, feed: _Feed, source: Source, fd: int) -> None:
        began = time.monotonic()
        starved = 0.0  # waiting for the next verified piece
        pipe: PipeWriter | None = None

        def stopped() -> bool:
            return self._stop.is_set() or feed.drain.is_set()

        def count(n: int) -> None:
            with self._lock:
                self.stats.sent_bytes += n

        try:
            pipe = PipeWriter(fd, count)
            receiving = True
            pieces = source.pieces()
            while True:
                if receiving:
                    # The piece before the last may be refilled once the next is asked for.
                    pipe.settle(1, stopped)
                waited = time.monotonic()
                piece = next(pieces, None)
                starved += time.monotonic() - waited
                if piece is None:
                    break
                if not receiving:
                    continue  # drained: read (and verify) the rest, send nothing
                receiving = pipe.write(piece, stopped)
                if not receiving and source.checked_first:
                    break  # all it took was verified: nothing left to check
            pipe.settle(0, stopped)
        except (IntegrityError, StorageError) as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"cannot send {feed.name} to CRIU: {exc.strerror or exc}")
        finally:
            if pipe is not None:
                # Spliced pages still in the pipe are ccr's buffers: they must not be
                # reused for anything else while CRIU can still read them.
                pipe.settle(0, self._stop.is_set)
            os.close(fd)
            took = time.monotonic() - began
            sent, blocked = (pipe.sent, pipe.blocked) if pipe is not None else (0, 0.0)
            with self._lock:
                self.stats.serve_time += took
                self.stats.served.append((feed.name, sent, took, blocked, starved))

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.stats.failure is None:
                self.stats.failure = message

    def sent(self) -> int:
        """Bytes sent so far."""
        with self._lock:
            return self.stats.sent_bytes

    # -- the gate ---------------------------------------------------------------------------
    def verdict(self) -> str | None:
        """Wait until every byte CRIU took is verified; the first failure, or None.

        Feeds verified frame by frame are not waited for (what they sent was checked);
        the others (older manifests) are drained: CRIU read all it wants, the rest of
        the file is read only to check the whole file's digest.
        """
        with self._lock:
            feeds = list(self._feeds)
        for feed in feeds:
            if not feed.checked_first:
                feed.drain.set()
                feed.thread.join()
        with self._lock:
            return self.stats.failure

    def _answer_gate(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: the script does not wait yet
                    return
                time.sleep(0.005)
                continue
            began = time.monotonic()
            try:
                failure = self.verdict()
                self.stats.gate_wait = time.monotonic() - began
                os.write(fd, b"ok\n" if failure is None else b"bad\n")
            except OSError:
                pass
            finally:
                os.close(fd)
            return

    def close(self) -> None:
        """Stop serving; wait for the feeds (CRIU is gone or done, so none blocks)."""
        self._stop.set()
        if self._conn is not None:
            try:  # wakes the request loop even if something still holds CRIU's end
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join()
        with self._lock:
            feeds = list(self._feeds)
        for feed in feeds:
            feed.thread.join()
        if self._conn is not None:
            self._conn.close()
        self._listener.close()


class ExtraMemory:
    """The most memory a restore used beyond what the restored tree holds, sampled.

    A sample is the node's used memory (MemTotal - MemAvailable, /proc/meminfo) above its
    level when the restore began, less the bytes the tree has received so far (the
    caller's tree_bytes), and at least the size of the scratch directories on tmpfs.
    Other work on the node moves the first figure too: on a shared node it is noisy.
    """

    def __init__(self) -> None:
        self.baseline = self._used()
        self.peak = 0
        self._dirs: list[Path] = []
        self._last = 0.0

    @staticmethod
    def _used() -> int:
        fields = meminfo()
        return fields.get("MemTotal", 0) - fields.get("MemAvailable", 0)

    def watch(self, directory: Path) -> None:
        """Count directory (a scratch dir) if it is on tmpfs."""
        if _fs_type(directory) == "tmpfs":
            self._dirs.append(directory)

    def _scratch(self) -> int:
        total = 0
        for directory in self._dirs:
            try:
                with os.scandir(directory) as it:
                    total += sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in it)
            except OSError:
                pass
        return total

    def sample(self, tree_bytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.01:
            return
        self._last = now
        extra = max(self._used() - self.baseline - tree_bytes, self._scratch(), 0)
        self.peak = max(self.peak, extra)


def _fs_type(path: Path) -> str:
    """The type of the file system holding path (its deepest mount in /proc/self/mounts)."""
    target = str(path.resolve())
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, parts[2]
    except OSError:
        pass
    return kind


@dataclass
class StreamedRestore:
    pid: int
    criu_time: float
    stats: StreamStats


def restore(
    binary: str,
    sources: dict[str, Source],
    sock_dir: Path,
    work_dir: Path,
    *,
    deadline: Deadline = NO_DEADLINE,
    tcp_established: bool = False,
    network_lock: str | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> StreamedRestore:
    """`criu restore --stream` of sources as a child of the calling process (CRIU's sibling,
    like RPC's rst_sibling); return the root's PID once the tree runs.

    sock_dir (empty, short path) takes CRIU's socket and the gate FIFO; work_dir CRIU's log
    (restore.log) and the action script.  on_sample, if given, is called every few ms with
    the bytes sent so far (for the caller's memory sampling).  A digest mismatch raises
    IntegrityError naming the file, after CRIU killed what it had built; any failure or
    an abandoned restore leaves no process behind.

    In a node-service worker (ccr.identity) CRIU, its log and its script are root's, while
    the server's threads, started outside privileged(), read the stored files with the
    caller's file credentials (threads keep the credentials they were started with).
    """
    gate = sock_dir / "stream-gate"
    with identity.privileged():
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        script = work_dir / "ccr-stream-gate.sh"
        script.write_text(
            _SCRIPT.format(action=GATE_ACTION, timeout=GATE_TIMEOUT_S, gate=shlex.quote(str(gate)))
        )
        script.chmod(0o700)
        pidfile = work_dir / "restored.pid"
        pidfile.unlink(missing_ok=True)
    short = _short_dir(sock_dir)  # (cmd cannot fail: nothing to clean up before the try)
    options = criu_engine.criu_options(
        "restore", tcp_established=tcp_established, network_lock=network_lock
    )
    log_file = work_dir / options.log_file
    cmd = [
        binary,
        "restore",
        "--stream",
        "-D",
        str(short),
        "-W",
        str(work_dir),
        "--pidfile",
        str(pidfile),
        "--action-script",
        str(script),
        *options.command_line(),
    ]
    started = time.monotonic()
    since = process.now_ticks()
    proc: subprocess.Popen[bytes] | None = None
    try:
        server = ImageServer(short, sources, gate)
    except BaseException:
        _drop_short(short, sock_dir)
        raise
    try:
        try:
            with identity.privileged():
                proc = subprocess.Popen(
                    cmd,
                    cwd=work_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=criu_engine._criu_child_setup,
                    process_group=0,
                )
        except OSError as exc:
            raise CcrError(f"cannot run CRIU at {binary}: {exc.strerror}") from None
        while proc.poll() is None:
            if deadline.expired():
                raise deadline.exceeded("CRIU restore")
            if on_sample is not None:
                on_sample(server.sent())
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        criu_time = time.monotonic() - started
        failure = server.stats.failure
        if proc.returncode != 0 or failure is not None:
            if failure is not None:
                raise IntegrityError(f"{failure}; nothing of the restore was left running")
            with identity.privileged():
                reason = criu_engine.log_reason(log_file) or f"criu exited {proc.returncode}"
            raise CriuError(f"CRIU restore failed: {reason}", str(log_file))
        try:
            with identity.privileged():
                pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            raise CriuError(
                "CRIU restore wrote no pid of the restored tree", str(log_file)
            ) from None
    except BaseException:
        if proc is not None:
            criu_engine._kill(proc)
        for pid in process.restore_leftovers(since, binary):
            process.signal_process(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        raise
    finally:
        server.close()
        gate.unlink(missing_ok=True)
        _drop_short(short, sock_dir)
        with identity.privileged():
            _write_log(work_dir / "stream.log", server.stats, time.monotonic() - started)
    return StreamedRestore(pid, criu_time, server.stats)


# sockaddr_un holds 108 bytes, and CRIU connects to "<-D>/streamer-serve.sock" (truncated
# beyond): a node service's private scratch paths are longer than that.
_SUN_PATH = 100


def _short_dir(directory: Path) -> Path:
    """directory, or a short symbolic link to it in /tmp when its socket path would be too
    long (a name of our own, made with O_EXCL semantics, in the sticky /tmp)."""
    if len(str(directory / SOCKET_NAME).encode()) <= _SUN_PATH:
        return directory
    for _ in range(8):
        link = Path("/tmp") / f".ccr-stream-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            link.symlink_to(directory)
            return link
        except FileExistsError:
            continue
    raise StorageError(f"cannot make a short path to {directory} in /tmp")


def _drop_short(short: Path, directory: Path) -> None:
    if short != directory:
        short.unlink(missing_ok=True)


def _write_log(path: Path, stats: StreamStats, wall: float) -> None:
    """What was served, slowest first: where a slow restore spent its time."""
    lines = [
        f"restore {wall:.3f} s, {stats.files} files, {stats.sent_bytes} bytes sent, "
        f"gate wait {stats.gate_wait:.3f} s, failure: {stats.failure or 'none'}",
        "file bytes seconds waiting-for-criu waiting-for-decoding",
    ]
    for name, sent, took, blocked, starved in sorted(stats.served, key=lambda r: -r[2]):
        lines.append(f"{name} {sent} {took:.3f} {blocked:.3f} {starved:.3f}")
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        pass  # a diagnosis only
