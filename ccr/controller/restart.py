"""Restart steps from checkpoints: find the newest complete one, verify it, restore, supervise."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ccr import config, identity, interrupts, progress
from ccr.controller import supervisor as sup
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import criu as criu_engine
from ccr.engines import gpu, image_fixes, imagestream, openfiles, page_server, process
from ccr.engines.compression import SUFFIX, decompress_dir
from ccr.engines.criu import criu_options
from ccr.errors import (
    CcrError,
    IntegrityError,
    JobStateError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    UsageError,
)
from ccr.ids import JobRef, StepId, parse_job_ref
from ccr.storage import layout
from ccr.storage import registry as reg
from ccr.storage.imageset import discard, scratch_dir
from ccr.storage.manifest import (
    JOB_MANIFEST,
    FileEntry,
    JobManifest,
    StepManifest,
    frames_of,
    load_step_manifest,
    read_verified,
    verify_files,
)


@dataclass
class StepImage:
    """One step's verified checkpoint directory and its manifest."""

    path: Path
    manifest: StepManifest

    @property
    def step(self) -> StepId:
        return StepId(self.manifest.job_id, self.manifest.step_id)


@dataclass
class RestartResult:
    """A restored step, now running under a supervisor."""

    step: StepId
    pid: int
    supervisor_pid: int
    checkpoint: Path
    restore_time: float
    # The phases of restore_time (`ccr restart --json`, scripts/bench.py):
    # unpack_time: decoding or copying images before CRIU started (streamed: CRIU's small
    # metadata files only; from a scratch copy: every file, verifying them on the way).
    unpack_time: float = 0.0
    # verify_time: what the tree's start waited for digests alone (streamed: the gate's
    # wait at post-restore; uncompressed from the stored files: hashing them first).
    verify_time: float = 0.0
    criu_time: float = 0.0  # CRIU's run (streamed: it reads through ccr's decoding)
    # resume_time: from the restore's start until the tree runs (GPU state included).
    resume_time: float = 0.0
    fill_time: float | None = None  # lazy restores only: until every page is in
    # The most memory the restore used beyond the restored tree's own (see ExtraMemory).
    peak_extra_bytes: int = 0
    streamed: bool = False
    # A lazy restore (--lazy): the tree ran after resume_time, its memory was all in
    # fill_time after the start (None until known); fill_status is the file that says so
    # (page_server.FILL_STATUS in the restore's work dir), fill_marker the one that stands
    # for the fill while it runs.
    lazy: bool = False
    fill_status: str | None = None
    fill_marker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": str(self.step),
            "job_id": self.step.job_id,
            "step_id": self.step.step_id,
            "generation": layout.generation_number(layout.generation_of(self.checkpoint)),
            "pid": self.pid,
            "supervisor_pid": self.supervisor_pid,
            "checkpoint": str(self.checkpoint),
            "restore_time": round(self.restore_time, 4),
            "unpack_time": round(self.unpack_time, 4),
            "verify_time": round(self.verify_time, 4),
            "criu_time": round(self.criu_time, 4),
            "resume_time": round(self.resume_time, 4),
            "fill_time": None if self.fill_time is None else round(self.fill_time, 4),
            "peak_extra_bytes": self.peak_extra_bytes,
            "streamed": self.streamed,
            "lazy": self.lazy,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any], step: StepId, path: Path) -> RestartResult:
        """The result a restoring supervisor reported (to_dict's fields)."""
        fill = message.get("fill_time")
        return cls(
            step,
            int(message["pid"]),
            int(message["supervisor_pid"]),
            path,
            float(message["restore_time"]),
            float(message.get("unpack_time", 0.0)),
            float(message.get("verify_time", 0.0)),
            float(message.get("criu_time", 0.0)),
            float(message.get("resume_time", message["restore_time"])),
            None if fill is None else float(fill),
            int(message.get("peak_extra_bytes", 0)),
            bool(message.get("streamed", False)),
            lazy=bool(message.get("lazy")),
            fill_status=message.get("fill_status"),
            fill_marker=message.get("fill_marker"),
        )


