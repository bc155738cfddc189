"""openfiles on real files and this process's own /proc: which files count as written, what
a restart does to each (plan), putting them back atomically and undoing that."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccr.config import parse_size
from ccr.engines import openfiles
from ccr.errors import StorageError, UsageError
from ccr.storage.manifest import APPEND, SAVED, UNSAVED, StepManifest, WrittenFile


def test_parse_size() -> None:
    assert parse_size("4096", "X") == 4096
    assert parse_size("32K", "X") == 32 << 10
    assert parse_size("256M", "X") == 256 << 20
    assert parse_size("1GiB", "X") == 1 << 30
    assert parse_size("0", "X") == 0
    for bad in ("", "abc", "-1", "1.5G", "12Q"):
        with pytest.raises(UsageError, match="bad X"):
            parse_size(bad, "X")


def test_written_by_lists_files_open_for_writing_or_mapped_shared(tmp_path: Path) -> None:
    w = open(tmp_path / "w.log", "w")  # noqa: SIM115
    rw = open(tmp_path / "rw.db", "w+b")  # noqa: SIM115
    app = open(tmp_path / "a.log", "a")  # noqa: SIM115
    ro = open(tmp_path / "ro.txt", "w+")  # noqa: SIM115
    ro.close()
    ro = open(tmp_path / "ro.txt")  # noqa: SIM115
    gone = open(tmp_path / "gone.tmp", "w")  # noqa: SIM115
    os.unlink(tmp_path / "gone.tmp")
    (tmp_path / "shm").write_bytes(b"\0" * 4096)
    fd = os.open(tmp_path / "shm", os.O_RDWR)
    mapped = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
    os.close(fd)  # (Python's mmap keeps a dup of it, O_RDWR)
    try:
        found = {Path(e.path).name: e for e in openfiles.written_by([os.getpid()])}
        assert {"w.log", "rw.db", "a.log", "shm"} <= set(found)
        assert "ro.txt" not in found and "gone.tmp" not in found
        assert found["w.log"].access == {"O_WRONLY"} and not found["w.log"].append_only
        assert found["rw.db"].access == {"O_RDWR"}
        assert found["a.log"].append_only
        assert "mmap shared" in found["shm"].access
        assert not any(p.startswith(("/dev/", "/proc/")) for p in (e.path for e in found.values()))
    finally:
        mapped.close()
        for f in (w, rw, app, ro, gone):
            f.close()


def test_a_shared_mapping_alone_counts(tmp_path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    (tmp_path / "only-mapped").write_bytes(b"\0" * 4096)
    (tmp_path / "private").write_bytes(b"\0" * 4096)
    fd = os.open(tmp_path / "only-mapped", os.O_RDWR)
    shared = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    fd = os.open(tmp_path / "private", os.O_RDWR)
    private = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    os.close(fd)
    try:
        found = {Path(e.path).name: e for e in openfiles.written_by([os.getpid()])}
        assert found["only-mapped"].access == {"mmap shared"}
        assert "private" not in found, "a private mapping never writes its file"
    finally:
        libc.munmap(shared, 4096)
        libc.munmap(private, 4096)


def test_collect_saves_within_limits(tmp_path: Path) -> None:
    small, big, app = tmp_path / "small", tmp_path / "big", tmp_path / "app"
    dest = tmp_path / "dest"
    dest.mkdir()
    # A child holding exactly these three files: pytest's own process holds whatever files
    # earlier tests of the session left open, which collect would save too.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "hs = [open(sys.argv[1], 'wb'), open(sys.argv[2], 'wb'), open(sys.argv[3], 'ab')]\n"
            "for h, n in zip(hs, (100, 5000, 10)):\n"
            "    h.write(b'sba'[hs.index(h):hs.index(h) + 1] * n); h.flush()\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
            str(small),
            str(big),
            str(app),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        files = {Path(f.path).name: f for f in openfiles.collect([holder.pid], dest, 1000, 10_000)}
    finally:
        holder.kill()
        holder.wait()
    assert files["small"].policy == SAVED and files["small"].size == 100
    assert (dest / str(files["small"].copy)).read_bytes() == b"s" * 100
    assert files["big"].policy == UNSAVED and files["big"].limit == "CCR_SAVE_FILE_MAX"
    assert files["big"].digest and files["big"].copy is None
    assert files["app"].policy == APPEND and files["app"].digest == ""
    assert sorted(p.name for p in dest.iterdir()) == [files["small"].copy]


def record(path: Path, policy: str, copies: Path | None = None, **kw: object) -> WrittenFile:
    """A WrittenFile for path as it is now (saved into copies when given)."""
    from ccr.storage.hashing import file_digest

    st = path.stat()
    copy = None
    if copies is not None:
        copy = f"ccr-file-{path.name}"
        (copies / copy).write_bytes(path.read_bytes())
    return WrittenFile(
        path=str(path),
        size=st.st_size,
        mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
        policy=policy,
        digest=file_digest(path),
        copy=copy,
        **kw,  # type: ignore[arg-type]
    )


def test_plan_and_put_back_each_case(tmp_path: Path) -> None:
    copies = tmp_path / "copies"
    copies.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    changed, same, deleted = work / "changed.log", work / "same.log", work / "deleted.log"
    grown, rewritten, log = work / "grown.bin", work / "rewritten.bin", work / "out.log"
    for path in (changed, same, deleted, grown, rewritten, log):
        path.write_bytes(b"at checkpoint\n")
    changed.chmod(0o640)
    files = [record(p, SAVED, copies) for p in (changed, same, deleted)]
    files += [
        record(p, UNSAVED, limit="CCR_SAVE_FILE_MAX", limit_bytes=4) for p in (grown, rewritten)
    ]
    files.append(record(log, APPEND))
    # The job runs on after the checkpoint.
    changed.write_bytes(b"at checkpoint\nand later\n")
    changed.chmod(0o600)
    deleted.unlink()
    with open(grown, "ab") as fh:
        fh.write(b"appended later\n")
    rewritten.write_bytes(b"AT CHECKPOINT\nand later\n")
    with open(log, "ab") as fh:
        fh.write(b"more\n")

    plans = {Path(p.file.path).name: p for p in openfiles.plan(files, 7)}
    actions = {name: p.action for name, p in plans.items()}
    assert actions == {
        "changed.log": "restore",
        "same.log": "unchanged",
        "deleted.log": "restore",
        "grown.bin": "truncate",
        "rewritten.bin": "refuse",
        "out.log": "append",
    }
    assert "changed.log.ccr-7" in plans["changed.log"].describe()
    refusal = plans["rewritten.bin"].describe()
    assert refusal.startswith("refuse: ") and str(rewritten) in refusal
    assert "CCR_SAVE_FILE_MAX" in refusal
    with pytest.raises(StorageError, match="rewritten.bin.*CCR_SAVE_FILE_MAX"):
        openfiles.put_back(list(plans.values()), copies, 7, "9490.0")
    assert rewritten.read_bytes() == b"AT CHECKPOINT\nand later\n", "refused: nothing changed"
    assert not (work / "changed.log.ccr-7").exists()

    good = [p for p in plans.values() if p.action != "refuse"]
    undo = openfiles.put_back(good, copies, 7, "9490.0")
    assert changed.read_bytes() == b"at checkpoint\n"
    assert changed.stat().st_mode & 0o777 == 0o640, "the mode at the checkpoint"
    assert (work / "changed.log.ccr-7").read_bytes() == b"at checkpoint\nand later\n"
    assert deleted.read_bytes() == b"at checkpoint\n"
    assert grown.read_bytes() == b"at checkpoint\n"
    assert (work / "grown.bin.ccr-7.tail").read_bytes() == b"appended later\n"
    assert log.read_bytes() == b"at checkpoint\nmore\n", "append-only files are left alone"
    assert not [p for p in work.iterdir() if ".ccr-tmp-" in p.name]

    # A failed restore undoes it all.
    undo()
    assert changed.read_bytes() == b"at checkpoint\nand later\n"
    assert not deleted.exists()
    assert grown.read_bytes() == b"at checkpoint\nappended later\n"
    assert not (work / "changed.log.ccr-7").exists()
    assert not (work / "grown.bin.ccr-7.tail").exists()

    # A second restart from the same generation never overwrites the first one's copy.
    openfiles.put_back(openfiles.plan(files[:1], 7), copies, 7, "9490.0")
    changed.write_bytes(b"again\n")
    openfiles.put_back(openfiles.plan(files[:1], 7), copies, 7, "9490.0")
    assert (work / "changed.log.ccr-7").read_bytes() == b"at checkpoint\nand later\n"
    assert (work / "changed.log.ccr-7.2").read_bytes() == b"again\n"


def test_a_changed_mode_is_restored_or_named(tmp_path: Path) -> None:
    saved, unsaved = tmp_path / "saved", tmp_path / "unsaved"
    for path in (saved, unsaved):
        path.write_bytes(b"x\n")
        path.chmod(0o640)
    files = [record(saved, SAVED, tmp_path), record(unsaved, UNSAVED)]
    for path in (saved, unsaved):
        path.chmod(0o600)
    restore, refuse = openfiles.plan(files, 3)
    assert restore.action == "restore"
    assert refuse.action == "refuse" and f"chmod 0640 {unsaved}" in refuse.detail
    openfiles.put_back([restore], tmp_path, 3, "9492.0")
    assert saved.stat().st_mode & 0o777 == 0o640
    assert unsaved.stat().st_mode & 0o777 == 0o600, "never chmod'ed by ccr"


def test_put_back_refuses_a_corrupted_copy(tmp_path: Path) -> None:
    target = tmp_path / "f.log"
    target.write_bytes(b"checkpoint\n")
    f = record(target, SAVED, tmp_path)
    target.write_bytes(b"later\n")
    (tmp_path / str(f.copy)).write_bytes(b"CHECKPOINT\n")
    with pytest.raises(Exception, match="corrupted"):
        openfiles.put_back(openfiles.plan([f], 1), tmp_path, 1, "9491.0")
    assert target.read_bytes() == b"later\n"


def test_manifests_without_written_files_still_load() -> None:
    base = {
        "job_id": 1,
        "step_id": 0,
        "argv": ["x"],
        "cwd": "/",
        "output": "/o",
        "hostname": "h",
        "uid": 0,
        "gid": 0,
        "root_pid": 1,
        "pids": [1],
        "criu_version": "4.2.1",
        "created": 0.0,
        "leave_running": True,
        "format": 2,
    }
    assert StepManifest.from_dict(base).written_files == []
    f = WrittenFile("/x", 3, 0o644, 0, 0, SAVED, digest="d", copy="ccr-file-0")
    again = StepManifest.from_dict({**base, "written_files": [f.__dict__]})
    assert again.written_files == [f]
    assert StepManifest.from_dict(again.to_dict()).written_files == [f]


def test_manifest_format_3_only_with_files_to_put_back() -> None:
    base = StepManifest(1, 0, ["x"], "/", "/o", "h", 0, 0, 1, [1], "4.2.1", 0.0, True)
    assert base.to_dict()["format"] == 2, "an older ccr still restores it"
    base.written_files = [WrittenFile("/o", 3, 0o644, 0, 0, APPEND)]
    assert base.to_dict()["format"] == 2
    base.written_files.append(WrittenFile("/x", 3, 0o644, 0, 0, UNSAVED, digest="d"))
    assert base.to_dict()["format"] == 3, "a ccr that cannot put files back refuses it"
