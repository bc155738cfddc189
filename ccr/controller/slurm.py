"""Multi-node checkpoints through Slurm: fan out as an overlapping step, publish all-or-nothing.

`ccr create J` of a job on several nodes runs `srun --jobid=J --overlap` with one ccr per node
(`ccr _node-checkpoint`).  Each dumps the ccr tasks of its node into a shared hidden staging
directory (`.<name>.dist-*/[<stepid>/]<rank>/`), reports on stdout and waits for the decision
on stdin (srun --input=all): `commit` once every node succeeded and the generation is
published, anything else (abort, EOF, timeout) rolls back, so no task stays stopped and
nothing partial is ever visible.  With --stop the tasks are dumped stopped everywhere and
killed only after the publish (two phases).
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import secrets
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from ccr import config, identity
from ccr.controller import checkpoint as ckpt
from ccr.controller import supervisor as sup
from ccr.controller.restart import default_image_dir
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import slurm
from ccr.engines.compression import Codec
from ccr.errors import (
    CcrError,
    JobStateError,
    MaxWaitExceeded,
    StorageError,
    UsageError,
    error_for_code,
    exit_code_for,
)
from ccr.ids import (
    FileContext,
    JobRef,
    StepId,
    checkpoint_name,
    expand_filename_pattern,
    output_name,
)
from ccr.storage import registry as reg
from ccr.storage.imageset import (
    CheckpointSeries,
    discard,
    make_private_dir,
    prepare_image_dir,
)
from ccr.storage.manifest import JOB_MANIFEST, JobManifest, read_verified, write_signed

REPORT = "ccr-node-report "
DECISION_WAIT = 300.0  # how long a node waits for commit/abort without a MaxWait


# ------------------------------------------------------------------ task placement
def task_exports(rt: Runtime, step: StepId, image_dir: Path) -> dict[str, str]:
    """What a freshly launched task gets in its environment (restored ones keep their own)."""
    out = {"SLURM_CHECKPOINT_IMAGE_DIR": str(image_dir)}
    if slurm.TaskEnv.from_env().restart_count is None:
        with rt.registry() as db:
            job = db.find_job(step.job_id)
        out["SLURM_RESTART_COUNT"] = str(job.restart_count if job else 0)
    return out


def task_settings(settings: sup.SupervisorSettings) -> sup.SupervisorSettings:
    """A task of a multi-task step must not checkpoint itself alone: `ccr create J` does it."""
    if not slurm.TaskEnv.from_env().multi:
        return settings
    if settings.interval:
        settings.log("interval checkpoints of a multi-task step come from `ccr create <jobid>`")
    return replace(settings, interval=0, preempt_signals=())


def output_file(
    step: StepId, cwd: Path, pattern: str | None = None, argv: list[str] | None = None
) -> Path:
    """Where a step's stdout goes: `-o PATTERN` (Slurm's %j, %s, ... expanded), else
    `ccr-J.S.out` (`ccr-J.S.<rank>.out` for a task of a multi-task step); `-o -` keeps the
    file in the state directory (the foreground relay is then the only copy one sees)."""
    task = slurm.TaskEnv.from_env()
    name = output_name(step)
    default = f"{name[:-4]}.{task.rank}.out" if task.multi else name
    return _step_file(step, cwd, pattern, argv or [], default, "-o", "out")


def error_file(
    step: StepId, cwd: Path, pattern: str | None, argv: list[str] | None = None
) -> Path | None:
    """Where a step's stderr goes: `-e PATTERN`, else None (with stdout)."""
    if pattern is None:
        return None
    return _step_file(step, cwd, pattern, argv or [], "", "-e", "err")