@dataclass
class RestartOptions:
    """How to restart (`ccr restart`, `ccr.restart`, `ccr checkpoint restart`)."""

    image_dir: Path | None = None  # None: the job's checkpoint dir
    stick_to_nodes: bool = False
    max_wait: float | None = None
    # A checkpoint whose manifest names another job than its file name (a renamed copy) is
    # restored under the id asked for; without it, such a checkpoint is refused.
    rename: bool = False
    # The restored steps' later checkpoints also keep TCP connections to peers outside the
    # step (as CCR_TCP_ESTABLISHED=1 does).
    tcp_established: bool = False
    new_job: bool = False  # a multi-node checkpoint: submit a new job, never requeue
    # The tree runs before its memory is in (restore_into); CCR_RESTART_LAZY=1 by default.
    lazy: bool = False


def refuse_multi_node(steps: list[layout.StepCheckpoint], how: str) -> None:
    """A multi-node checkpoint is restored by Slurm tasks, never as local steps here."""
    multi = [s for s in steps if s.multi_node]
    if multi:
        s = multi[0]
        raise UsageError(
            f"{s.path} is a multi-node checkpoint of {s.step} ({s.ntasks} ranks on "
            f"{', '.join(sorted(set(s.ranks.values())))}): {how}"
        )


def load_image(rt: Runtime, path: Path, full: bool = True, lazy: bool = False) -> StepImage:
    """Authenticate the manifest and check every file; raise naming what is wrong.

    full=False checks only sizes of what the restore reads for CRIU (restore_into checks
    every digest in the pass that reads the files for CRIU); lazy leaves the pages files'
    digests to the page server (page_server.deferred) and checks the other files here.
    """
    key = rt.manifest_key(create=False)
    manifest = load_step_manifest(path, key)
    later = page_server.deferred if lazy and not identity.served_user() else None
    verify_files(path, manifest, hash_packed=full, hash_raw=full or lazy, later=later)
    generation = layout.generation_of(path)
    if generation != path:  # a step (or rank) of a whole-job or multi-node checkpoint
        JobManifest.from_dict(read_verified(generation / JOB_MANIFEST, key))
    return StepImage(path, manifest)


def preflight(rt: Runtime, image: StepImage, stick_to_nodes: bool) -> None:
    """Refuse a restart that cannot or must not happen, before anything is started."""
    m = image.manifest
    uid = identity.caller_uid()
    if uid != 0 and uid != m.uid:
        raise PermissionDeniedError(
            f"checkpoint {image.path} belongs to uid {m.uid}; only that user or root may restart it"
        )
    owner = image.path.stat().st_uid
    if owner not in (0, uid, m.uid):
        raise PermissionDeniedError(
            f"checkpoint {image.path} is owned by uid {owner}, neither root nor the job's owner"
        )
    check_criu_version(rt, image)
    gpu.check_restorable(image.manifest.gpu)
    if stick_to_nodes and m.hostname != socket.gethostname():
        raise JobStateError(
            f"StickToNodes: checkpoint of {image.step} was taken on {m.hostname}, "
            f"this node is {socket.gethostname()}"
        )
    with rt.registry() as db:
        record = db.find_step(image.step)
    if record is not None and record.state in (reg.RUNNING, reg.VACATING):
        if record.init_pid and record.init_start:
            if process.ProcessIdentity(record.init_pid, record.init_start).alive():
                raise JobStateError(
                    f"step {image.step} is still running (pid {record.init_pid}); "
                    f"cancel it first (ccr cancel {image.step})"
                )
    if not Path(m.cwd).is_dir():
        raise StorageError(f"working directory {m.cwd} of step {image.step} no longer exists")
    openfiles.refuse_if_needed(file_plans(image), str(image.step))


def image_generation(path: Path) -> int:
    """The generation number of an image dir (`42.0.ckpt.7`, `42.ckpt.7/0`, `42.ckpt.7/0/1`);
    0 for a copy not named like one."""
    return layout.generation_number(layout.generation_of(path)) or 0


def file_plans(image: StepImage) -> list[openfiles.FilePlan]:
    """What a restart of image would do to each file the job was writing (changes nothing)."""
    return openfiles.plan(image.manifest.written_files, image_generation(image.path))


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def check_criu_version(rt: Runtime, image: StepImage) -> None:
    """Refuse images from a newer CRIU major version than ours (its image format may differ)."""
    ours = rt.criu().version()
    theirs = image.manifest.criu_version
    if _major(theirs) > _major(ours) or _major(theirs) < 3:
        raise IntegrityError(
            f"checkpoint {image.path} was made by CRIU {theirs}; this CRIU {ours} cannot restore it"
        )


