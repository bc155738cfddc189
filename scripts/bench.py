#!/usr/bin/env python3
"""Benchmark checkpoint image compression against raw CRIU, side by side, as markdown tables.

For each payload size and memory kind one target process is started (PID namespace init,
own session, stdin /dev/null; with the ccr rows two more, under `ccr run`) and cycled
through dump -> store -> restore once per variant and repetition, the variant order rotating
between repetitions:

  criu     `criu dump` straight into the storage directory, fsync'd; `criu restore` from it
           (the floor);
  none     dump into scratch (tmpfs), ccr's compress_dir with codec none into storage;
           restart: decompress_dir back into scratch, then `criu restore`;
  zstd-L   the same with compress_dir's zstd at level L (ccr.engines.compression);
  gzip-6   the same with python's gzip at level 6 (DMTCP's codec), one stream per file;
  lz4      the same with python's lz4 frame format (default level, content checksum);
  criu@ccr raw `criu dump`/`criu restore` as in criu, but of a target that `ccr run` launched
           (dumb-init as PID 1 of ccr's PID namespace, the payload below it): the floor the
           ccr rows are compared with, same payload, same run;
  ccr-none ccr end to end, through its CLI with a private CCR_STATE_DIR: the target runs
           under `ccr run --detach`; `ccr create J.0 --stop --compress none --json`, then
           `ccr restart J.0 --json` (the restored step is supervised by ccr again);
  ccr-zstd1  the same with `--compress zstd:1`.

Columns: frozen time (CRIU's frozen_time: the application's downtime), checkpoint total
(dump plus store, durable), restart total (unpack plus `criu restore`), stored size and
compression ratio, each time and size also as a multiple of raw CRIU's (for the ccr rows: of
criu@ccr's).  For the ccr rows frozen and ckpt total are the figures `ccr create --json`
reports (frozen_time, total_time), restart is the wall time of the whole `ccr restart` CLI
call (manifest and digest checks, unpack, restore, hand-over to a supervisor), and an
extra column gives the wall time of the `ccr create` call and ccr's own restore_time (with, in
brackets, its unpack_time: decompressing and verifying the stored images).  Every
cell is the median over --reps.  The page cache of the stored files is dropped before each
restart, so restarts read storage cold.  A second table compares python-zstandard (compress_file /
decompress_file) with the `zstd -T0 -L` CLI on the same pages image.  At the end of each
series the target recomputes the CRC32 of its memory, which must match its first one.

Needs root, CRIU, numpy (the targets fill memory with it), lz4 and the zstd CLI.  It kills
every process it started, by PID, on the way out.  Run from the repository root:
    .venv/bin/python scripts/bench.py [--quick] [--sizes 256M,1G] [--kinds realistic]
        [--variants criu,criu@ccr,ccr-none,ccr-zstd1] [--out results.md]
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lz4.frame
import psutil
import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.engines.compression import (  # noqa: E402 - after the sys.path fix-up above
    DEFAULT_LEVEL,
    FRAME_SIZE,
    SMALL_FILE,
    WORKERS,
    Codec,
    HashingWriter,
    compress_dir,
    compress_file,
    decompress_dir,
    decompress_file,
)
from ccr.engines.criu import read_dump_stats  # noqa: E402
from ccr.engines.process import reap_exited_children  # noqa: E402
from ccr.storage.imageset import fsync_tree  # noqa: E402 - ccr's own: fsync, then drop from cache
from ccr.storage.manifest import FileEntry  # noqa: E402

MiB = 1 << 20
CHUNK = MiB
PR_SET_CHILD_SUBREAPER = 36
# ccr's own rows, with the --compress spec each passes, and raw CRIU on a ccr-launched tree.
CCR_VARIANTS = {"ccr-none": "none", "ccr-zstd1": "zstd:1", "ccr-zstd1-lazy": "zstd:1"}
# Variants restarted with `ccr restart --lazy` (the tree runs before its memory is in).
LAZY_VARIANTS = {"ccr-zstd1-lazy"}
# Issue 15's lazy targets: the tree runs this soon at 4 GiB, and the background fill
# brings memory in at this fraction of the eager restore's throughput at least.
LAZY_RESUME_S = 0.5
LAZY_FILL_SHARE = 0.8
RAW_ON_CCR = "criu@ccr"
# --restart's rows (issue 15): how each restarts, as (`ccr restart` arguments, environment).
# The -scratch rows restore as ccr did before streaming (decoded copy in scratch, then RPC).
# The lazy row restarts with --lazy (LAZY_VARIANTS); its fill_time fills the fill column.
RESTART_VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "ccr-none": ([], {}),
    "ccr-zstd1": ([], {}),
    "ccr-none-scratch": ([], {"CCR_RESTORE_STREAM": "0"}),
    "ccr-zstd1-scratch": ([], {"CCR_RESTORE_STREAM": "0"}),
    "ccr-zstd1-lazy": ([], {}),
}
for _name in RESTART_VARIANTS:
    CCR_VARIANTS.setdefault(_name, "none" if _name.startswith("ccr-none") else "zstd:1")

# The target: fills `size` bytes in 16 MiB arrays, prints its CRC32, then sleeps; SIGUSR1
# makes it print the CRC again (after dump/restore cycles it must not have changed).
TARGET = r"""
import os, signal, sys, zlib
import numpy as np

