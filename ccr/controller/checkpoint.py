"""Take checkpoints of live steps (`create`, `vacate`): dump, describe, sign, publish, prune."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ccr import config, identity, interrupts, progress
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import gpu, openfiles, page_server, process
from ccr.engines.compression import Codec, compress_dir, parse_codec
from ccr.engines.criu import Criu, criu_options
from ccr.engines.taskcreds import refuse_foreign_tasks
from ccr.errors import NO_SPACE, CcrError, JobStateError, MaxWaitExceeded, StorageError
from ccr.ids import JobRef, StepId, checkpoint_name
from ccr.storage import layout
from ccr.storage import registry as reg
from ccr.storage.imageset import (
    CheckpointSeries,
    discard,
    make_private_dir,
    scratch_dir,
    start_writeback,
    storage_error,
)
from ccr.storage.manifest import (
    JOB_MANIFEST,
    MANIFEST,
    JobManifest,
    StepManifest,
    describe_files,
    write_signed,
)
from ccr.timestamps import stamp


def default_codec() -> Codec:
    """`CCR_COMPRESS` (e.g. "zstd:3", "none"), else zstd at its default level."""
    return parse_codec(config.compress_spec())


@dataclass
class CheckpointOptions:
    """How to take one checkpoint."""

    image_dir: Path | None = None
    max_wait: float | None = None
    stop: bool = False  # vacate: terminate the tree once the checkpoint is safe
    keep: int | None = None  # generations to keep; None: the job's setting
    codec: Codec = field(default_factory=default_codec)
    mkdir: bool = False  # create a missing image dir's missing parents too
    # Also checkpoint TCP connections to peers outside the step (--tcp-established).
    tcp_established: bool = field(default_factory=config.tcp_established_default)


# Without MaxWait, a dump still ends: CRIU gets this long plus so much per GiB of the tree's
# resident memory (a rate far below any disk's), then it is killed and the job resumed.
WATCHDOG_BASE_S = 120.0
WATCHDOG_PER_GIB_S = 30.0


def dump_watchdog(rss: int) -> float | None:
    """The longest a dump may take when no MaxWait is given; None: no bound.

    `CCR_DUMP_WATCHDOG`: seconds (a fixed bound), or 0 for none; unset: WATCHDOG_BASE_S +
    WATCHDOG_PER_GIB_S per GiB of rss.
    """
    value = config.dump_watchdog_s()
    if value is None:
        return WATCHDOG_BASE_S + WATCHDOG_PER_GIB_S * rss / 2**30
    return value or None


@dataclass
class CheckpointResult:
    """A published checkpoint and what it cost."""

    ref: JobRef
    path: Path
    link: Path
    steps: list[int]
    frozen_time: float
    total_time: float
    image_bytes: int
    stored_bytes: int
    manifests: list[StepManifest] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        suffix = self.path.name.rsplit(".", 1)[-1]
        created = self.manifests[0].created if self.manifests else None
        return {
            "job_id": self.ref.job_id,
            "step_id": self.ref.step_id,
            "generation": int(suffix) if suffix.isdigit() else None,
            **stamp("created", created),
            "path": str(self.path),
            "link": str(self.link),
            "steps": self.steps,
            "frozen_time": round(self.frozen_time, 4),
            "total_time": round(self.total_time, 4),
            "image_bytes": self.image_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": round(self.image_bytes / self.stored_bytes, 3) if self.stored_bytes else None,
            "stats": {f"{m.job_id}.{m.step_id}": m.stats for m in self.manifests},
        }


def create(rt: Runtime, ref: JobRef, opts: CheckpointOptions) -> CheckpointResult:
    """Checkpoint one step, or every live step of a job, and publish it atomically.

    On any failure nothing is published, every earlier checkpoint stays, the tree keeps
    running (also with stop=True: it is killed only after the publish), and the error is
    recorded as the job's last checkpoint error.
    """
    with rt.registry() as db:
        job = db.job(ref.job_id)
        if job.disabled:
            raise JobStateError(f"checkpoints of job {ref.job_id} are disabled")
        steps = _live_steps(db, ref)
    image_dir = layout.default_image_dir(job, opts.image_dir)
    series = CheckpointSeries(image_dir, checkpoint_name(ref))
    return run_checkpoint(rt, ref, job, steps, opts, SeriesStaging(series, ref, opts.mkdir))


class StagingArea(Protocol):
    """Where one checkpoint's images are written before anything is published."""

    def dir_for(self, step: reg.StepRecord) -> Path:
        """The (new, private) directory step's images go to."""

    def remove(self) -> None:
        """Remove what dir_for made (an aborted checkpoint leaves nothing behind)."""

    def decide(self, pending: PendingCheckpoint) -> Path:
        """Publish pending (or learn where it was published); raise to abort it."""

    def abandoned(self, exc: MaxWaitExceeded) -> MaxWaitExceeded:
        """The error a dump that ran past MaxWait reports."""