def prepare_files(image: StepImage) -> None:
    """Recreate deleted output files, so the restored tree can go on appending to them.

    (The files the job itself writes are put back by openfiles.put_back, once the saved
    copies are unpacked.)
    """
    for name in (image.manifest.output, image.manifest.error):
        if name is None:
            continue
        out = Path(name)
        if not out.exists():
            if not out.parent.is_dir():
                raise StorageError(f"output directory {out.parent} of step {image.step} is gone")
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.close(fd)


def correct_images(image: StepImage, raw_dir: Path, scratch: bool, work: Path) -> Path | None:
    """Put right, before CRIU reads raw_dir, what its restore would get wrong (see
    engines.image_fixes); say what was done in the restore's work dir.

    scratch: raw_dir is ccr's own decompressed copy, corrected in place.  Otherwise it is
    the stored checkpoint, never modified: corrections go into a small overlay directory
    (links to the checkpoint's files), returned for CRIU to read instead; None: no overlay.
    """
    notes: list[str] = []
    m = image.manifest
    replaced: dict[str, bytes] = {}
    if image_fixes.may_need_fixes(raw_dir):
        sockets = image_fixes.bound_socket_paths(raw_dir)
        for path in image_fixes.make_socket_dirs(sockets, m.uid, m.gid):
            notes.append(f"created {path} (0700, {m.uid}:{m.gid}) for a bound Unix socket")
        replaced, fixes = image_fixes.corrected_timerfds(raw_dir)
        notes += [fix.describe() for fix in fixes]
    if m.leave_running and m.tcp_established:
        lifted = image_fixes.lifted_network_lock(raw_dir)
        replaced.update(lifted)
        notes += [
            "inventory.img: network lock marked lifted (its dump left the tree running)"
        ] * bool(lifted)
    overlay = None
    if replaced:
        if scratch:
            image_fixes.replace_in_place(raw_dir, replaced)
        else:
            overlay = scratch_dir(sum(len(d) for d in replaced.values()), work, "overlay")
            image_fixes.write_overlay(raw_dir, overlay, replaced)
    if notes:
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        (work / "corrections.log").write_text("".join(f"{n}\n" for n in notes))
    return overlay


# Images CRIU reads but ccr's own image fixes never do: streamed from the stored files.
# The pages are the bulk (the process's memory), the others the step's tmpfs contents and
# deleted files it kept open; everything else (metadata, KBs) is decoded into scratch first.
_STREAMED = re.compile(r"^(pages-\d+|tmpfs-dev-\d+\.tar\.gz|ghost-file-\d+)\.img$")


def _raw_name(entry: FileEntry) -> str:
    return entry.name[: -len(SUFFIX)] if entry.codec == "zstd" else entry.name


