"""The manifest inside every checkpoint: what restart needs, each file's checksum, an HMAC."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ccr.errors import IntegrityError, StorageError
from ccr.storage.hashing import DEFAULT_ALGORITHM, file_digest, file_digests

MANIFEST = "manifest.json"
JOB_MANIFEST = "job.json"
# 2: file digests name their algorithm (BLAKE3); format 1 had a SHA-256 per file.
# 3: `written_files`, the job's own files that a restart puts back (a ccr reading only up to
# format 2 would ignore them and could restore a job beside files it never wrote).
# 4: `frames`, a digest per stored frame of each file, so a restart checks each frame as it
# hands it to CRIU (one read of the images, nothing unverified reaches the tree).
FORMAT = 4
# Uncompressed files are digested in pieces of this many bytes (compression.FRAME_SIZE).
FRAME_BYTES = 8 << 20


@dataclass
class FileEntry:
    """One file of a checkpoint, as stored (compressed or not)."""

    name: str
    size: int
    digest: str  # hex, of the stored bytes
    raw_size: int = 0
    codec: str = "none"
    algorithm: str = DEFAULT_ALGORITHM
    # Format 4: the digest (algorithm) of each stored frame, in order: a zstd file's frames
    # as they lie in it; an uncompressed file's pieces of frame_bytes bytes.  Empty in older
    # manifests: then only the whole file's digest, checked once it was all read.
    frames: list[str] = field(default_factory=list)
    frame_bytes: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileEntry:
        data = dict(data)
        if "sha256" in data:  # format 1
            data["digest"] = data.pop("sha256")
            data["algorithm"] = "sha256"
        return cls(**data)


@dataclass(frozen=True)
class Frame:
    """One zstd frame of a stored file: raw offset and size, stored offset and length."""

    raw: int
    size: int
    at: int
    length: int


def frames_of(entry: FileEntry, table: dict[str, Any] | None) -> list[Frame]:
    """The frames of a stored file from its manifest's frame table ([] when it has none)."""
    if not table:
        return []
    try:
        step, lengths = int(table["raw"]), [int(n) for n in table["stored"]]
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"manifest of {entry.name} has a bad frame table") from None
    out, raw, at = [], 0, 0
    for length in lengths:
        size = min(step, entry.raw_size - raw)
        out.append(Frame(raw, size, at, length))
        raw, at = raw + size, at + length
    if at != entry.size or raw != entry.raw_size or step <= 0:
        raise IntegrityError(f"manifest of {entry.name}: its frame table does not add up")
    return out


# How a restart treats a file the tree was writing (WrittenFile.policy).
SAVED = "saved"  # a copy is in the checkpoint: put back as it was
UNSAVED = "unsaved"  # too large to save: truncated back if only written past its size
APPEND = "append"  # only open O_WRONLY|O_APPEND (like the step's output): left to grow