class SeriesStaging:
    """This node's checkpoint: a staging directory of the series, published by us at once."""

    def __init__(self, series: CheckpointSeries, ref: JobRef, mkdir: bool) -> None:
        self.series = series
        self.ref = ref
        self.mkdir = mkdir
        self.staging: Path | None = None

    def dir_for(self, step: reg.StepRecord) -> Path:
        if self.staging is None:
            self.staging = self.series.begin(mkdir=self.mkdir)
        if self.ref.step_id is not None:
            return self.staging
        step_dir = self.staging / str(step.step_id)
        make_private_dir(step_dir)
        return step_dir

    def remove(self) -> None:
        if self.staging is not None:
            discard(self.staging)

    def decide(self, pending: PendingCheckpoint) -> Path:
        assert self.staging is not None
        if self.ref.step_id is None:
            job_manifest = JobManifest(
                job_id=self.ref.job_id,
                steps=[s.step_id for s, _ in pending.dumped],
                created=time.time(),
                hostname=socket.gethostname(),
                total_time=time.monotonic() - pending.started,
            )
            write_signed(self.staging / JOB_MANIFEST, job_manifest.to_dict(), pending.key)
        # Once the checkpoint is being published, Ctrl-C no longer undoes it: the shield
        # defers the signal to the caller, who asks interrupts.pending().
        pending.shield()
        return self.series.publish(self.staging).path

    def abandoned(self, exc: MaxWaitExceeded) -> MaxWaitExceeded:
        return MaxWaitExceeded(
            f"checkpoint of {self.ref} abandoned: {exc}; the job is running, nothing was published"
        )


@dataclass
class PendingCheckpoint:
    """Every step dumped, nothing published: commit() makes it the newest checkpoint (after
    the publish), abort() undoes it (images removed, trees and GPU state given back)."""

    rt: Runtime
    ref: JobRef
    opts: CheckpointOptions
    keep: int
    key: bytes
    started: float
    staging: StagingArea
    published: ExitStack
    touched: list[reg.StepRecord] = field(default_factory=list)
    gpu_seqs: list[gpu.GpuSequence] = field(default_factory=list)
    dumped: list[tuple[reg.StepRecord, StepManifest]] = field(default_factory=list)

    def shield(self) -> None:
        """Past the point of no return: an interrupt from here on is only noted."""
        self.published.enter_context(interrupts.shielded())

    def abort(self) -> None:
        self.staging.remove()
        _resume(self.rt, self.touched)  # SIGCONT first: a stopped process cannot give its GPU back
        for seq in self.gpu_seqs:
            seq.rollback()

    def commit(self, path: Path) -> CheckpointResult:
        """path: the published generation.  Vacated trees die now; old generations go."""
        if self.opts.stop:
            _kill_vacated(self.rt, [s for s, _ in self.dumped])
        series = CheckpointSeries(path.parent, checkpoint_name(self.ref))
        series.prune(self.keep)
        manifests = [m for _, m in self.dumped]
        total = time.monotonic() - self.started
        result = CheckpointResult(
            ref=self.ref,
            path=path,
            link=series.link,
            steps=[s.step_id for s, _ in self.dumped],
            frozen_time=sum(m.frozen_time for m in manifests),
            total_time=total,
            image_bytes=sum(m.image_bytes for m in manifests),
            stored_bytes=sum(m.stored_bytes for m in manifests),
            manifests=manifests,
        )
        with self.rt.registry() as db:
            db.add_checkpoint(
                reg.CheckpointRecord(
                    job_id=self.ref.job_id,
                    step_id=self.ref.step_id,
                    path=str(path),
                    created=time.time(),
                    stored_bytes=result.stored_bytes,
                    image_bytes=result.image_bytes,
                    frozen_time=result.frozen_time,
                    total_time=total,
                )
            )
        return result