def restore_into(
    rt: Runtime,
    supervisor: sup.Supervisor,
    image: StepImage,
    deadline: Deadline,
    lazy: bool = False,
) -> RestartResult:
    """Restore image as a child of this process and hand it to supervisor, by deadline.

    By default CRIU reads the pages through ccr (engines.imagestream): decoded and checked
    frame by frame in one pass, no copy of the image anywhere.  CCR_RESTORE_STREAM=0
    decodes (and checks) everything into scratch space first, then restores over RPC.

    lazy: the tree runs before its private memory is in; a page server (engines.page_server)
    brings it in from the stored images, on demand and in the background (never streamed:
    a lazy restore that cannot be lazy falls back to the scratch copy).
    """
    prepare_files(image)
    criu = rt.criu()
    work = rt.work_dir(f"{image.step}-restore")
    began = time.monotonic()
    streamed = config.restore_streamed()
    saved = {f.copy for f in image.manifest.written_files if f.copy}
    files = image.manifest.files
    if streamed:
        bulk = [f for f in files if _STREAMED.match(_raw_name(f)) and _raw_name(f) not in saved]
    else:
        bulk = []
    rest = [f for f in files if f not in bulk]
    # A user's restore (node service) reads a verified copy in ccr's private scratch, never
    # the user's own files, which could be swapped after the check (see ccr.identity): so
    # it is never lazy (the page server reads the stored files while the job runs).
    # Streamed files are safe from that too: CRIU gets the very bytes that were checked
    # (ccr's own buffers, read once, as the user).
    packed = any(f.codec != "none" for f in files) or identity.served_user()
    if lazy and identity.served_user():
        note = f"ccr: note: {image.step} is restored eagerly (through the node service)"
        print(note, file=sys.stderr)
        lazy = False
    if lazy:
        streamed, bulk, rest = False, [], list(files)
    memory = imagestream.ExtraMemory()
    # ccr's own copy: the metadata when streaming, every file of a compressed image when not.
    copy = streamed or packed
    raw_dir = (
        scratch_dir(sum(f.raw_size or f.size for f in rest), image.path.parent, "restore")
        if copy
        else image.path
    )
    unpack_time = verify_time = criu_time = 0.0
    overlay: Path | None = None
    undo_files: openfiles.Undo | None = None
    keeper: page_server.Keeper | None = None
    # Nothing between making the scratch dir and this try: an interrupt there would leak it.
    try:
        if copy:
            memory.watch(raw_dir)
        unpack_began = time.monotonic()
        fell_back = False
        if lazy:
            marker = page_server.filling_marker(rt.state_dir, str(image.step))
            keeper = _start_lazy(image, work, marker, raw_dir if packed else None)
            lazy = keeper is not None
            fell_back = not lazy
        if copy and not lazy:
            # Every file's digest (and zstd checksum) is checked as it is decoded: a
            # corrupted image restores nothing.
            with progress.task(f"decompress {image.step}", image.manifest.image_bytes) as update:

                def unpacked(done: int) -> None:
                    update(done)
                    memory.sample(0)

                decompress_dir(image.path, raw_dir, rest, progress=unpacked)
            unpack_time = time.monotonic() - unpack_began
        elif not copy and not lazy and not fell_back:  # (a fallback has checked them)
            verify_files(image.path, image.manifest)  # the one read before CRIU's
            verify_time = time.monotonic() - unpack_began
        overlay = correct_images(image, raw_dir, copy, work)
        if overlay is not None:
            raw_dir = overlay
        deadline.check(f"restore of {image.step}")
        # Each file the job writes goes back to its state at the checkpoint (so CRIU finds
        # the size it recorded, and the job the contents it wrote); planned again here, as
        # files may have changed since preflight looked.
        undo_files = openfiles.put_back(
            file_plans(image), raw_dir, image_generation(image.path), str(image.step)
        )
        # CRIU reports no progress: a spinner names the phase instead of a blank screen.
        # A tree dumped with its TCP connections is restored with them; the supervisor's
        # setting (--tcp-established) covers images of older ccr versions.
        # The restore lifts the network lock its dump left (a vacate's), so it uses that one
        # (a lock its dump already lifted is marked so in the image: correct_images).
        tcp = image.manifest.tcp_established or supervisor.settings.tcp_established
        if keeper is not None:
            keeper.listen()
        with progress.task(f"restoring {image.step} (CRIU)", 0):
            criu_began = time.monotonic()
            if streamed:
                pid, verify_time = _restore_streamed(
                    criu.binary, image, raw_dir, bulk, work, deadline, tcp, memory
                )
            else:
                options = criu_options(
                    "restore",
                    tcp_established=tcp,
                    network_lock=image.manifest.network_lock or None,
                    lazy_pages=lazy,
                )
                pid = criu.restore(options, raw_dir, work, deadline=deadline).pid
                if not lazy:  # the tree's memory is now in; a scratch copy still is too
                    memory.sample(image.manifest.image_bytes)
            criu_time = time.monotonic() - criu_began
    except BaseException as exc:
        if keeper is not None:
            keeper.abort()
        if undo_files is not None:
            undo_files()  # a failed restart leaves every file as it found it
        if keeper is not None and keeper.failure is not None and isinstance(exc, CcrError):
            # CRIU failed because serving did (the cause): say that
            cls = IntegrityError if keeper.corrupt else CcrError
            raise cls(f"lazy restore of {image.step} failed: {keeper.failure}") from None
        raise
    finally:
        if overlay is not None:
            discard(overlay)
        if copy:
            discard(raw_dir)  # a lazy restore's sparse files: CRIU has read what it needs
    # From here the tree exists: anything that fails or interrupts (Ctrl-C) before the
    # supervisor owns it kills it, so no half-restored step outlives this call.
    supervisor.adopt(pid)
    try:
        if keeper is not None:
            _serve_lazily(keeper, image, work, pid, began)
        if gpu.needs_gpu(image.manifest.gpu):
            # Without its GPU memory the job is not restored.
            gpu.restore_tree(image.manifest.gpu, process.tree_pids(pid), deadline=deadline)
        with rt.registry() as db:
            db.ensure_job(image.step.job_id, str(layout.series_dir(image.path)))
            existing = db.find_step(image.step)
        m = image.manifest
        record = existing or reg.StepRecord(
            job_id=m.job_id,
            step_id=m.step_id,
            argv=m.argv,
            cwd=m.cwd,
            output=m.output,
            error=m.error,
            state=reg.RUNNING,
            init_pid=None,
            init_start=None,
            supervisor_pid=None,
            started=time.time(),
        )
        resumed = time.monotonic() - began
        supervisor.start_restored(pid, record)
    except BaseException:
        supervisor.rollback()
        if keeper is not None:
            keeper.abort()
        if undo_files is not None:
            undo_files()
        raise
    return RestartResult(
        image.step,
        pid,
        os.getpid(),
        image.path,
        time.monotonic() - began,
        unpack_time=unpack_time,
        verify_time=verify_time,
        criu_time=criu_time,
        resume_time=resumed,
        peak_extra_bytes=memory.peak,
        streamed=streamed,
        lazy=keeper is not None,
        fill_status=str(work / page_server.FILL_STATUS) if keeper is not None else None,
        fill_marker=str(keeper.marker) if keeper is not None else None,
    )