def _step_file(
    step: StepId, cwd: Path, pattern: str | None, argv: list[str], default: str, flag: str, ext: str
) -> Path:
    task = slurm.TaskEnv.from_env()
    if pattern is None:
        return cwd / default
    if pattern == "-":
        private = config.state_dir() / "output"
        private.mkdir(mode=0o700, exist_ok=True)
        rank = f".{task.rank}" if task.multi else ""
        return private / f"{step}{rank}.{ext}"
    path = cwd / expand_filename_pattern(pattern, file_context(step, argv))
    refuse_terminal(path, flag)
    if not path.parent.is_dir():
        raise StorageError(f"{flag} {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise StorageError(f"{flag} {path} is a directory")
    return path


def file_context(step: StepId, argv: list[str]) -> FileContext:
    """What %N, %u, %x, %A, %a, %t, %n mean for this task, from Slurm's environment."""
    task = slurm.TaskEnv.from_env()
    try:
        user = pwd.getpwuid(identity.caller_uid()).pw_name
    except KeyError:
        user = str(identity.caller_uid())
    return FileContext(
        job_id=step.job_id,
        step_id=step.step_id,
        node=task.node,
        user=user,
        job_name=config.env_str("SLURM_JOB_NAME") or (Path(argv[0]).name if argv else "ccr"),
        array_job_id=config.env_int("SLURM_ARRAY_JOB_ID"),
        array_task_id=config.env_int("SLURM_ARRAY_TASK_ID"),
        task_id=task.rank or 0,
        node_id=config.env_int("SLURM_NODEID") or 0,
    )


def refuse_terminal(path: Path, flag: str) -> None:
    """A terminal cannot be an output file: CRIU cannot dump a tty it does not own."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return  # a file yet to be created (or one the step will fail to open, and say so)
    try:
        tty = os.isatty(fd)
    finally:
        os.close(fd)
    if tty:
        raise UsageError(
            f"{flag} {path} is a terminal: CRIU cannot checkpoint a step writing to a terminal; "
            f"omit {flag} and a foreground ccr run shows the output there"
        )


def record_task(rt: Runtime, step: StepId, rank: int | None = None, ntasks: int = 0) -> None:
    """Remember where this step task runs: rank, node, step size (no-op outside Slurm)."""
    task = slurm.TaskEnv.from_env()
    rank = task.rank if rank is None else rank
    if rank is None:
        return
    with rt.registry() as db:
        db.update_step(
            step, rank=rank, node=task.node, ntasks=ntasks or task.ntasks, nnodes=task.nnodes
        )


# ------------------------------------------------------------------ distributed images
@dataclass
class DistImage:
    """One step of a multi-node checkpoint: a directory of rank sub-directories."""

    gen: Path
    step_id: int
    step_dir: Path
    ranks: dict[int, str]  # rank -> node it was dumped on
    created: float

    @property
    def ntasks(self) -> int:
        return len(self.ranks)


def _dist_steps(gen: Path, key: bytes | None) -> list[DistImage]:
    manifest = gen / JOB_MANIFEST
    if not manifest.exists():
        return []
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return []
    if "ranks" not in raw:
        return []
    data = read_verified(manifest, key)
    single = data.get("step_ref")
    return [
        DistImage(
            gen=gen,
            step_id=int(sid),
            step_dir=gen if single is not None else gen / sid,
            ranks={int(r): str(n) for r, n in ranks.items()},
            created=float(data.get("created", 0.0)),
        )
        for sid, ranks in data["ranks"].items()
    ]


def find_dist(rt: Runtime, image_dir: Path, ref: JobRef) -> list[DistImage]:
    """The newest multi-node checkpoint of each step ref names (job- or step-level series)."""
    key = rt.manifest_key(create=False)
    names = [checkpoint_name(JobRef(ref.job_id))]
    if ref.step_id is not None:
        names.append(checkpoint_name(JobRef(ref.job_id, ref.step_id)))
    elif image_dir.is_dir():
        prefix = f"{ref.job_id}."
        names += sorted(
            p.name
            for p in image_dir.iterdir()
            if p.is_symlink() and p.name.startswith(prefix) and p.name.endswith(".ckpt")
        )
    best: dict[int, DistImage] = {}
    for name in names:
        gen = CheckpointSeries(image_dir, name).newest()
        if gen is None:
            continue
        for image in _dist_steps(gen.path, key):
            if ref.step_id not in (None, image.step_id):
                continue
            if image.step_id not in best or image.created > best[image.step_id].created:
                best[image.step_id] = image
    return [best[s] for s in sorted(best)]


def rank_image(rt: Runtime, step: StepId, image_dir: Path) -> Path | None:
    """The rank directory this task resumes from, if its step has a multi-node checkpoint."""
    task = slurm.TaskEnv.from_env()
    if task.job_id is None or not image_dir.is_dir():
        return None
    found = find_dist(rt, image_dir, JobRef(step.job_id, step.step_id))
    if not found:
        return None
    image = found[0]
    rank = task.rank if task.rank is not None else 0
    if image.ntasks != task.ntasks:
        raise JobStateError(
            f"checkpoint {image.step_dir} holds {image.ntasks} tasks but step {step} has "
            f"{task.ntasks}: run it with the same task count (srun -n{image.ntasks})"
        )
    return image.step_dir / str(rank)


# ------------------------------------------------------------------ coordinator
def distributed(rt: Runtime, ref: JobRef) -> bool:
    """Whether `ccr create ref` must fan out through Slurm rather than dump local steps."""
    with rt.registry() as db:
        job = db.find_job(ref.job_id)
    if job is not None:
        steps = [s for s in job.steps if ref.step_id in (None, s.step_id)]
        live = [s for s in steps if ckpt._is_live(s)]
        if any(s.ntasks > 1 or s.nnodes > 1 for s in live):
            return True
        if live:
            return False
    info = slurm.job_info(ref.job_id)
    return info is not None and info.get("JobState") == "RUNNING"


def requeue_if_slurm(ref: JobRef) -> bool:
    """After a vacate: `scontrol requeue` the job if it is a Slurm batch job (else nothing)."""
    info = slurm.job_info(ref.job_id)
    if info is None or info.get("BatchFlag") != "1":
        return False
    slurm.requeue(ref.job_id)
    return True


def create_any(rt: Runtime, ref: JobRef, opts: ckpt.CheckpointOptions) -> ckpt.CheckpointResult:
    """`ccr create`: through Slurm for a Slurm job not (only) on this node, else locally."""
    if distributed(rt, ref):
        return create(rt, ref, opts)
    return ckpt.create(rt, ref, opts)


@dataclass
class _Round:
    """What the nodes said during one distributed checkpoint."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def _pump(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def create(rt: Runtime, ref: JobRef, opts: ckpt.CheckpointOptions) -> ckpt.CheckpointResult:
    """Checkpoint every task of a Slurm job on every node; publish only if all succeeded."""
    started = time.monotonic()
    deadline = None if opts.max_wait is None else started + opts.max_wait
    nodes = slurm.running_nodes(ref.job_id)
    name = checkpoint_name(ref)
    staging_name = f".{name}.dist-{os.getpid()}-{secrets.token_hex(4)}"
    cmd = [*slurm.ccr_command(), "_node-checkpoint", str(ref), "--staging", staging_name]
    cmd += ["--compress", opts.codec.spec] + (["--stop"] if opts.stop else [])
    cmd += ["--mkdir"] if opts.mkdir else []
    if opts.image_dir is not None:
        cmd += ["--image-dir", str(opts.image_dir.resolve())]
    if opts.max_wait is not None:
        cmd += ["--max-wait", f"{opts.max_wait:g}"]
    proc = slurm.srun_overlap(ref.job_id, nodes, cmd)
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    lines: queue.Queue[str | None] = queue.Queue()
    rnd = _Round()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    stderr = proc.stderr
    err_thread = threading.Thread(target=lambda: rnd.stderr.extend(stderr), daemon=True)
    err_thread.start()
    published: Path | None = None
    staging: Path | None = None
    try:
        timed_out = _collect(lines, rnd, len(nodes), deadline)
        problem = _problem(ref, rnd, nodes, timed_out, opts.max_wait)
        if problem is None:
            image_dir = Path(next(r["image_dir"] for r in rnd.reports if r.get("tasks")))
            staging = image_dir / staging_name
            published = _publish(rt, ref, image_dir, staging, name, rnd, started)
    except BaseException:
        _finish(proc, "abort", lines, rnd, err_thread)
        if staging is not None and published is None:
            discard(staging)
        raise
    _finish(proc, f"commit {published}" if published else "abort", lines, rnd, err_thread)
    if published is None:
        # Nodes that never answered (MaxWait) may still have made the staging directory.
        dirs = {Path(r["image_dir"]) for r in rnd.reports if r.get("image_dir")}
        dirs.add(opts.image_dir.resolve() if opts.image_dir else default_image_dir(rt, ref.job_id))
        for image_dir in dirs:
            discard(image_dir / staging_name)
        assert problem is not None
        raise problem
    series = CheckpointSeries(published.parent, name)
    series.prune(opts.keep or 2)
    tasks = [t for r in rnd.reports for t in r.get("tasks", [])]
    return ckpt.CheckpointResult(
        ref=ref,
        path=published,
        link=series.link,
        steps=sorted({int(t["step"]) for t in tasks}),
        frozen_time=max((float(t["frozen"]) for t in tasks), default=0.0),
        total_time=time.monotonic() - started,
        image_bytes=sum(int(t["image_bytes"]) for t in tasks),
        stored_bytes=sum(int(t["stored_bytes"]) for t in tasks),
    )


def _collect(
    lines: queue.Queue[str | None], rnd: _Round, expected: int, deadline: float | None
) -> bool:
    """Read node reports until every node answered or srun ended; True on MaxWait expiry."""
    while len(rnd.reports) < expected:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return True
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            return True
        if line is None:
            return False
        if line.startswith(REPORT):
            rnd.reports.append(json.loads(line[len(REPORT) :]))
    return False


def _problem(
    ref: JobRef, rnd: _Round, nodes: list[str], timed_out: bool, max_wait: float | None
) -> CcrError | None:
    """Why this round must not be published (None: every node and every rank is there)."""
    tail = "; nothing was published and every task is running"
    failed = [r for r in rnd.reports if not r.get("ok")]
    if failed:
        first = failed[0]
        return error_for_code(
            int(first.get("code", 1)),
            f"checkpoint of {ref} failed on {first['node']}: {first.get('error')}{tail}",
        )
    if timed_out:
        missing = sorted(set(nodes) - {r["node"] for r in rnd.reports})
        return MaxWaitExceeded(
            f"checkpoint of {ref} abandoned after MaxWait={max_wait:g}s "
            f"(no answer from {', '.join(missing) or 'srun'}){tail}"
        )
    if len(rnd.reports) < len(nodes):
        missing = sorted(set(nodes) - {r["node"] for r in rnd.reports})
        last = rnd.stderr[-1].strip() if rnd.stderr else "srun ended"
        return CcrError(f"checkpoint of {ref}: no answer from {', '.join(missing)} ({last}){tail}")
    dirs = {r["image_dir"] for r in rnd.reports if r.get("tasks")}
    if not dirs:
        return JobStateError(f"job {ref.job_id} has no ccr task on {','.join(nodes)}")
    if len(dirs) > 1:
        return CcrError(f"the nodes of {ref} disagree on the image directory: {sorted(dirs)}")
    by_step: dict[int, set[int]] = {}
    sizes: dict[int, int] = {}
    for t in (t for r in rnd.reports for t in r.get("tasks", [])):
        by_step.setdefault(int(t["step"]), set()).add(int(t["rank"]))
        sizes[int(t["step"])] = int(t["ntasks"])
    for sid, ranks in by_step.items():
        missing_ranks = sorted(set(range(sizes[sid])) - ranks)
        if missing_ranks:
            return JobStateError(
                f"step {ref.job_id}.{sid}: no live ccr task for ranks {missing_ranks}{tail}"
            )
    return None


def _publish(
    rt: Runtime,
    ref: JobRef,
    image_dir: Path,
    staging: Path,
    name: str,
    rnd: _Round,
    started: float,
) -> Path:
    key = rt.manifest_key(create=True)
    assert key is not None
    tasks = [t for r in rnd.reports for t in r.get("tasks", [])]
    ranks: dict[str, dict[str, str]] = {}
    for t in tasks:
        ranks.setdefault(str(t["step"]), {})[str(t["rank"])] = t["node"]
    manifest = JobManifest(
        job_id=ref.job_id,
        steps=sorted(int(s) for s in ranks),
        created=time.time(),
        hostname=socket.gethostname(),
        total_time=time.monotonic() - started,
    ).to_dict()
    manifest.update(ranks=ranks, step_ref=ref.step_id)
    write_signed(staging / JOB_MANIFEST, manifest, key)
    return CheckpointSeries(image_dir, name).publish(staging).path


def _finish(
    proc: Any, decision: str, lines: queue.Queue[str | None], rnd: _Round, err: threading.Thread
) -> None:
    """Tell every node the decision, then let the overlapping step end (killed if it hangs)."""
    try:
        proc.stdin.write(decision + "\n")
        proc.stdin.flush()
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=60)
    except Exception:  # noqa: BLE001 - a hung srun must not hang ccr
        proc.kill()
        proc.wait()
    err.join(timeout=5)