@dataclass
class WrittenFile:
    """A regular file the tree had open for writing, or mapped shared, at the checkpoint."""

    path: str
    size: int  # at the checkpoint (what CRIU's image expects at restore)
    mode: int
    uid: int
    gid: int
    policy: str  # SAVED, UNSAVED or APPEND
    digest: str = ""  # of its `size` bytes at the checkpoint (empty for APPEND)
    algorithm: str = DEFAULT_ALGORITHM
    copy: str | None = None  # SAVED: its copy's name among the checkpoint's (raw) files
    # UNSAVED: the setting that kept it out ("CCR_SAVE_FILE_MAX" or "CCR_SAVE_FILES_TOTAL")
    # and that setting's value at the checkpoint.
    limit: str = ""
    limit_bytes: int = 0
    access: list[str] = field(default_factory=list)  # e.g. ["O_RDWR", "mmap shared"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WrittenFile:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StepManifest:
    """Everything a restart of one step needs, so an image directory stands on its own."""

    job_id: int
    step_id: int
    argv: list[str]
    cwd: str
    output: str
    hostname: str
    uid: int
    gid: int
    root_pid: int
    pids: list[int]
    criu_version: str
    created: float
    leave_running: bool
    frozen_time: float = 0.0
    total_time: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    generation: int = 0
    parent: str | None = None
    restart_count: int = 0
    compression: str = "none"
    gpu: dict[str, Any] = field(default_factory=dict)
    # CRIU dumped established TCP connections: the restore must restore them too.
    tcp_established: bool = False
    network_lock: str = ""  # CRIU's network lock of that dump ("": CRIU's default)
    # What the step had of its own (process.step_world): mount/IPC namespaces, private /tmp.
    world: dict[str, bool] = field(default_factory=dict)
    error: str | None = None  # stderr's own file (-e), reopened by the restored tree
    written_files: list[WrittenFile] = field(default_factory=list)
    # Each compressed file's zstd frames: {"raw": raw bytes a frame (the last: fewer),
    # "stored": [stored length of each frame]}, so a lazy restart finds the frame holding
    # any page without reading the file (a walk of 4 GiB's block headers on cold storage
    # took seconds).  Older ccr versions ignore it (an unknown key); without it a lazy
    # restart walks the frames.
    frame_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def image_bytes(self) -> int:
        return sum(f.raw_size or f.size for f in self.files)

    @property
    def stored_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_bytes"] = self.image_bytes
        data["stored_bytes"] = self.stored_bytes
        if self.format == FORMAT:
            # The oldest format that says all of it, so an older ccr restores what it can.
            if any(f.frames for f in self.files):
                data["format"] = 4
            elif any(f.policy != APPEND for f in self.written_files):
                data["format"] = 3
            else:
                data["format"] = 2  # nothing to put back: a ccr that reads format 2 restores it
            if data["format"] < 4:
                for entry in data["files"]:
                    del entry["frames"], entry["frame_bytes"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepManifest:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["files"] = [FileEntry.from_dict(f) for f in data.get("files", [])]
        # Older manifests (formats 1 and 2) have none: such jobs restart as before.
        kwargs["written_files"] = [WrittenFile.from_dict(f) for f in data.get("written_files", [])]
        return cls(**kwargs)


@dataclass
class JobManifest:
    """A whole-job checkpoint: which steps it holds (one sub-directory each)."""

    job_id: int
    steps: list[int]
    created: float
    hostname: str
    generation: int = 0
    total_time: float = 0.0
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobManifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def describe_files(directory: Path, skip: tuple[str, ...] = (MANIFEST,)) -> list[FileEntry]:
    """A FileEntry for every regular file directly in directory (sorted by name)."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.name in skip or not path.is_file():
            continue
        size = path.stat().st_size
        whole, frames = file_digests(path, piece=FRAME_BYTES)
        entries.append(
            FileEntry(path.name, size, whole, raw_size=size, frames=frames, frame_bytes=FRAME_BYTES)
        )
    return entries


class ManifestKey:
    """The HMAC key that authenticates manifests (state dir, 0600, created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, create: bool) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
        key = secrets.token_bytes(32)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        try:
            os.link(tmp, self.path)  # first writer wins; everybody then reads the same key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self.path.read_bytes()


def _mac(key: bytes, data: dict[str, Any]) -> str:
    body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_signed(path: Path, data: dict[str, Any], key: bytes) -> None:
    """Write data plus its HMAC as JSON, 0600, fsync'd."""
    signed = dict(data)
    signed["hmac"] = _mac(key, data)
    text = json.dumps(signed, indent=2, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any]:
    """A manifest's JSON, unverified (for display)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"missing manifest {path}") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"unreadable manifest {path}: {exc}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"malformed manifest {path}")
    return data


def read_verified(path: Path, key: bytes | None) -> dict[str, Any]:
    """A manifest's JSON after checking its HMAC; a tampered or unsigned one is refused."""
    data = read_json(path)
    mac = data.pop("hmac", None)
    if key is None:
        raise IntegrityError(
            f"cannot authenticate {path}: no manifest key in this state directory "
            "(restore only images made with this CCR_STATE_DIR's key)"
        )
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, data)):
        raise IntegrityError(f"manifest {path} failed authentication (tampered or foreign key)")
    return data


def load_step_manifest(directory: Path, key: bytes | None) -> StepManifest:
    data = read_verified(directory / MANIFEST, key)
    version = data.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise IntegrityError(
            f"manifest {directory / MANIFEST} has format {version!r}; this ccr reads up to "
            f"{FORMAT} (a newer ccr made it)"
        )
    try:
        return StepManifest.from_dict(data)
    except TypeError as exc:
        raise IntegrityError(f"malformed manifest {directory / MANIFEST}: {exc}") from None


def verify_files(
    directory: Path,
    manifest: StepManifest,
    hash_packed: bool = True,
    hash_raw: bool = True,
    later: Callable[[FileEntry], bool] | None = None,
) -> None:
    """Check every file the manifest lists (size, then digest); raise naming the first bad one.

    hash_packed=False skips the digest of compressed files, hash_raw=False that of the
    others, for callers that read them next and check it in that same read pass;
    later(entry) true skips the digest of a file the caller checks itself afterwards (a
    lazy restart's pages files).
    """
    listed = {f.name for f in manifest.files}
    for entry in manifest.files:
        path = directory / entry.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"checkpoint file missing: {path}") from None
        if size != entry.size:
            raise IntegrityError(
                f"checkpoint file {path} is {size} bytes, manifest says {entry.size} (truncated?)"
            )
        if later is not None and later(entry):
            continue
        if (hash_packed if entry.codec != "none" else hash_raw) and file_digest(
            path, entry.algorithm
        ) != entry.digest:
            raise IntegrityError(f"checkpoint file {path} is corrupted (checksum mismatch)")
    extra = [p.name for p in directory.iterdir() if p.is_file() and p.name not in listed]
    extra = [n for n in extra if n != MANIFEST]
    if extra:
        raise IntegrityError(f"unexpected file in checkpoint {directory}: {sorted(extra)[0]}")