def _restore_streamed(
    binary: str,
    image: StepImage,
    raw_dir: Path,
    bulk: list[FileEntry],
    work: Path,
    deadline: Deadline,
    tcp: bool,
    memory: imagestream.ExtraMemory,
) -> tuple[int, float]:
    """`criu restore --stream`: the metadata from raw_dir (verified), the bulk straight
    from the stored files; (the root's PID, seconds the tree waited at the gate)."""
    with identity.privileged():  # as criu.restore does them (over RPC)
        process.drop_time_wait(criu_engine.tcp_listen_ports(raw_dir))
        view = criu_engine.without_gone_mounts(raw_dir)
    sock_dir = scratch_dir(0, image.path.parent, "stream")
    try:
        sources = {p.name: imagestream.Source(p) for p in view.iterdir() if p.is_file()}
        for entry in bulk:
            frames = frames_of(entry, image.manifest.frame_tables.get(entry.name))
            stored = image.path / entry.name
            sources[_raw_name(entry)] = imagestream.Source(stored, entry, frames)
        done = imagestream.restore(
            binary,
            sources,
            sock_dir,
            work,
            deadline=deadline,
            tcp_established=tcp,
            network_lock=image.manifest.network_lock or None,
            on_sample=memory.sample,
        )
    finally:
        with identity.privileged():
            criu_engine.drop_view(view, raw_dir)
        discard(sock_dir)
    memory.sample(done.stats.sent_bytes)
    return done.pid, done.stats.gate_wait


def _start_lazy(
    image: StepImage, work: Path, marker: Path, raw_dir: Path | None
) -> page_server.Keeper | None:
    """Start the page server and prepare the image CRIU restores lazily; None: this
    checkpoint cannot be restored lazily (said on stderr), restore it eagerly."""
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    page_server.clear_status(work, marker)
    keeper = page_server.Keeper(work, marker)  # its interpreter starts while the image is prepared
    try:
        with progress.task(f"prepare lazy restore of {image.step}", 0):
            plan = page_server.prepare(
                image.path, image.manifest.files, raw_dir, image.manifest.frame_tables
            )
        plan.fill_rate = config.lazy_fill_rate()
        keeper.send_plan(plan)
    except page_server.NotLazy as exc:
        keeper.abort()
        print(f"ccr: note: {image.step} is restored eagerly: {exc}", file=sys.stderr)
        if raw_dir is not None:
            for item in raw_dir.iterdir():
                item.unlink()
        else:  # the pages files' digests were left to the server: checked now instead
            verify_files(image.path, image.manifest)
        return None
    except BaseException:
        keeper.abort()
        raise
    return keeper