# ------------------------------------------------------------------ one node
def node_checkpoint(
    rt: Runtime,
    ref: JobRef,
    staging_name: str,
    image_dir: Path | None,
    stop: bool,
    max_wait: float | None,
    codec: Codec,
    mkdir: bool = False,
) -> int:
    """`ccr _node-checkpoint`: dump this node's tasks of ref, report, then commit or roll back."""
    node = slurm.node_name()
    deadline = Deadline.after(max_wait)
    with rt.registry() as db:
        job = db.find_job(ref.job_id)
        steps = (
            []
            if job is None
            else [s for s in job.steps if ckpt._is_live(s) and ref.step_id in (None, s.step_id)]
        )
    if job is None or not steps:
        _emit({"ok": True, "node": node, "tasks": [], "image_dir": None})
        _decision(deadline)
        return 0
    if job.disabled:
        disabled = JobStateError(f"checkpoints of job {ref.job_id} are disabled")
        _emit({"ok": False, "node": node, "error": str(disabled), "code": disabled.exit_code})
        return disabled.exit_code
    try:
        base = prepare_image_dir(image_dir or Path(job.checkpoint_dir), mkdir=mkdir)
        with rt.job_lock(ref.job_id, deadline):
            return _dump_and_decide(rt, ref, steps, base, staging_name, stop, deadline, codec)
    except CcrError as exc:
        _emit({"ok": False, "node": node, "error": str(exc), "code": exit_code_for(exc)})
        return exit_code_for(exc)