def run_checkpoint(
    rt: Runtime,
    ref: JobRef,
    job: reg.JobRecord,
    steps: list[reg.StepRecord],
    opts: CheckpointOptions,
    staging: StagingArea,
    deadline: Deadline | None = None,
) -> CheckpointResult:
    """The one checkpoint loop, of a single node's job and of one node of a multi-node one.

    Under the job lock, with "Began at" set: dump every step into staging (a pending
    checkpoint), let staging decide (publish it here, or hear the coordinator's word),
    then commit (kill vacated trees, prune to the job's keep, record it) or abort.  Any
    failure is recorded as the job's last checkpoint error; success clears it.
    """
    started = time.monotonic()
    if deadline is None:
        deadline = Deadline.after(opts.max_wait)  # the one MaxWait of every wait below
    keep = opts.keep if opts.keep is not None else job.keep
    with ExitStack() as published:
        try:
            with rt.job_lock(ref.job_id, deadline):
                with rt.registry() as db:
                    db.update_job(ref.job_id, ckpt_began=time.time())
                    stale = [
                        s
                        for s in db.steps(ref.job_id)
                        if s.state == reg.VACATING and _alive_tree(s)
                    ]
                _resume(rt, stale)
                try:
                    key = rt.manifest_key(create=True)
                    assert key is not None
                    pending = PendingCheckpoint(
                        rt, ref, opts, keep, key, started, staging, published
                    )
                    try:
                        _dump_all(pending, steps, deadline)
                        path = staging.decide(pending)
                    except MaxWaitExceeded as exc:
                        pending.abort()
                        raise staging.abandoned(exc) from None
                    except BaseException:
                        pending.abort()
                        raise
                    result = pending.commit(path)
                finally:
                    with rt.registry() as db:
                        db.update_job(ref.job_id, ckpt_began=None)
        except CcrError as exc:
            with rt.registry() as db:
                db.update_job(ref.job_id, last_error=str(exc), last_error_code=exc.exit_code)
            raise
        except KeyboardInterrupt as exc:
            # Rolled back on the way here (abort): recorded like any failed checkpoint.
            signum = interrupts.signum_of(exc)
            name = signal.Signals(signum).name
            with rt.registry() as db:
                db.update_job(
                    ref.job_id,
                    last_error=f"checkpoint of {ref} interrupted ({name}); "
                    "the job is running, nothing was published",
                    last_error_code=128 + signum,
                )
            raise interrupts.Interrupted(
                signum, [f"interrupted: {ref} keeps running, nothing published"]
            ) from None
        with rt.registry() as db:
            db.update_job(ref.job_id, last_error=None, last_error_code=0)
        return result


def _live_steps(db: reg.Registry, ref: JobRef) -> list[reg.StepRecord]:
    if ref.step is not None:
        step = db.step(ref.step)
        if not is_live(step):
            raise JobStateError(f"step {ref} is not running (state: {step.state})")
        return [step]
    steps = [s for s in db.steps(ref.job_id) if is_live(s)]
    if not steps:
        raise JobStateError(f"job {ref.job_id} has no running step to checkpoint")
    return steps


def is_live(step: reg.StepRecord) -> bool:
    """A step a checkpoint can dump: running (or `vacating` with its ccr dead: such a step
    is recovered, resumed, once the checkpoint holds the job lock) and its tree alive."""
    return step.state in (reg.RUNNING, reg.VACATING) and _alive_tree(step)


def _dump_all(pending: PendingCheckpoint, steps: list[reg.StepRecord], deadline: Deadline) -> None:
    rt, opts = pending.rt, pending.opts
    criu = rt.criu()
    criu_version = criu.version()
    for step in steps:
        pending.touched.append(step)
        step_dir = pending.staging.dir_for(step)
        if opts.stop:
            with rt.registry() as db:
                if not db.compare_and_set_state(step.id, (reg.RUNNING,), reg.VACATING):
                    raise JobStateError(f"step {step.id} stopped running")
        manifest = _dump_step(
            rt, criu, criu_version, step, step_dir, opts, deadline, pending.key, pending.gpu_seqs
        )
        pending.dumped.append((step, manifest))


