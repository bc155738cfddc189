"""Regular files a dumped tree writes: found and saved while it is frozen, put back at restart.

CRIU records the size of every regular file a tree has open (all but O_WRONLY|O_APPEND
ones) and refuses a restore when the file's size differs (`File ... has bad size`); it
never saves their contents.  A job whose log is opened with "w", a `tee`, SQLite and its
WAL: all go on writing after a checkpoint, so their restart is refused, or, where the size
happens to match, the job resumes beside data it never wrote.  Here each such file is
recorded with its size and digest while the tree is frozen; small ones are copied into the
checkpoint, and at restart each is put back as it was (README "Files the job writes").
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ccr.engines import process
from ccr.errors import IntegrityError, StorageError
from ccr.storage.hashing import DEFAULT_ALGORITHM, new_hash
from ccr.storage.manifest import APPEND, SAVED, UNSAVED, WrittenFile

# Pseudo file systems: nothing there is a file CRIU checks or a restart could put back.
# (Named files in /dev/shm belong to the step's own tmpfs, which CRIU dumps with it.)
_SKIPPED_TREES = ("/proc/", "/sys/", "/dev/")
_CHUNK = 4 << 20
COPY_PREFIX = "ccr-file-"
# A file of ours, new: never through a planted symlink, never over an existing file.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Actions a restart takes on a WrittenFile (FilePlan.action).
RESTORE = "restore"  # put back from the checkpoint's copy
UNCHANGED = "unchanged"  # already as at the checkpoint
TRUNCATE = "truncate"  # not saved, only written past its checkpointed size: cut back
REFUSE = "refuse"  # not saved and changed before its checkpointed size: no restart
KEEP = "append"  # append-only (O_WRONLY|O_APPEND): CRIU does not check it, it goes on growing


@dataclass
class _Open:
    """One file (by device and inode) and how the tree reaches it."""

    path: str
    dev: int
    ino: int
    access: set[str] = field(default_factory=set)

    @property
    def append_only(self) -> bool:
        return self.access == {"O_WRONLY|O_APPEND"}


def _fd_flags(pid: int, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _usable(path: str, st: os.stat_result) -> bool:
    # Deleted (or unlinked-and-open) files are CRIU's own business: it dumps them as ghosts.
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink > 0
        and path.startswith("/")
        and not path.endswith(" (deleted)")
        and not path.startswith(_SKIPPED_TREES)
    )


def _add(found: dict[tuple[int, int], _Open], path: str, st: os.stat_result, how: str) -> None:
    entry = found.setdefault((st.st_dev, st.st_ino), _Open(path, st.st_dev, st.st_ino))
    entry.access.add(how)


def written_by(pids: list[int]) -> list[_Open]:
    """Every regular file the given tasks have open for writing or mapped shared-writable.

    Only files that this process reaches at the same path (same device and inode) are
    listed: a file on a mount private to the step (its own /tmp or /dev/shm tmpfs) is not
    ours to put back; CRIU dumps those mounts with their contents.
    """
    found: dict[tuple[int, int], _Open] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            flags = _fd_flags(pid, fd)
            if flags is None or flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not _usable(path, st):
                continue
            if flags & os.O_ACCMODE == os.O_RDWR:
                how = "O_RDWR"
            else:
                how = "O_WRONLY|O_APPEND" if flags & os.O_APPEND else "O_WRONLY"
            _add(found, path, st, how)
        try:
            with open(f"/proc/{pid}/maps") as fh:
                maps = fh.read().splitlines()
        except OSError:
            continue
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1][1] != "w" or parts[1][3] != "s" or parts[4] == "0":
                continue
            try:
                st = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
            except OSError:
                # map_files needs CAP_SYS_ADMIN: else the path, if maps' device and inode
                # say it is the mapped file.
                try:
                    st = os.stat(parts[5])
                    major, minor = (int(x, 16) for x in parts[3].split(":"))
                except (OSError, ValueError):
                    continue
                if (st.st_dev, st.st_ino) != (os.makedev(major, minor), int(parts[4])):
                    continue
            if _usable(parts[5], st):
                _add(found, parts[5], st, "mmap shared")
    visible = []
    for entry in found.values():
        try:
            here = os.stat(entry.path)
        except OSError:
            continue
        if (here.st_dev, here.st_ino) == (entry.dev, entry.ino):
            visible.append(entry)
    return sorted(visible, key=lambda e: e.path)


def estimate(pids: list[int], total_max: int) -> int:
    """Roughly what collect() will copy (for sizing the dump's scratch space)."""
    size = 0
    for entry in written_by(pids):
        if not entry.append_only:
            try:
                size += os.stat(entry.path).st_size
            except OSError:
                pass
    return min(size, total_max)


class Collector:
    """Records (and saves) the files of a frozen tree: run as CRIU's post-dump notification.

    CRIU sends "post-dump" once every image is written and before it resumes (or, for a
    vacate, leaves stopped) the tree, so nothing of the tree can write while the files are
    read: their sizes are those CRIU just recorded in its image, and their contents match
    the memory it dumped.  The list is taken then too, so a process forked after the dump
    began is not missed.
    """

    def __init__(self, root: int, dest: Path, file_max: int, total_max: int) -> None:
        self.root = root
        self.dest = dest
        self.file_max = file_max
        self.total_max = total_max
        self.files: list[WrittenFile] = []
        self.collected = False

    def hook(self, name: str, _pid: int) -> None:
        if name == "post-dump":
            pids = process.tree_pids(self.root)
            self.files = collect(pids, self.dest, self.file_max, self.total_max)
            self.collected = True


def collect(pids: list[int], dest: Path, file_max: int, total_max: int) -> list[WrittenFile]:
    """A WrittenFile for every file the (frozen) tasks write; copies of the saved ones in dest.

    Smallest first, so the per-checkpoint total saves as many files as it can hold.
    """
    opened = []
    for entry in written_by(pids):
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
            os.close(fd)  # replaced since it was listed: not the tree's file
            continue
        opened.append((st.st_size, entry, fd, st))
    opened.sort(key=lambda item: (item[0], item[1].path))
    files = []
    total = 0
    try:
        for number, (size, entry, fd, st) in enumerate(opened):
            record = WrittenFile(
                path=entry.path,
                size=size,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                policy=APPEND,
                access=sorted(entry.access),
            )
            if not entry.append_only:
                if size > file_max:
                    record.policy, record.limit, record.limit_bytes = (
                        UNSAVED,
                        "CCR_SAVE_FILE_MAX",
                        file_max,
                    )
                    record.digest = _digest(fd, size, None, entry.path)
                elif total + size > total_max:
                    record.policy, record.limit, record.limit_bytes = (
                        UNSAVED,
                        "CCR_SAVE_FILES_TOTAL",
                        total_max,
                    )
                    record.digest = _digest(fd, size, None, entry.path)
                else:
                    record.policy = SAVED
                    record.copy = f"{COPY_PREFIX}{number}"
                    record.digest = _digest(fd, size, dest / record.copy, entry.path)
                    total += size
            files.append(record)
    finally:
        for _, _, fd, _ in opened:
            os.close(fd)
    return sorted(files, key=lambda f: f.path)


def _digest(fd: int, size: int, copy: Path | None, path: str) -> str:
    """The digest of fd's first size bytes, copied into `copy` (0600) if given."""
    digest = new_hash(DEFAULT_ALGORITHM)
    out = None
    if copy is not None:
        out = os.open(copy, _NEW, 0o600)
    try:
        left, offset = size, 0
        while left > 0:
            chunk = os.pread(fd, min(_CHUNK, left), offset)
            if not chunk:
                raise StorageError(f"{path} shrank while the tree was frozen")
            digest.update(chunk)
            if out is not None:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            left -= len(chunk)
            offset += len(chunk)
    finally:
        if out is not None:
            os.close(out)
    return digest.hexdigest()


# --- restart --------------------------------------------------------------------------------


@dataclass
class FilePlan:
    """What a restart will do to one WrittenFile, and why."""

    file: WrittenFile
    action: str
    detail: str
    current_size: int | None = None

    def describe(self) -> str:
        """E.g. "truncate from 9216 to 8192 bytes (...)", "refuse: /x changed since ..."."""
        sep = ": " if self.action in (REFUSE, UNCHANGED, KEEP) else " "
        return f"{self.action}{sep}{self.detail}"

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.file.path,
            "action": self.action,
            "size": self.file.size,
            "current_size": self.current_size,
        }