def _dump_and_decide(
    rt: Runtime,
    ref: JobRef,
    steps: list[reg.StepRecord],
    base: Path,
    staging_name: str,
    stop: bool,
    deadline: Deadline,
    codec: Codec,
) -> int:
    node = slurm.node_name()
    key = rt.manifest_key(create=True)
    assert key is not None
    criu = rt.criu()
    version = criu.version()
    opts = ckpt.CheckpointOptions(image_dir=base, stop=stop, codec=codec)
    touched: list[reg.StepRecord] = []
    tasks: list[dict[str, Any]] = []
    made: list[Path] = []
    try:
        for step in steps:
            rank = step.rank if step.rank is not None else 0
            rank_dir = base / staging_name
            make_private_dir(rank_dir)  # 0700 at every level, whatever the umask
            if ref.step_id is None:
                rank_dir = rank_dir / str(step.step_id)
                make_private_dir(rank_dir)
            rank_dir = rank_dir / str(rank)
            make_private_dir(rank_dir)
            made.append(rank_dir)
            touched.append(step)
            if stop:
                with rt.registry() as db:
                    if not db.compare_and_set_state(step.id, (reg.RUNNING,), reg.VACATING):
                        raise JobStateError(f"step {step.id} stopped running")
            m = ckpt._dump_step(rt, criu, version, step, rank_dir, opts, deadline, key)
            tasks.append(
                {
                    "step": step.step_id,
                    "rank": rank,
                    "ntasks": step.ntasks,
                    "node": node,
                    "frozen": m.frozen_time,
                    "image_bytes": m.image_bytes,
                    "stored_bytes": m.stored_bytes,
                }
            )
    except BaseException:
        ckpt._resume(rt, touched)
        for path in made:
            discard(path)
        raise
    _emit({"ok": True, "node": node, "tasks": tasks, "image_dir": str(base)})
    decision = _decision(deadline)
    if not decision.startswith("commit "):
        ckpt._resume(rt, touched)
        print(f"ccr: {node}: checkpoint of {ref} rolled back ({decision or 'no decision'})")
        return 0
    if stop:
        ckpt._kill_vacated(rt, touched)
    with rt.registry() as db:
        db.update_job(ref.job_id, last_error=None, last_error_code=0)
        for t in tasks:
            db.add_checkpoint(
                reg.CheckpointRecord(
                    job_id=ref.job_id,
                    step_id=int(t["step"]),
                    path=decision.split(" ", 1)[1],
                    created=time.time(),
                    stored_bytes=int(t["stored_bytes"]),
                    image_bytes=int(t["image_bytes"]),
                    frozen_time=float(t["frozen"]),
                    total_time=0.0,
                )
            )
    return 0


def _emit(report: dict[str, Any]) -> None:
    sys.stdout.write(REPORT + json.dumps(report) + "\n")
    sys.stdout.flush()


def _decision(deadline: Deadline) -> str:
    """The coordinator's line on stdin; "" on EOF or when it does not come in time."""
    limit = time.monotonic() + DECISION_WAIT
    left = deadline.remaining()
    if left is not None:
        limit = min(limit, time.monotonic() + left + 30.0)
    data = b""
    while b"\n" not in data:
        wait = limit - time.monotonic()
        if wait <= 0:
            return ""
        ready, _, _ = select.select([0], [], [], wait)
        if not ready:
            return ""
        chunk = os.read(0, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0].strip()