def _dump_step(
    rt: Runtime,
    criu: Criu,
    criu_version: str,
    step: reg.StepRecord,
    step_dir: Path,
    opts: CheckpointOptions,
    deadline: Deadline,
    key: bytes,
    gpu_seqs: list[gpu.GpuSequence] | None = None,
) -> StepManifest:
    assert step.init_pid is not None
    began = time.monotonic()
    # A step restored lazily dumps only once all its memory is in: a page still missing
    # would be dumped as a hole (read back as zeros).  The fill runs at full speed anyway.
    marker = page_server.filling_marker(rt.state_dir, str(step.id))
    page_server.wait_until_filled(marker, deadline, f"checkpoint of step {step.id}")
    # CUDA processes first hand their device memory to host memory (the driver's checkpoint
    # API), so CRIU sees plain processes; MaxWait covers the whole sequence.
    seq = gpu.GpuSequence(deadline=deadline)
    if gpu_seqs is not None:
        gpu_seqs.append(seq)
    pids = process.tree_pids(step.init_pid)
    tcp, lock = _tcp_mode(criu, step, pids, opts.tcp_established)
    work = rt.work_dir(f"{step.id}-dump")
    compressed = opts.codec.name != "none"
    # Compressed: CRIU dumps raw pages into fast scratch space, the job resumes, and only
    # then are the pages compressed into the image directory (frozen time = CRIU's alone).
    file_max, files_total = config.save_limits()
    estimate = process.tree_rss(step.init_pid) + openfiles.estimate(pids, files_total)
    # A user's dump (node service) is staged too: CRIU (root) writes only into ccr's
    # private scratch, never into a directory the user can write to (see ccr.identity).
    staged = compressed or identity.served_user()
    raw_dir = scratch_dir(estimate, step_dir.parent, "dump") if staged else step_dir
    # The dump's bound: MaxWait, else the watchdog (from the dump's start).
    limit = deadline
    if not deadline.bounded:
        limit = Deadline.after(dump_watchdog(estimate), "the dump watchdog CCR_DUMP_WATCHDOG")
    # The files the tree writes are listed and the small ones copied beside the images
    # (so they are compressed, digested and signed with them) from CRIU's post-dump
    # notification: the one moment the whole tree is known to be frozen, images written,
    # for a leave-running checkpoint as for a vacate.  Listing them before the dump would
    # race the tree's writes; after it, a running tree has moved on.
    files = openfiles.Collector(step.init_pid, raw_dir, file_max, files_total)
    frames: dict[str, dict[str, Any]] = {}
    try:
        seq.checkpoint(pids)
        with progress.watch_directory(f"dump {step.id}", raw_dir, estimate):
            options = criu_options(
                "dump",
                pid=step.init_pid,
                final_state="stopped" if opts.stop else "running",
                tcp_established=tcp,
                network_lock=lock,
                notify=True,  # post-dump: files.hook
            )
            stats = criu.dump(options, raw_dir, work, deadline=limit, hook=files.hook)
        if not files.collected:
            raise CcrError(
                f"CRIU sent no post-dump notification for step {step.id}: "
                "the files it writes could not be saved"
            )
        if not opts.stop:
            seq.resume()
        if not staged:
            start_writeback(step_dir)  # the disk takes the images while they are hashed
        if identity.served_user():
            identity.give_to_caller(raw_dir)  # CRIU wrote its images as root
            refuse_foreign_tasks(raw_dir, step.id)
        if staged:
            raw_total = sum(p.stat().st_size for p in raw_dir.iterdir() if p.is_file())
            with progress.task(f"compress {step.id}", raw_total) as update:
                entries = compress_dir(
                    raw_dir, step_dir, opts.codec, progress=update, frames=frames
                )
    except OSError as exc:
        raise storage_error(step_dir, exc, "dumping into") from None
    except StorageError as exc:
        if exc.errno in NO_SPACE:
            raise StorageError(
                f"no space left in {step_dir.parent} while dumping step {step.id}",
                errno=exc.errno,
                log_path=exc.log_path,
            ) from None
        raise
    finally:
        if staged:
            discard(raw_dir)
    try:
        status = os.stat(f"/proc/{step.init_pid}")
        uid, gid = status.st_uid, status.st_gid
    except OSError:
        uid, gid = identity.caller_uid(), identity.caller_gid()
    with rt.registry() as db:
        job = db.job(step.job_id)
    manifest = StepManifest(
        job_id=step.job_id,
        step_id=step.step_id,
        argv=step.argv,
        cwd=step.cwd,
        output=step.output,
        error=step.error,
        hostname=socket.gethostname(),
        uid=uid,
        gid=gid,
        root_pid=step.init_pid,
        pids=pids,
        criu_version=criu_version,
        created=time.time(),
        leave_running=not opts.stop,
        compression=opts.codec.spec,
        frozen_time=stats.frozen_time or stats.wall_time,
        stats={
            "freezing_time": stats.freezing_time,
            "frozen_time": stats.frozen_time,
            "memdump_time": stats.memdump_time,
            "memwrite_time": stats.memwrite_time,
            "pages_scanned": stats.pages_scanned,
            "pages_written": stats.pages_written,
            "dump_wall_time": stats.wall_time,
            "dump_attempts": stats.attempts,
            "criu_log": str(work / "dump.log"),
        },
        restart_count=job.restart_count,
        gpu=seq.record(),
        tcp_established=tcp,
        network_lock=lock or "",
        world=process.step_world(step.init_pid),
        written_files=files.files,
        frame_tables=frames,
    )
    try:
        for path in step_dir.iterdir():
            if path.is_file():
                path.chmod(0o600)
        manifest.files = entries if staged else describe_files(step_dir)
        manifest.total_time = time.monotonic() - began
        write_signed(step_dir / MANIFEST, manifest.to_dict(), key)
    except OSError as exc:
        raise storage_error(step_dir, exc, "writing the manifest in") from None
    return manifest