def _serve_lazily(
    keeper: page_server.Keeper, image: StepImage, work: Path, root: int, began: float
) -> None:
    """The tree rooted at root runs on pages being filled: should serving fail, the job is
    killed (before any uffd is let go) and the reason goes to its error output."""
    m = image.manifest
    errors = Path(m.error or m.output) if (m.error or m.output) else None

    def failed(message: str) -> None:
        # Said before the kill: the supervisor exits as soon as its tree is gone.
        line = f"ccr: error: lazy restore of {image.step} failed, the job was killed: {message}"
        code = IntegrityError.exit_code if keeper.corrupt else CcrError.exit_code
        page_server.write_status(work, keeper.marker, {"ok": False, "error": line, "code": code})
        print(line, file=sys.stderr, flush=True)
        if errors is not None:
            try:
                with errors.open("a") as fh:
                    fh.write(line + "\n")
            except OSError:
                pass
        process.signal_process(root, signal.SIGKILL)  # its PID namespace's init: all of it

    def done(stats: dict[str, Any]) -> None:
        page_server.write_status(
            work,
            keeper.marker,
            {"ok": True, "fill_time": stats["fill_done"] - began, "bytes": stats["bytes"]},
        )

    keeper.restored(root, failed, done)


def wait_filled(results: list[RestartResult], timeout: float | None = None) -> None:
    """Wait until the memory of every lazily restored step is in; set their fill_time.

    Raises CcrError with the reason when serving failed (the job was killed)."""
    for result in results:
        if result.fill_status is None:
            continue
        marker = Path(result.fill_marker or "")
        status = page_server.wait_status(Path(result.fill_status), marker, timeout)
        if status is None:
            raise CcrError(
                f"the lazy restore of {result.step} ended without saying whether all of its "
                "memory came in (its supervisor is gone): see `ccr status`"
            )
        if not status.get("ok"):
            error = str(status.get("error")).removeprefix("ccr: error: ")
            if status.get("code") == IntegrityError.exit_code:
                raise IntegrityError(error)
            raise CcrError(error)
        result.fill_time = float(status["fill_time"])


def restart(rt: Runtime, ref: JobRef, opts: RestartOptions) -> list[RestartResult]:
    """Restore every step that ref names from its newest checkpoint, each under a supervisor
    (a multi-node one is refused: controller.dispatch hands it to Slurm)."""
    image_dir = rt.image_dir(ref.job_id, opts.image_dir)
    with nothing_restored_if_interrupted():
        steps = layout.newest(image_dir, ref, rt.manifest_key(create=False))
        refuse_multi_node(steps, f"restart it through Slurm (ccr restart {ref.job_id})")
        images = [
            as_step(load_image(rt, s.path, full=False, lazy=opts.lazy), s.step, opts.rename)
            for s in steps
        ]
    return restart_images(
        rt,
        images,
        image_dir,
        opts.stick_to_nodes,
        Deadline.after(opts.max_wait),
        opts.tcp_established,
        opts.lazy,
    )


def checkpoint_path(target: str) -> Path | None:
    """target as a checkpoint path, or None when it names a job (`42`, `42.0`).

    An id wins over a same-named file in the cwd; anything else (`42.ckpt`, `./42`,
    `/scratch/42.0.ckpt.3/0`) is a path."""
    try:
        parse_job_ref(target)
        return None
    except UsageError:
        pass
    path = Path(target)
    if not path.exists() and "/" not in target and not target.endswith(".ckpt"):
        raise UsageError(
            f"malformed job id {target!r}: expected <jobid>, <jobid>.<stepid> or a checkpoint path"
        )
    return path


def ref_of_path(path: Path) -> JobRef:
    """The job (or step, when it holds one) that the checkpoint at path names."""
    steps = layout.open_path(path, None).steps
    jobs = {s.step.job_id for s in steps}
    if len(jobs) != 1:
        raise IntegrityError(f"{path} holds steps of several jobs: {sorted(jobs)}")
    job = jobs.pop()
    return JobRef(job, steps[0].step.step_id if len(steps) == 1 else None)


def images_at(rt: Runtime, path: Path, lazy: bool = False) -> list[StepImage]:
    """The verified step checkpoints a path names (link, generation or step dir), under the
    ids their manifests carry (like `dmtcp_restart FILE`)."""
    opened = layout.open_path(path, rt.manifest_key(create=False))
    if opened.multi_node:
        job, where = opened.steps[0].step.job_id, layout.series_dir(opened.path)
        refuse_multi_node(
            opened.steps, f"restart it by job id (ccr restart {job} --image-dir {where})"
        )
    return [load_image(rt, d, full=False, lazy=lazy) for d in opened.dirs()]