size, kind = int(sys.argv[1]), sys.argv[2]
# Our own output file, which only we write: CRIU refuses to restore a file whose size changed.
out = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(out, 1)
os.dup2(out, 2)
os.close(out)
rng = np.random.Generator(np.random.SFC64(20261123))
chunk = 16 << 20
arrays = []
for i, start in enumerate(range(0, size, chunk)):
    n = min(chunk, size - start)
    if kind == "random":
        a = rng.integers(0, 255, n, dtype=np.uint8, endpoint=True)
    elif i % 3 == 0:  # fp32 weights, N(0, 0.02)
        a = rng.standard_normal(n // 4, dtype=np.float32) * np.float32(0.02)
    elif i % 3 == 1:  # fp32 gradients, 90% exact zeros
        a = np.zeros(n // 4, dtype=np.float32)
        hot = rng.random(a.size, dtype=np.float32) < 0.1
        a[hot] = rng.standard_normal(int(hot.sum()), dtype=np.float32) * np.float32(1e-3)
    else:  # int64 token ids, log-uniform over a GPT-2-sized vocabulary (Zipf-like)
        u = rng.random(n // 8)
        a = (np.exp(u * np.log(50257.0)) - 1.0).astype(np.int64)
    arrays.append(a)

def crc():
    value = 0
    for a in arrays:
        value = zlib.crc32(memoryview(a).cast("B"), value)
    return value

signal.signal(signal.SIGUSR1, lambda *_: print("crc", crc(), flush=True))
print("ready", crc(), flush=True)
while True:
    signal.pause()
"""


# --- small helpers -------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    return f"{size >> 30}G" if size % (1 << 30) == 0 else f"{size >> 20}M"


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in files_of(directory))


def evict(directory: Path) -> None:
    # drop_caches may be read-only here (perf-baselines.md §0.8); fadvise works per file.
    for path in files_of(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- codecs for the comparison (ccr's own compress_dir covers none and zstd) ---------------


def stream_pack(src_dir: Path, dst_dir: Path, suffix: str, pack: Callable) -> list[FileEntry]:
    """compress_dir's policy (small files raw, fsync everything) with another codec."""
    entries = []
    for path in files_of(src_dir):
        raw = path.stat().st_size
        small = raw < SMALL_FILE
        name = path.name if small else path.name + suffix
        fd = os.open(dst_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            sink = HashingWriter(fd)
            with path.open("rb", buffering=0) as src:
                if small:
                    shutil.copyfileobj(src, sink, CHUNK)
                else:
                    pack(src, sink)
            os.fsync(fd)
        finally:
            os.close(fd)
        codec = "none" if small else suffix
        entries.append(FileEntry(name, sink.size, sink.hexdigest(), raw, codec))
    fsync_tree(dst_dir)
    return entries


def stream_unpack(src_dir: Path, dst_dir: Path, entries: list[FileEntry], opener: Callable) -> None:
    for entry in entries:
        small = entry.codec == "none"
        target = entry.name if small else entry.name.rsplit(".", 1)[0]
        fd = os.open(dst_dir / target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with (
                (src_dir / entry.name).open("rb") as raw,
                os.fdopen(fd, "wb", closefd=False) as out,
            ):
                src = raw if small else opener(raw)
                shutil.copyfileobj(src, out, CHUNK)
        finally:
            os.close(fd)


def gzip_pack(src, sink) -> None:  # noqa: ANN001 - file objects
    with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz:
        shutil.copyfileobj(src, gz, CHUNK)


def lz4_pack(src, sink) -> None:  # noqa: ANN001
    comp = lz4.frame.LZ4FrameCompressor(content_checksum=True)
    sink.write(comp.begin())
    while data := src.read(CHUNK):
        sink.write(comp.compress(data))
    sink.write(comp.flush())


def store(variant: str, stage: Path, storage: Path) -> list[FileEntry]:
    if variant == "none":
        return compress_dir(stage, storage, Codec("none", 0))
    if variant.startswith("zstd-"):
        return compress_dir(stage, storage, Codec("zstd", int(variant[5:])))
    if variant == "gzip-6":
        return stream_pack(stage, storage, ".gz", gzip_pack)
    if variant == "lz4":
        return stream_pack(stage, storage, ".lz4", lz4_pack)
    raise ValueError(variant)


def unstore(variant: str, storage: Path, stage: Path, entries: list[FileEntry]) -> None:
    if variant == "none" or variant.startswith("zstd-"):
        decompress_dir(storage, stage, entries)
    elif variant == "gzip-6":
        stream_unpack(storage, stage, entries, lambda f: gzip.GzipFile(fileobj=f, mode="rb"))
    elif variant == "lz4":
        stream_unpack(storage, stage, entries, lambda f: lz4.frame.LZ4FrameFile(f, mode="rb"))
    else:
        raise ValueError(variant)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Bench:
    criu: str
    scratch: Path
    storage: Path
    # Every process this run started (or CRIU restored for it), so finally can kill them.
    started: list[psutil.Process] = field(default_factory=list)
    # ccr jobs this run launched (cancelled on the way out) and the next job id to use.
    ccr_jobs: list[int] = field(default_factory=list)
    next_job: int = 1

    def run_criu(self, args: list[str], log_name: str) -> float:
        work = self.scratch / "work"
        work.mkdir(exist_ok=True)
        began = time.monotonic()
        proc = subprocess.run(
            [self.criu, *args, "-W", str(work), "-o", log_name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - began
        if proc.returncode != 0:
            tail = (work / log_name).read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"criu {args[0]} failed ({proc.returncode}):\n" + "\n".join(tail))
        return took

    def target_argv(
        self, size: int, kind: str, tag: str, where: Path | None = None
    ) -> tuple[list[str], Path]:
        where = where or self.scratch
        script = where / "target.py"
        script.write_text(TARGET)
        output = where / f"target-{size_label(size)}-{kind}{tag}.out"
        output.write_text("")
        return [sys.executable, str(script), str(size), kind, str(output)], output

    def start_target(self, size: int, kind: str) -> tuple[psutil.Process, Path]:
        argv, output = self.target_argv(size, kind, "")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MiB), OMP_NUM_THREADS="1")
        with (self.scratch / "launcher.log").open("a") as out:
            # A PID namespace of its own, so CRIU dumps and restores it whole with fresh PIDs.
            # No --kill-child: CRIU would restore its parent-death signal, which fires as soon
            # as CRIU exits.
            launcher = subprocess.Popen(
                ["unshare", "--pid", "--fork", "setsid", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.scratch,
                env=env,
                start_new_session=True,
            )
        self.started.append(psutil.Process(launcher.pid))
        wait_ready(output, lambda: launcher.poll() is None)
        (init,) = psutil.Process(launcher.pid).children()
        self.started.append(init)
        return init, output

    # --- ccr through its CLI ---------------------------------------------------------------

    @property
    def ccr_home(self) -> Path:
        return self.storage / "ccr"

    def ccr(
        self,
        args: list[str],
        socket: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[float, object]:
        """Run `python -m ccr ARGS --json` in the private state dir: (wall seconds, JSON);
        with socket, through the node service listening there (root with CCR_SOCKET);
        extra_env on top of the environment (e.g. CCR_RESTORE_STREAM)."""
        env = dict(
            os.environ,
            CCR_STATE_DIR=str(self.ccr_home / "state"),
            CCR_CRIU=self.criu,
            # This checkout's ccr (a worktree's), not whichever the venv has installed.
            PYTHONPATH=str(REPO),
            MALLOC_MMAP_THRESHOLD_=str(MiB),
            OMP_NUM_THREADS="1",
            **(extra_env or {}),
        )
        env.pop("CCR_COMPRESS", None)
        env.pop("CCR_SOCKET", None)
        if socket is not None:
            env["CCR_SOCKET"] = str(socket)
        began = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "ccr", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.ccr_home / "cwd",
            env=env,
        )
        took = time.monotonic() - began
        if proc.returncode != 0:
            raise RuntimeError(
                f"ccr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        return took, json.loads(proc.stdout) if "--json" in args else proc.stdout

    def start_ccr_target(self, size: int, kind: str) -> tuple[int, psutil.Process, Path]:
        """`ccr run --detach` the target: (job id, the step's init, the target's output)."""
        for sub in ("state", "cwd", "images"):
            (self.ccr_home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        job = self.next_job
        self.next_job += 1
        # In the step's cwd: a ccr step has /dev/shm (the scratch) and /tmp of its own.
        argv, output = self.target_argv(size, kind, f"-ccr{job}", self.ccr_home / "cwd")
        images = str(self.ccr_home / "images")
        self.ccr(["run", "--detach", "--job-id", str(job), "--checkpoint-dir", images, "--", *argv])
        self.ccr_jobs.append(job)
        init = self.adopt_ccr_step(job)
        wait_ready(output, init.is_running)
        return job, init, output

    def adopt_ccr_step(self, job: int) -> psutil.Process:
        """The live init of job's step 0 (its supervisor and tree noted for the final kill)."""
        _, status = self.ccr(["status", str(job), "--json"])
        (step,) = status["steps"]  # type: ignore[index]
        for pid in (step["supervisor_pid"], step["init_pid"]):
            try:
                self.started.append(psutil.Process(pid))
            except (psutil.NoSuchProcess, TypeError):
                pass
        return psutil.Process(step["init_pid"])

    def cancel_ccr_jobs(self) -> None:
        for job in self.ccr_jobs:
            try:
                self.ccr(["cancel", str(job)])
            except RuntimeError as exc:  # a job whose tree raw CRIU took over has no live step
                log(f"ccr cancel {job}: {str(exc).splitlines()[-1][-200:]}")
        self.ccr_jobs.clear()
        reap_zombies()

    def dump(self, target: psutil.Process, images: Path) -> tuple[float, float]:
        """Dump (and kill) target into images: (wall seconds, CRIU's frozen_time)."""
        stats = self.scratch / "work" / "stats-dump"
        stats.unlink(missing_ok=True)
        args = ["dump", "-t", str(target.pid), "-D", str(images)]
        if own_mount_ns(target.pid):  # a ccr step: the node's mounts it sees are external
            args += ["--ext-mount-map", "auto"]
        wall = self.run_criu(args, "dump.log")
        reap(target)
        # stats-dump lands in the work directory (-W), so it is no part of the image.
        frozen = read_dump_stats(stats).frozen_time or wall
        return wall, frozen

    def restore(self, images: Path) -> tuple[float, psutil.Process]:
        pidfile = self.scratch / "work" / "restored.pid"
        pidfile.unlink(missing_ok=True)
        args = ["restore", "-D", str(images), "-d", "--pidfile", str(pidfile)]
        if any(p.name.startswith("mountpoints-") for p in images.iterdir()):
            args += ["--ext-mount-map", "auto", "--root", "/"]  # as ccr restores a step
        wall = self.run_criu(args, "restore.log")
        root = psutil.Process(int(pidfile.read_text()))
        self.started.append(root)
        return wall, root

    def kill_all(self) -> None:
        for proc in reversed(self.started):
            try:
                proc.kill()  # psutil refuses if the PID now belongs to another process
            except psutil.NoSuchProcess:
                pass
            reap(proc)
        self.started.clear()


def own_mount_ns(pid: int) -> bool:
    """Whether pid has a mount namespace of its own (a ccr step), not ours."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False


def reap(proc: psutil.Process) -> None:
    """Wait for a dead (or dying) process and collect it if it is our child."""
    try:
        proc.wait(timeout=30)
    except psutil.TimeoutExpired:
        log(f"process {proc.pid} did not exit")
    except psutil.NoSuchProcess:
        pass


def reap_zombies() -> None:
    """Collect children that ended (ccr's supervisors, re-parented to us as subreaper)."""
    reap_exited_children()


def wait_ready(output: Path, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 600
    while not output.read_text().startswith("ready"):
        if not alive():
            raise RuntimeError(f"target exited early: {output.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("target did not fill its memory in 600 s")
        time.sleep(0.05)


def payload(root: psutil.Process) -> psutil.Process:
    """The target program in root's tree: root itself, or the child of ccr's dumb-init."""
    for proc in [root, *root.children(recursive=True)]:
        if any(arg.endswith("target.py") for arg in proc.cmdline()):
            return proc
    raise RuntimeError(f"no target program under pid {root.pid}")


def target_crc(target: psutil.Process, output: Path) -> int:
    before = output.read_text().count("\n")
    payload(target).send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while True:
        lines = output.read_text().splitlines()
        if len(lines) > before and lines[-1].startswith("crc "):
            return int(lines[-1].split()[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"target {target.pid} did not answer SIGUSR1")
        time.sleep(0.05)


# --- the measurements ----------------------------------------------------------------------


@dataclass
class Sample:
    frozen: float
    ckpt: float
    restart: float
    image: int
    stored: int
    # ccr rows only: wall time of the `ccr create` call, and the restore_time ccr reports.
    cli_ckpt: float = math.nan
    restore: float = math.nan
    unpack: float = math.nan
    # Until the tree runs (ccr's resume_time; raw CRIU: its restore), until every page is
    # in (lazy rows: fill_time, from the start of ccr's restore; NaN for eager ones), and
    # (--restart) the memory the restart needed beyond what it ended with
    # (MemSampler, the same for every row).
    resume: float = math.nan
    fill: float = math.nan
    peak_extra: float = math.nan
    own_peak: float = math.nan  # ccr's own peak_extra_bytes (see `ccr restart --json`)


class MemSampler:
    """Used memory (MemTotal - MemAvailable) sampled every 5 ms on a thread while a restart
    runs: its peak above what is used once the restart is over is the extra memory the
    restart needed beyond the restored tree (a scratch copy in tmpfs, ccr's frames in
    flight).  Anything else on the node moves it too."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        info = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                info[name] = int(rest.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            self._stop.wait(0.005)

    def __enter__(self) -> MemSampler:
        self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def extra(self) -> int:
        return max(0, self.peak - self.used())


def cycle(
    bench: Bench, variant: str, target: psutil.Process, tag: str
) -> tuple[Sample, psutil.Process]:
    """One checkpoint and one restart of target with variant; returns the restored root."""
    stage = bench.scratch / f"stage-{tag}"
    storage = bench.storage / f"{tag}-{variant}"
    fresh_dir(storage)
    if variant in ("criu", RAW_ON_CCR):
        began = time.monotonic()
        _, frozen = bench.dump(target, storage)
        reap_zombies()  # criu@ccr: ccr's supervisor ends with the tree it lost
        fsync_tree(storage)
        ckpt = time.monotonic() - began
        image = stored = dir_bytes(storage)
        evict(storage)
        with MemSampler() as memory:
            restart, root = bench.restore(storage)
        sample = Sample(frozen, ckpt, restart, image, stored, resume=restart, fill=0.0)
        sample.peak_extra = memory.extra()
        shutil.rmtree(storage)
        return sample, root
    else:
        fresh_dir(stage)
        began = time.monotonic()
        _, frozen = bench.dump(target, stage)
        image = dir_bytes(stage)
        entries = store(variant, stage, storage)
        ckpt = time.monotonic() - began
        shutil.rmtree(stage)
        stored = sum(e.size for e in entries)
        evict(storage)
        fresh_dir(stage)
        began = time.monotonic()
        unstore(variant, storage, stage, entries)
        _, root = bench.restore(stage)
        restart = time.monotonic() - began
        shutil.rmtree(stage)
    shutil.rmtree(storage)
    return Sample(frozen, ckpt, restart, image, stored), root


def ccr_cycle(bench: Bench, variant: str, job: int) -> tuple[Sample, psutil.Process]:
    """`ccr create --stop` then `ccr restart` of job's step 0; returns the restored init."""
    ref = f"{job}.0"
    cli_ckpt, made = bench.ccr(
        ["create", ref, "--stop", "--compress", CCR_VARIANTS[variant], "--json"]
    )
    assert isinstance(made, dict)
    reap_zombies()  # the vacated step's supervisor has exited
    evict(Path(made["path"]))
    how, env = RESTART_VARIANTS.get(variant, ([], {}))
    lazy = ["--lazy"] if variant in LAZY_VARIANTS else []
    with MemSampler() as memory:
        restart, restored = bench.ccr(["restart", ref, *how, *lazy, "--json"], extra_env=env)
    assert isinstance(restored, dict)
    (result,) = restored["steps"]
    root = bench.adopt_ccr_step(job)
    if root.pid != result["pid"]:
        raise RuntimeError(f"ccr restarted {ref} as pid {result['pid']}, status says {root.pid}")
    sample = Sample(
        frozen=made["frozen_time"],
        ckpt=made["total_time"],
        restart=restart,
        image=made["image_bytes"],
        stored=made["stored_bytes"],
        cli_ckpt=cli_ckpt,
        restore=result["restore_time"],
        unpack=result["unpack_time"],
        resume=result.get("resume_time", result["restore_time"]),
        fill=result.get("fill_time") or math.nan,
        peak_extra=memory.extra(),
        own_peak=result.get("peak_extra_bytes", math.nan),
    )
    return sample, root


@dataclass
class Live:
    """One target process tree of a series, and the CRC32 it must keep."""

    root: psutil.Process
    output: Path
    crc: int
    job: int | None = None


def group_of(variant: str) -> str:
    return "ccr" if variant in CCR_VARIANTS else "raw@ccr" if variant == RAW_ON_CCR else "plain"


@dataclass
class CliSample:
    py_comp: float
    cli_comp: float
    py_decomp: float
    cli_decomp: float
    ratio: float


def cli_compare(bench: Bench, pages: Path, level: int, reps: int) -> CliSample:
    """python-zstandard vs `zstd -T0 -L` on one pages image: raw MB/s both ways, ratio."""
    raw = pages.stat().st_size
    out_dir = fresh_dir(bench.storage / "cli")
    unpacked = bench.scratch / "cli-unpacked"
    times: dict[str, list[float]] = {"pc": [], "cc": [], "pd": [], "cd": []}
    packed = out_dir / "pages.zst"
    size = 0
    for _ in range(reps):
        began = time.monotonic()
        size, _ = compress_file(pages, packed, level)
        times["pc"].append(time.monotonic() - began)
        evict(out_dir)
        began = time.monotonic()
        decompress_file(packed, unpacked)
        times["pd"].append(time.monotonic() - began)
        unpacked.unlink()

        began = time.monotonic()
        cmd = ["zstd", "-q", "-f", "-T0", f"-{level}", "-o", str(packed), str(pages)]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        fsync_tree(out_dir)  # compress_file fsyncs too: same durability on both sides
        times["cc"].append(time.monotonic() - began)
        evict(out_dir)
        began = time.monotonic()
        cmd = ["zstd", "-q", "-d", "-f", "-o", str(unpacked), str(packed)]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        times["cd"].append(time.monotonic() - began)
        unpacked.unlink()
    shutil.rmtree(out_dir)
    rate = {k: raw / median(v) / 1e6 for k, v in times.items()}
    return CliSample(rate["pc"], rate["cc"], rate["pd"], rate["cd"], raw / size)


def series(
    bench: Bench, size: int, kind: str, variants: list[str], reps: int, cli_levels: list[int]
) -> tuple[dict[str, list[Sample]], dict[int, CliSample]]:
    tag = f"{size_label(size)}-{kind}"
    # One tree per kind of launch, all with the same payload: the plain variants cycle a
    # target of our own, criu@ccr one that `ccr run` launched (ccr loses it at its first
    # raw dump), the ccr rows one that ccr supervises throughout.
    lives: dict[str, Live] = {}
    for group in dict.fromkeys(map(group_of, variants)):
        log(f"{tag}: starting the {group} target")
        if group == "plain":
            root, output = bench.start_target(size, kind)
            job = None
        else:
            job, root, output = bench.start_ccr_target(size, kind)
        lives[group] = Live(root, output, int(output.read_text().split()[1]), job)
    samples: dict[str, list[Sample]] = {v: [] for v in variants}
    for rep in range(reps):
        # Rotate the order: the first dump after a fill or a long compression pays for
        # memory the VM handed back to the host (perf-baselines.md §0.7).
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for variant in order:
            live = lives[group_of(variant)]
            if live.job is not None and variant in CCR_VARIANTS:
                sample, live.root = ccr_cycle(bench, variant, live.job)
            else:
                sample, live.root = cycle(bench, variant, live.root, tag)
            samples[variant].append(sample)
            extra = (
                f" (create call {sample.cli_ckpt:.2f}s, restore_time {sample.restore:.2f}s, "
                f"unpack {sample.unpack:.2f}s"
                + (
                    f", resumed {sample.resume:.2f}s, filled {sample.fill:.2f}s"
                    if variant in LAZY_VARIANTS
                    else ""
                )
                + ")"
                if variant in CCR_VARIANTS
                else ""
            )
            log(
                f"{tag} rep {rep + 1} {variant}: frozen {sample.frozen:.2f}s "
                f"ckpt {sample.ckpt:.2f}s restart {sample.restart:.2f}s "
                f"stored {sample.stored / MiB:.0f}/{sample.image / MiB:.0f} MiB{extra}"
            )
    cli: dict[int, CliSample] = {}
    if cli_levels and "plain" in lives:
        target = lives["plain"].root
        stage = fresh_dir(bench.scratch / f"stage-{tag}")
        bench.dump(target, stage)
        pages = max(files_of(stage), key=lambda p: p.stat().st_size)
        for level in cli_levels:
            cli[level] = cli_compare(bench, pages, level, reps)
            c = cli[level]
            log(
                f"{tag} zstd-{level} python vs CLI: compress {c.py_comp:.0f} vs "
                f"{c.cli_comp:.0f} MB/s, decompress {c.py_decomp:.0f} vs {c.cli_decomp:.0f} MB/s"
            )
        _, lives["plain"].root = bench.restore(stage)
        shutil.rmtree(stage)
    for group, live in lives.items():
        crc = target_crc(live.root, live.output)
        if crc != live.crc:
            raise RuntimeError(
                f"{tag} ({group} target): memory changed across dump/restore ({live.crc} != {crc})"
            )
    log(f"{tag}: memory CRC32 intact after every cycle ({', '.join(lives)} targets)")
    bench.cancel_ccr_jobs()
    bench.kill_all()
    reap_zombies()
    return samples, cli


# --- report --------------------------------------------------------------------------------


def cell(value: float, floor: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} (×{value / floor:.2f})" if floor > 0 else f"{value:.{digits}f}"


def render(
    results: dict[tuple[int, str], dict[str, list[Sample]]],
    clis: dict[tuple[int, str], dict[int, CliSample]],
    header: list[str],
) -> str:
    lines = [*header, ""]
    lines += [
        "| payload | kind | variant | frozen s | ckpt total s | restart s | stored MiB | ratio "
        "| ccr create call s / restore_time s (unpack s) | lazy: resume s / fill s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for (size, kind), samples in results.items():
        med = {
            v: Sample(*(median([getattr(s, f) for s in ss]) for f in Sample.__dataclass_fields__))
            for v, ss in samples.items()
        }
        for variant, m in med.items():
            # Like with like: ccr's rows against raw CRIU on a ccr-launched tree.
            floor = med.get(RAW_ON_CCR) if variant in CCR_VARIANTS else None
            ref = floor or med.get("criu") or m
            extra = (
                f"{m.cli_ckpt:.2f} / {m.restore:.2f} ({m.unpack:.2f})"
                if not math.isnan(m.cli_ckpt)
                else "-"
            )
            lazy = (
                f"{cell(m.resume, ref.restart)} / {cell(m.fill, ref.restart)}"
                if not math.isnan(m.fill)
                else "-"
            )
            lines.append(
                f"| {size_label(size)} | {kind} | {variant} | {cell(m.frozen, ref.frozen)} "
                f"| {cell(m.ckpt, ref.ckpt)} | {cell(m.restart, ref.restart)} "
                f"| {cell(m.stored / MiB, ref.stored / MiB, 0)} | {m.image / m.stored:.2f}x "
                f"| {extra} | {lazy} |"
            )
        verdicts += targets(size_label(size), kind, med, clis.get((size, kind), {}))
    if verdicts:
        lines += ["", "Targets (issue #4), from this run:", ""] + [f"- {v}" for v in verdicts]
    if any(clis.values()):
        lines += [
            "",
            "python-zstandard (ccr's compress_file/decompress_file: 8 MiB frames, a frame per "
            "core, BLAKE3 of the output, fsync'd) vs `zstd -T0 -L` CLI (+fsync) on the largest "
            "pages image; raw MB/s, median:",
            "",
            "| payload | kind | level | python compress | CLI compress | python decompress "
            "| CLI decompress | ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (size, kind), per_level in clis.items():
            for level, c in per_level.items():
                lines.append(
                    f"| {size_label(size)} | {kind} | {level} | {c.py_comp:.0f} | "
                    f"{c.cli_comp:.0f} | {c.py_decomp:.0f} | {c.cli_decomp:.0f} | {c.ratio:.2f}x |"
                )
    return "\n".join(lines) + "\n"


def targets(label: str, kind: str, med: dict[str, Sample], cli: dict[int, CliSample]) -> list[str]:
    """The issue's targets, each with its verdict, from what this run measured."""
    out = []
    none = med.get("ccr-none")
    floor = med.get(RAW_ON_CCR) or med.get("criu")
    if none and floor:
        x = none.frozen / floor.frozen
        name = RAW_ON_CCR if RAW_ON_CCR in med else "criu"
        out.append(
            f"{label} {kind} ccr-none frozen ×{x:.2f} of {name} "
            f"({'met' if x <= 1.10 else 'MISSED'}, ≤1.10)"
        )
    default, gzip6 = med.get(f"zstd-{DEFAULT_LEVEL}"), med.get("gzip-6")
    if default and gzip6:
        # Compression time: checkpoint total less the dump (frozen) both share.
        speed = (gzip6.ckpt - gzip6.frozen) / max(default.ckpt - default.frozen, 1e-9)
        ratio_ok = default.image / default.stored >= gzip6.image / gzip6.stored * 0.999
        out.append(
            f"{label} {kind} zstd-{DEFAULT_LEVEL} vs gzip-6: ratio "
            f"{default.image / default.stored:.2f}x vs {gzip6.image / gzip6.stored:.2f}x, "
            f"{speed:.1f}x faster ({'met' if ratio_ok and speed >= 5 else 'MISSED'}, "
            "ratio ≥ and ≥5x)"
        )
    for plain, packed in (("none", f"zstd-{DEFAULT_LEVEL}"), ("ccr-none", "ccr-zstd1")):
        p, z = med.get(plain), med.get(packed)
        if p and z:
            x = z.restart / p.restart
            alone = "" if math.isnan(z.restore) else f"; restore_time ×{z.restore / p.restore:.2f}"
            out.append(
                f"{label} {kind} {packed} restart ×{x:.2f} of {plain}'s "
                f"({'met' if x <= 1.5 else 'MISSED'}, ≤1.5{alone})"
            )
    lazy, eager = med.get("ccr-zstd1-lazy"), med.get("ccr-zstd1")
    if lazy and not math.isnan(lazy.resume):
        judged = label == "4G"
        verdict = ("met" if lazy.resume <= LAZY_RESUME_S else "MISSED") if judged else "at 4G"
        out.append(
            f"{label} {kind} ccr-zstd1-lazy resumes in {lazy.resume:.2f}s "
            f"({verdict}, ≤{LAZY_RESUME_S}s at 4 GiB)"
        )
    if lazy and eager and not math.isnan(lazy.fill):
        # Throughput = image bytes / time until all of them are in: eagerly restore_time.
        share = eager.restore / lazy.fill
        out.append(
            f"{label} {kind} ccr-zstd1-lazy fills at {share:.0%} of ccr-zstd1's throughput "
            f"({lazy.image / lazy.fill / 1e6:.0f} vs {eager.image / eager.restore / 1e6:.0f} "
            f"MB/s; {'met' if share >= LAZY_FILL_SHARE else 'MISSED'}, ≥{LAZY_FILL_SHARE:.0%})"
        )
    if DEFAULT_LEVEL in cli:
        c = cli[DEFAULT_LEVEL]
        x = c.py_comp / c.cli_comp
        out.append(
            f"{label} {kind} zstd-{DEFAULT_LEVEL} throughput {x:.0%} of `zstd -T0` "
            f"({'met' if x >= 0.8 else 'MISSED'}, ≥80%)"
        )
    return out


# Issue 15's targets for the eager restart, and the lazy one's.
NONE_RESTART_X = 1.2  # ccr uncompressed, of raw CRIU's restore of uncompressed images
ZSTD_RESTART_X = 1.5  # ccr zstd:1, of the same
PEAK_EXTRA_BYTES = 256 * MiB + WORKERS * FRAME_SIZE  # 256 MiB plus a frame per core


def render_restart(results: dict[tuple[int, str], dict[str, list[Sample]]], reps: int) -> str:
    """--restart's table: each row's restart, resume, fill and peak extra memory, as a
    multiple of raw CRIU's (criu@ccr) figure, then every target with met/MISSED."""
    lines = [
        f"ccr restart benchmark (issue 15), {time.strftime('%Y-%m-%d %H:%M')}, median of {reps}; "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB.  restart = wall time of the "
        "whole `ccr restart` call (raw: `criu restore -d`), page cache of the stored files "
        "dropped first; resume = until the tree runs (ccr's resume_time); fill = until every "
        "page is in (lazy rows; eager rows are complete when they resume); peak extra = used "
        "memory during the restart above what it ended with (sampled every 5 ms from "
        "/proc/meminfo: a tmpfs scratch copy shows there).",
        "",
        "| payload | kind | variant | restart s | resume s | fill s | peak extra MiB "
        "| ccr restore_time s (unpack s), own peak extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for (size, kind), samples in results.items():
        med = {
            v: Sample(*(median([getattr(s, f) for s in ss]) for f in Sample.__dataclass_fields__))
            for v, ss in samples.items()
        }
        raw = med.get(RAW_ON_CCR)
        for variant, m in med.items():
            ref = raw or m
            extra_mib = m.peak_extra / MiB
            peak = (
                cell(extra_mib, ref.peak_extra / MiB, 0)
                if ref.peak_extra >= 16 * MiB
                else f"{extra_mib:.0f}"
            )
            own = (
                "-"
                if math.isnan(m.restore)
                else f"{m.restore:.2f} ({m.unpack:.2f}), {m.own_peak / MiB:.0f}"
            )
            lines.append(
                f"| {size_label(size)} | {kind} | {variant} | {cell(m.restart, ref.restart)} "
                f"| {cell(m.resume, ref.resume)} "
                f"| {'-' if math.isnan(m.fill) else f'{m.fill:.2f}'} | {peak} | {own} |"
            )
        verdicts += restart_targets(size, kind, med)
    lines += ["", "Targets (issue 15), from this run:", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def restart_targets(size: int, kind: str, med: dict[str, Sample]) -> list[str]:
    label = f"{size_label(size)} {kind}"
    raw = med.get(RAW_ON_CCR)
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for variant, limit in (("ccr-none", NONE_RESTART_X), ("ccr-zstd1", ZSTD_RESTART_X)):
        m = med.get(variant)
        if m and raw:
            x = m.restart / raw.restart
            out.append(
                f"{label} {variant} restart ×{x:.2f} of raw CRIU's ({verdict(x <= limit)}, "
                f"≤{limit})"
            )
    for variant, m in med.items():
        if variant in CCR_VARIANTS and not variant.endswith("-scratch"):
            out.append(
                f"{label} {variant} peak extra {m.peak_extra / MiB:.0f} MiB "
                f"({verdict(m.peak_extra <= PEAK_EXTRA_BYTES)}, ≤{PEAK_EXTRA_BYTES / MiB:.0f})"
            )
    lazy, eager = med.get("ccr-zstd1-lazy"), med.get("ccr-zstd1")
    if lazy:
        if size >= 4 << 30:
            out.append(
                f"{label} ccr-zstd1-lazy resume {lazy.resume:.2f} s "
                f"({verdict(lazy.resume <= LAZY_RESUME_S)}, ≤{LAZY_RESUME_S})"
            )
        if eager and lazy.fill > 0:
            share = eager.resume / lazy.fill  # same bytes: throughput ratio
            out.append(
                f"{label} ccr-zstd1-lazy fill throughput {share:.0%} of the eager path's "
                f"({verdict(share >= LAZY_FILL_SHARE)}, ≥{LAZY_FILL_SHARE:.0%})"
            )
    return out


def environment(bench: Bench, reps: int) -> list[str]:
    version = subprocess.run([bench.criu, "--version"], capture_output=True, text=True).stdout
    zstd_cli = shutil.which("zstd")
    cli_version = (
        subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout.strip()
        if zstd_cli
        else "missing"
    )
    return [
        f"ccr compression benchmark, {time.strftime('%Y-%m-%d %H:%M')}, median of {reps}; "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB; "
        f"CRIU {version.split()[1] if version else '?'}; python-zstandard "
        f"{zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}); "
        f"blake3 {blake3.__version__}; "
        f"{cli_version.split(',')[0]}.",
        f"Storage {bench.storage} (fsync'd; page cache dropped before restart), "
        f"scratch {bench.scratch}. frozen = CRIU frozen_time; ckpt total = dump + store; "
        "restart = unpack + `criu restore`; (×N) = multiple of raw CRIU's figure; "
        "ratio = image bytes / stored bytes.",
        f"criu@ccr = raw CRIU on a tree `ccr run` launched; ccr-* rows = `ccr create --stop "
        f"--json` (frozen_time, total_time) and the wall time of `ccr restart`, (×N) of "
        f"criu@ccr's; private CCR_STATE_DIR and ImageDir under {bench.storage}/ccr.",
    ]


def check_setup(criu: str) -> None:
    if os.geteuid() != 0:
        sys.exit("bench.py needs root (CRIU)")
    if not Path(criu).exists() and not shutil.which(criu):
        sys.exit(f"CRIU not found at {criu}")
    for tool in ("unshare", "setsid"):
        if not shutil.which(tool):
            sys.exit(f"{tool} (util-linux) is missing")
    try:
        subprocess.run([sys.executable, "-c", "import numpy"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        sys.exit(f"numpy is missing: {sys.executable} -m pip install numpy")


# Issue 16's targets: read-only commands answer like scontrol did (in milliseconds), and
# create/restart cost at most this much more than raw CRIU on the same tree.
READ_ONLY_TARGET_S = 0.150
OVERHEAD_TARGET_S = 0.300


def cli_bench(bench: Bench, reps: int) -> str:
    """`--cli`: per-call cost of the CLI, medians of reps, with met/MISSED per target.

    Read-only commands run against a live 64 MiB job; create/restart of a 64 MiB tree
    (`ccr create --stop --compress none`, then `ccr restart`, whole CLI calls) are
    compared with raw `criu dump`/`criu restore` of a ccr-launched 64 MiB tree in the
    same run, alternating, so the difference is what ccr adds per call.
    """
    size = 64 * MiB
    job, _, _ = bench.start_ccr_target(size, "realistic")
    ref = f"{job}.0"
    commands = [
        ["--version"],
        ["--help"],
        ["list"],
        ["status", str(job)],
        ["status", str(job), "--json"],
        ["checkpoint", "able", str(job)],
        ["checkpoint", "error", str(job)],
    ]
    rows = ["| command | median s | target | verdict |", "|---|---|---|---|"]
    for args in commands:
        times = [bench.ccr(args)[0] for _ in range(reps)]
        med = median(times)
        verdict = "met" if med <= READ_ONLY_TARGET_S else "MISSED"
        rows.append(f"| `ccr {' '.join(args)}` | {med:.3f} | <= {READ_ONLY_TARGET_S} | {verdict} |")
    _, raw_root, _ = bench.start_ccr_target(size, "realistic")
    raw_dump, raw_restore, ccr_create, ccr_restart = [], [], [], []
    storage = bench.storage / "cli-raw"
    for _ in range(reps):
        fresh_dir(storage)
        wall, _ = bench.dump(raw_root, storage)
        reap_zombies()
        raw_dump.append(wall)
        evict(storage)
        wall, raw_root = bench.restore(storage)
        raw_restore.append(wall)
        took, made = bench.ccr(["create", ref, "--stop", "--compress", "none", "--json"])
        assert isinstance(made, dict)
        ccr_create.append(took)
        reap_zombies()
        evict(Path(made["path"]))
        ccr_restart.append(bench.ccr(["restart", ref, "--json"])[0])
        bench.adopt_ccr_step(job)
    shutil.rmtree(storage, ignore_errors=True)
    rows += ["", "| 64 MiB tree | ccr s | raw CRIU s | overhead s | target | verdict |"]
    rows.append("|---|---|---|---|---|---|")
    for name, mine, raw in (
        ("create (--stop, none)", ccr_create, raw_dump),
        ("restart", ccr_restart, raw_restore),
    ):
        extra = median(mine) - median(raw)
        verdict = "met" if extra <= OVERHEAD_TARGET_S else "MISSED"
        rows.append(
            f"| {name} | {median(mine):.3f} | {median(raw):.3f} | {extra:+.3f} | "
            f"<= {OVERHEAD_TARGET_S} | {verdict} |"
        )
    return "\n".join(rows) + "\n"


SERVICE_TARGET_S = 0.05  # issue 18: the node service adds at most 50 ms per call


def service_bench(bench: Bench, reps: int) -> str:
    """`--service`: `ccr create` and `ccr restart` of one 64 MiB tree, as root, in-process
    and through a `ccr daemon` of the same state dir, alternating (the order swapped each
    repetition), so the difference of the medians is what the service adds per call:
    the client's connect (twice: root's ccr first checks that the socket is live), the
    request with its fds, the forked worker, the relayed exit code.
    """
    size = 64 * MiB
    sock = bench.ccr_home / "run" / "ccr.sock"
    bench.ccr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CCR_STATE_DIR=str(bench.ccr_home / "state"), CCR_CRIU=bench.criu)
    env.pop("CCR_SOCKET", None)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ccr", "daemon", "--socket", str(sock)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(bench.storage / "daemon.log").open("w"),
        start_new_session=True,
    )
    try:
        wait_ready_path(sock, lambda: daemon.poll() is None)
        job, _, _ = bench.start_ccr_target(size, "realistic")
        ref = f"{job}.0"
        ways: dict[str, Path | None] = {"in-process": None, "service": sock}
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(reps):
            for way in list(ways) if rep % 2 == 0 else list(ways)[::-1]:
                took, made = bench.ccr(
                    ["create", ref, "--stop", "--compress", "none", "--json"], ways[way]
                )
                assert isinstance(made, dict)
                times.setdefault((way, "create"), []).append(took)
                reap_zombies()
                evict(Path(made["path"]))
                took, _ = bench.ccr(["restart", ref, "--json"], ways[way])
                times.setdefault((way, "restart"), []).append(took)
                bench.adopt_ccr_step(job)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    rows = ["| 64 MiB tree, as root | in-process s | service s | added s | target | verdict |"]
    rows.append("|---|---|---|---|---|---|")
    for name, what in (("create (--stop, none)", "create"), ("restart", "restart")):
        local, served = median(times["in-process", what]), median(times["service", what])
        verdict = "met" if served - local <= SERVICE_TARGET_S else "MISSED"
        rows.append(
            f"| {name} | {local:.3f} | {served:.3f} | {served - local:+.3f} | "
            f"<= +{SERVICE_TARGET_S} | {verdict} |"
        )
    return "\n".join(rows) + "\n"


def wait_ready_path(path: Path, alive: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def clean_up(bench: Bench, *dirs: Path) -> None:
    """Cancel ccr's jobs, kill every process this run started (by PID), remove dirs."""
    try:
        bench.cancel_ccr_jobs()
    finally:
        bench.kill_all()
        reap_zombies()
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256M,1G,4G", help="payload sizes (default %(default)s)")
    parser.add_argument(
        "--kinds", help="memory contents: random,realistic (default; --quick: realistic)"
    )
    parser.add_argument("--levels", default="1,3,9", help="zstd levels to compare")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    parser.add_argument(
        "--cli-levels", default=str(DEFAULT_LEVEL), help="levels for the zstd CLI row ('' none)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run under 60 s: 64M and 256M, realistic only, one repetition, "
        "CLI row for 256M only",
    )
    parser.add_argument(
        "--variants", help="only these rows, e.g. criu,criu@ccr,ccr-none,ccr-zstd1 (default all)"
    )
    parser.add_argument(
        "--cli",
        action="store_true",
        help="only the CLI's per-call cost: read-only commands and create/restart overhead "
        "over raw CRIU (medians of --reps, default 10 here)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="only the restart table (issue 15): criu@ccr, ccr-none, ccr-zstd1 and their "
        "-scratch rows (restore from a decoded copy, as before streaming)",
    )
    parser.add_argument(
        "--service",
        action="store_true",
        help="only the node service's cost: create/restart through `ccr daemon` vs "
        "in-process as root (medians of --reps, default 10 here)",
    )
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--storage", type=Path, default=Path("/tmp/ccrbench"))
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm/ccrbench"))
    parser.add_argument("--criu", default=os.environ.get("CCR_CRIU", "/usr/local/sbin/criu"))
    args = parser.parse_args(argv)
    if args.quick:
        # gzip-6 alone takes ~10-15 s per 256 MiB on 2 cores: the random kind would double
        # the run for a smoke test that learns nothing new from it.
        args.sizes, args.reps = "64M,256M", 1
        args.kinds = args.kinds or "realistic"
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in (args.kinds or "random,realistic").split(",") if k]
    if set(kinds) - {"random", "realistic"}:
        parser.error("--kinds takes random and/or realistic")
    variants = ["criu", "none"] + [f"zstd-{int(lv)}" for lv in args.levels.split(",") if lv]
    if args.restart:
        variants = [RAW_ON_CCR, *RESTART_VARIANTS]
    else:
        variants += ["gzip-6", "lz4", RAW_ON_CCR, "ccr-none", "ccr-zstd1", "ccr-zstd1-lazy"]
    if args.variants:
        wanted = [v for v in args.variants.split(",") if v]
        if set(wanted) - set(variants):
            parser.error(f"--variants takes some of {','.join(variants)}")
        variants = [v for v in variants if v in wanted]
    cli_levels = [int(lv) for lv in args.cli_levels.split(",") if lv] if not args.restart else []
    if cli_levels and not shutil.which("zstd"):
        sys.exit("the zstd CLI is missing: apt-get install -y zstd (or --cli-levels '')")
    check_setup(args.criu)

    # Restored roots are re-parented to us, so we can wait for them and kill them.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    bench = Bench(args.criu, fresh_dir(args.scratch), fresh_dir(args.storage))
    if args.service:
        began = time.monotonic()
        reps = args.reps if args.reps != 3 else 10
        try:
            table = service_bench(bench, reps)
        finally:
            clean_up(bench, args.scratch, args.storage)
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        table = (
            f"ccr node service per-call cost, {time.strftime('%Y-%m-%d %H:%M')}, median of "
            f"{reps}; kernel {platform.release()}, {os.cpu_count()} CPUs, load average "
            f"{load} at the end (a shared machine: the figures move with its load).\n\n"
            + table
            + f"\nRun time {time.monotonic() - began:.0f} s.\n"
        )
        print(table)
        if args.out:
            args.out.write_text(table)
        return 0
    if args.cli:
        began = time.monotonic()
        try:
            table = cli_bench(bench, args.reps if args.reps != 3 else 10)
        finally:
            clean_up(bench, args.scratch, args.storage)
        header = (
            f"ccr CLI per-call cost, {time.strftime('%Y-%m-%d %H:%M')}, median of "
            f"{args.reps if args.reps != 3 else 10}; kernel {platform.release()}, "
            f"{os.cpu_count()} CPUs; raw CRIU = `criu dump`/`criu restore` of a ccr-launched "
            "64 MiB tree in the same run, page cache dropped before each restore."
        )
        table = header + "\n\n" + table
        table += f"\nRun time {time.monotonic() - began:.0f} s.\n"
        print(table)
        if args.out:
            args.out.write_text(table)
        return 0
    results: dict[tuple[int, str], dict[str, list[Sample]]] = {}
    clis: dict[tuple[int, str], dict[int, CliSample]] = {}
    began = time.monotonic()
    try:
        for size in sizes:
            for kind in kinds:
                cli = cli_levels if not args.quick or size == max(sizes) else []
                results[size, kind], clis[size, kind] = series(
                    bench, size, kind, variants, args.reps, cli
                )
    finally:
        clean_up(bench, args.scratch, args.storage)
    if args.restart:
        table = render_restart(results, args.reps)
    else:
        table = render(results, clis, environment(bench, args.reps))
    table += f"\nRun time {time.monotonic() - began:.0f} s.\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