def _tcp_mode(
    criu: Criu, step: reg.StepRecord, pids: list[int], outside_allowed: bool
) -> tuple[bool, str | None]:
    """Whether CRIU must checkpoint TCP connections of this tree, and its network lock.

    Connections whose both ends are in the tree are always checkpointed: both ends are
    frozen and dumped together, so no network lock is needed (none is left on the node
    after a vacate either).  One to a peer outside the step only with outside_allowed: at
    restart that peer must still be there at the same address, which ccr cannot promise,
    so without it the checkpoint is refused up front, naming the connection.  Its peer is
    kept quiet by CRIU's network lock (nftables, else iptables), which a vacate leaves in
    place until the restore lifts it.
    """
    conns = process.tcp_connections(pids)
    outside = [c for c in conns if not c.inside]
    if outside_allowed:
        return True, criu.outside_network_lock()
    if outside:
        more = f" and {len(outside) - 1} more" if len(outside) > 1 else ""
        raise JobStateError(
            f"step {step.id} has a TCP connection to outside the step "
            f"({outside[0].describe()}{more}); checkpoint it with --tcp-established "
            "(or CCR_TCP_ESTABLISHED=1) if its peer will still be there at restart"
        )
    return (True, "skip") if conns else (False, None)


def _resume(rt: Runtime, steps: list[reg.StepRecord]) -> None:
    """Undo a failed checkpoint: every task of every tree it touched runs again."""
    for step in steps:
        if step.init_pid is not None:
            stuck = process.resume_tree(step.init_pid)
            if stuck:
                print(
                    f"ccr: warning: tasks {stuck} of step {step.id} are still stopped",
                    file=sys.stderr,
                )
    with rt.registry() as db:
        for step in steps:
            db.compare_and_set_state(step.id, (reg.VACATING,), reg.RUNNING)


def recover_interrupted(rt: Runtime, job_id: int) -> list[StepId]:
    """Resume steps left stopped by a vacate whose ccr died before killing them.

    Only safe while nobody checkpoints the job, so it takes the job lock without waiting.
    """
    try:
        with rt.job_lock(job_id, Deadline.after(0)):
            with rt.registry() as db:
                stale = [s for s in db.steps(job_id) if s.state == reg.VACATING and _alive_tree(s)]
            _resume(rt, stale)
            return [s.id for s in stale]
    except MaxWaitExceeded:
        return []


def _alive_tree(step: reg.StepRecord) -> bool:
    if step.init_pid is None or step.init_start is None:
        return False
    return process.ProcessIdentity(step.init_pid, step.init_start).alive()


def _kill_vacated(rt: Runtime, stopped: list[reg.StepRecord]) -> None:
    for step in stopped:
        if step.init_pid is not None and step.init_start is not None:
            ident = process.ProcessIdentity(step.init_pid, step.init_start)
            process.signal_process(step.init_pid, signal.SIGKILL)
            process.wait_gone(ident, 10.0)
    with rt.registry() as db:
        for step in stopped:
            db.compare_and_set_state(step.id, (reg.VACATING,), reg.VACATED)