def _prefix_digest(path: str, size: int, algorithm: str) -> str:
    digest = new_hash(algorithm)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left, offset = size, 0
        while left > 0:
            chunk = os.pread(fd, min(_CHUNK, left), offset)
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def backup_name(path: str, generation: int, suffix: str = "") -> Path:
    """`<name>.ccr-<generation><suffix>`, or `.ccr-<generation>.2<suffix>`... if taken: a
    restart never overwrites an earlier one's copy."""
    n = 1
    while True:
        tag = f".ccr-{generation}" + (f".{n}" if n > 1 else "")
        candidate = Path(f"{path}{tag}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def plan(files: list[WrittenFile], generation: int) -> list[FilePlan]:
    """What restart will do to each file, looking only (nothing is changed)."""
    plans = []
    for f in files:
        plans.append(_plan_one(f, generation))
    return plans


def _plan_one(f: WrittenFile, generation: int) -> FilePlan:
    if f.policy == APPEND:
        return FilePlan(f, KEEP, "append-only (O_APPEND), left as it is: it goes on growing")
    try:
        st = os.lstat(f.path)
    except FileNotFoundError:
        if not Path(f.path).parent.is_dir():
            return FilePlan(f, REFUSE, f"{f.path}: its directory is gone")
        if f.policy == SAVED:
            return FilePlan(f, RESTORE, f"from the checkpoint ({_mib(f.size)}): it is gone")
        return FilePlan(f, REFUSE, _refusal(f, "is gone"))
    except OSError as exc:
        return FilePlan(f, REFUSE, f"{f.path}: cannot be read ({exc.strerror})")
    if not stat.S_ISREG(st.st_mode):
        return FilePlan(f, REFUSE, f"{f.path} is no longer a regular file", st.st_size)
    same_prefix = False
    if st.st_size >= f.size:
        try:
            same_prefix = _prefix_digest(f.path, f.size, f.algorithm) == f.digest
        except OSError as exc:
            return FilePlan(f, REFUSE, f"{f.path}: cannot be read ({exc.strerror})", st.st_size)
    # CRIU checks the mode as well as the size ("File ... has bad mode").
    mode = stat.S_IMODE(st.st_mode)
    if same_prefix and st.st_size == f.size and mode == f.mode:
        return FilePlan(f, UNCHANGED, "as at the checkpoint", st.st_size)
    if f.policy == SAVED:
        kept = backup_name(f.path, generation)
        return FilePlan(
            f,
            RESTORE,
            f"from the checkpoint ({_mib(f.size)}); the current version "
            f"({_mib(st.st_size)}) is kept as {kept.name}",
            st.st_size,
        )
    if mode != f.mode:
        # Not ours to chmod: a file ccr did not create keeps the mode its owner gave it.
        return FilePlan(
            f,
            REFUSE,
            f"{f.path} has mode {mode:04o}, at the checkpoint it had {f.mode:04o}, which CRIU "
            f"needs to restore it: chmod {f.mode:04o} {f.path}",
            st.st_size,
        )
    if same_prefix:
        tail = backup_name(f.path, generation, ".tail")
        return FilePlan(
            f,
            TRUNCATE,
            f"from {st.st_size} to {f.size} bytes (written only past its checkpointed "
            f"size); the {st.st_size - f.size} bytes cut are kept as {tail.name}",
            st.st_size,
        )
    return FilePlan(f, REFUSE, _refusal(f, "changed since the checkpoint"), st.st_size)


def _refusal(f: WrittenFile, what: str) -> str:
    if f.limit == "CCR_SAVE_FILES_TOTAL":
        why = f"the checkpoint's saved files had reached CCR_SAVE_FILES_TOTAL={f.limit_bytes}"
        fix = "raise CCR_SAVE_FILES_TOTAL"
    else:
        why = f"{f.size} bytes, over CCR_SAVE_FILE_MAX={f.limit_bytes}"
        fix = f"set CCR_SAVE_FILE_MAX to at least {f.size}"
    return (
        f"{f.path} {what}, and the checkpoint could not save it ({why}): the job cannot "
        f"resume beside it; {fix} so that the next checkpoint saves it"
    )


def refuse_if_needed(plans: list[FilePlan], what: str) -> None:
    """Raise naming the first file that blocks the restart of `what`."""
    for p in plans:
        if p.action == REFUSE:
            raise StorageError(f"cannot restart {what}: {p.detail}")


Undo = Callable[[], None]


def put_back(plans: list[FilePlan], copies: Path, generation: int, what: str) -> Undo:
    """Make every planned file as it was at the checkpoint; return what undoes it all.

    Each saved file is written to a temporary file beside it (the recorded mode and owner,
    fsync'd) and renamed over it; the version it replaces stays as `<name>.ccr-<gen>` (a
    hard link: no copy).  A truncated file's cut bytes are first copied into
    `<name>.ccr-<gen>.tail`.  The undo (for a restore that then fails) brings each file
    back as it was found, so a failed restart changes nothing.
    """
    refuse_if_needed(plans, what)
    undo: list[Undo] = []

    def undo_all() -> None:
        for step in reversed(undo):
            try:
                step()
            except OSError:
                pass

    try:
        for p in plans:
            if p.action == RESTORE:
                undo.append(_restore(p.file, copies, generation))
            elif p.action == TRUNCATE:
                undo.append(_truncate(p.file, generation))
    except OSError as exc:
        undo_all()
        raise StorageError(
            f"cannot put back {exc.filename or 'a file'} for {what}: {exc.strerror}"
        ) from None
    except BaseException:
        undo_all()
        raise
    return undo_all


def _fsync_parent(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore(f: WrittenFile, copies: Path, generation: int) -> Undo:
    assert f.copy is not None
    target = Path(f.path)
    source = copies / f.copy
    tmp = target.with_name(f".{target.name}.ccr-tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a restart killed mid-way with our pid
    digest = new_hash(f.algorithm)
    size = 0
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"checkpoint file missing: {source}") from None

    def chunks() -> Iterator[bytes]:
        nonlocal size
        while chunk := os.read(src, _CHUNK):
            digest.update(chunk)
            size += len(chunk)
            yield chunk
        if size != f.size or digest.hexdigest() != f.digest:
            raise IntegrityError(f"checkpoint file {source} (of {f.path}) is corrupted")

    try:
        _write_sealed(tmp, chunks(), f.uid, f.gid, f.mode)
    finally:
        os.close(src)
    kept: Path | None = None
    if os.path.lexists(target):
        kept = backup_name(f.path, generation)
        try:
            os.link(target, kept, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                tmp.unlink(missing_ok=True)
                raise
            _copy_range(target, kept, 0)
    try:
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if kept is not None:
            kept.unlink(missing_ok=True)
        raise
    _fsync_parent(target)

    def undo() -> None:
        if kept is not None:
            os.rename(kept, target)
        else:
            target.unlink(missing_ok=True)

    return undo


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


def _seal(fd: int, uid: int, gid: int, mode: int) -> None:
    """Give a file ccr wrote back its owner and mode, then make it durable."""
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        pass  # not root: the file stays ours, which is whose it was
    os.fchmod(fd, mode)
    os.fsync(fd)


def _copy_range(src: Path, dst: Path, offset: int) -> None:
    """Copy src from offset to its end into a new dst with src's mode and owner, fsync'd."""
    st = os.stat(src)
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def chunks() -> Iterator[bytes]:
        at = offset
        while chunk := os.pread(fd_in, _CHUNK, at):
            at += len(chunk)
            yield chunk

    try:
        _write_sealed(dst, chunks(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd_in)


def _write_sealed(dst: Path, chunks: Iterable[bytes], uid: int, gid: int, mode: int) -> None:
    """Write chunks into a new dst (never through a link), then _seal it; on any failure,
    including one raised by chunks itself (a digest mismatch), dst is removed."""
    try:
        out = os.open(dst, _NEW, 0o600)
        try:
            for chunk in chunks:
                _write_all(out, chunk)
            _seal(out, uid, gid, mode)
        finally:
            os.close(out)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _truncate(f: WrittenFile, generation: int) -> Undo:
    target = Path(f.path)
    tail = backup_name(f.path, generation, ".tail")
    _copy_range(target, tail, f.size)
    os.truncate(target, f.size)

    def undo() -> None:
        with open(tail, "rb") as src, open(target, "r+b") as dst:
            dst.seek(f.size)
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        tail.unlink()

    return undo