def restart_path(rt: Runtime, path: Path, opts: RestartOptions) -> list[RestartResult]:
    """Restore the checkpoint at path (a `.ckpt` link, a generation or a step dir in one)."""
    with nothing_restored_if_interrupted():
        images = images_at(rt, path, opts.lazy)
    return restart_images(
        rt,
        images,
        layout.series_dir(images[0].path),
        opts.stick_to_nodes,
        Deadline.after(opts.max_wait),
        opts.tcp_established,
        opts.lazy,
    )


def as_step(image: StepImage, step: StepId, rename: bool) -> StepImage:
    """image, to be restored as step: refused if its manifest names another step, unless
    rename (then it is restored under step's ids, its files untouched)."""
    if image.step == step:
        return image
    if not rename:
        raise IntegrityError(
            f"{image.path} holds a checkpoint of {image.step}, not of {step} (a renamed copy?): "
            f"restart it by path (ccr restart {image.path}), or as {step} with --rename"
        )
    return StepImage(image.path, replace(image.manifest, job_id=step.job_id, step_id=step.step_id))


def restart_images(
    rt: Runtime,
    images: list[StepImage],
    image_dir: Path,
    stick_to_nodes: bool,
    deadline: Deadline,
    tcp_established: bool = False,
    lazy: bool = False,
) -> list[RestartResult]:
    """Restore each verified image under a supervisor of its own, all by deadline."""
    if not images:
        raise NotFoundError(f"no step checkpoint in {image_dir}")
    for image in images:
        preflight(rt, image, stick_to_nodes)
    job_ids = sorted({image.step.job_id for image in images})
    results: list[RestartResult] = []
    try:
        for image in images:
            settings = _job_settings(rt, image.step.job_id)
            settings.tcp_established = settings.tcp_established or tcp_established
            message = sup.spawn_background(
                str(image.step),
                functools.partial(_restore_and_supervise, rt, image, settings, deadline, lazy),
            )
            results.append(RestartResult.from_message(message, image.step, image.path))
    except interrupts.Interrupted as exc:
        exc.lines = _interrupted_lines(images, results, exc.started)
        raise
    finally:
        if results:
            with rt.registry() as db:
                for job_id in job_ids:  # the job record exists now: the restore made it
                    db.bump_restart_count(job_id)
    return results


@contextmanager
def nothing_restored_if_interrupted() -> Iterator[None]:
    """An interrupt before any restore began (while finding and verifying images)."""
    try:
        yield
    except interrupts.Interrupted as exc:
        exc.lines = exc.lines or ["interrupted: nothing was restored"]
        raise


def _interrupted_lines(
    images: list[StepImage], done: list[RestartResult], started: dict[str, Any] | None
) -> list[str]:
    """What an interrupted restart left: one line per step it had begun."""
    lines = [
        f"interrupted: {r.step} was already restored (pid {r.pid}) and keeps running" for r in done
    ]
    current = images[len(done)].step
    if started is not None:
        lines.append(
            f"interrupted: {current} was already restored (pid {started['pid']}) and keeps running"
        )
    else:
        rest = ", nothing running" if not done else ""
        lines.append(f"interrupted: restore of {current} rolled back{rest}")
    return lines


def _job_settings(rt: Runtime, job_id: int) -> sup.SupervisorSettings:
    """The job's interval and retention if ccr knows it; defaults for a job new here (no
    record is made before a restore succeeded: a failed restart leaves no phantom job)."""
    with rt.registry() as db:
        job = db.find_job(job_id)
    if job is None:
        return sup.SupervisorSettings()
    return sup.SupervisorSettings(interval=job.interval_s, keep=job.keep)


def _restore_and_supervise(
    rt: Runtime,
    image: StepImage,
    settings: sup.SupervisorSettings,
    deadline: Deadline,
    lazy: bool,
    report: sup.Report,
) -> int:
    supervisor = sup.Supervisor(rt, image.step, settings)
    result = restore_into(rt, supervisor, image, deadline, lazy)
    try:
        report(
            {
                "ok": True,
                **result.to_dict(),
                # (for the caller to wait on the fill: not part of `ccr restart --json`)
                "fill_status": result.fill_status,
                "fill_marker": result.fill_marker,
            }
        )
    except BaseException:  # the caller abandoned the restore before hearing of it
        supervisor.rollback()
        raise
    return supervisor.wait()
