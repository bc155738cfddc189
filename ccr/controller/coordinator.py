"""Multi-node checkpoints through Slurm: fan out as an overlapping step, publish all-or-nothing.

`ccr create J` of a job on several nodes runs `srun --jobid=J --overlap` with one ccr per node
(`ccr _node-checkpoint`, controller/node_participant.py).  Each dumps the ccr tasks of its
node into a shared hidden staging directory (`.<name>.dist-*/[<stepid>/]<rank>/`), reports on
stdout and waits for the decision on stdin (srun --input=all): `commit <path>` once every node
succeeded and the generation is published, `abort <code> <why>` otherwise (and anything else,
EOF or a timeout, rolls back too), so no task stays stopped and nothing partial is ever
visible.  With --stop the tasks are dumped stopped everywhere and killed only after the
publish (two phases).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ccr.controller import checkpoint as ckpt
from ccr.controller.node_participant import REPORT, abort_line
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import slurm_cli
from ccr.errors import (
    CcrError,
    JobStateError,
    MaxWaitExceeded,
    PermissionDeniedError,
    error_for_code,
)
from ccr.ids import (
    JobRef,
    checkpoint_name,
)
from ccr.storage.imageset import (
    CheckpointSeries,
    discard,
)
from ccr.storage.manifest import JOB_MANIFEST, JobManifest, write_signed


def distributed(rt: Runtime, ref: JobRef) -> bool:
    """Whether `ccr create ref` must fan out through Slurm rather than dump local steps."""
    with rt.registry() as db:
        job = db.find_job(ref.job_id)
    if job is not None:
        steps = [s for s in job.steps if ref.step_id in (None, s.step_id)]
        live = [s for s in steps if ckpt.is_live(s)]
        if any(s.ntasks > 1 or s.nnodes > 1 for s in live):
            return True
        if live:
            return False
    info = slurm_cli.job_info(ref.job_id)
    return info is not None and info.get("JobState") == "RUNNING"


def requeue_if_slurm(ref: JobRef) -> bool:
    """After a vacate: `scontrol requeue` the job if it is a Slurm batch job (else nothing)."""
    info = slurm_cli.job_info(ref.job_id)
    if info is None or info.get("BatchFlag") != "1":
        return False
    slurm_cli.requeue(ref.job_id)
    return True


@dataclass
class _Round:
    """What the nodes said during one distributed checkpoint."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def _pump(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


class Launcher(Protocol):
    """Starts one `ccr _node-checkpoint` per node (slurm_cli.srun_overlap; a fake in tests)."""

    def __call__(self, job_id: int, nodes: list[str], command: list[str]) -> Any: ...


def create(
    rt: Runtime,
    ref: JobRef,
    opts: ckpt.CheckpointOptions,
    *,
    nodes_of: Callable[[int], list[str]] = slurm_cli.running_nodes,
    launch: Launcher = slurm_cli.srun_overlap,
) -> ckpt.CheckpointResult:
    """Checkpoint every task of a Slurm job on every node; publish only if all succeeded.

    nodes_of and launch are Slurm's (the job's nodes, an overlapping step); the process
    launch returns is read like srun's: node reports on stdout, the decision on stdin.
    """
    started = time.monotonic()
    deadline = Deadline.after(opts.max_wait)
    nodes = nodes_of(ref.job_id)
    name = checkpoint_name(ref)
    staging_name = f".{name}.dist-{os.getpid()}-{secrets.token_hex(4)}"
    cmd = [*slurm_cli.ccr_command(), "_node-checkpoint", str(ref), "--staging", staging_name]
    cmd += ["--compress", opts.codec.spec] + (["--stop"] if opts.stop else [])
    cmd += ["--mkdir"] if opts.mkdir else []
    cmd += ["--tcp-established"] if opts.tcp_established else []
    cmd += ["--keep", str(opts.keep)] if opts.keep is not None else []
    if opts.image_dir is not None:
        cmd += ["--image-dir", str(opts.image_dir.resolve())]
    if opts.max_wait is not None:
        cmd += ["--max-wait", f"{opts.max_wait:g}"]
    proc = launch(ref.job_id, nodes, cmd)
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
        problem = _problem(ref, rnd, nodes, timed_out, deadline)
        if problem is None:
            image_dir = Path(next(r["image_dir"] for r in rnd.reports if r.get("tasks")))
            staging = image_dir / staging_name
            published = _publish(rt, ref, image_dir, staging, name, rnd, started)
    except BaseException as exc:
        _finish(proc, abort_line(exc), lines, rnd, err_thread)
        if staging is not None and published is None:
            discard(staging)
        raise
    decision = f"commit {published}" if published else abort_line(problem or CcrError("?"))
    _finish(proc, decision, lines, rnd, err_thread)
    if published is None:
        # Nodes that never answered (MaxWait) may still have made the staging directory.
        dirs = {Path(r["image_dir"]) for r in rnd.reports if r.get("image_dir")}
        dirs.add(rt.image_dir(ref.job_id, opts.image_dir).resolve())
        for image_dir in dirs:
            discard(image_dir / staging_name)
        assert problem is not None
        raise problem
    # Each node prunes the series to the job's keep when it commits (run_checkpoint).
    series = CheckpointSeries(published.parent, name)
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
    lines: queue.Queue[str | None], rnd: _Round, expected: int, deadline: Deadline
) -> bool:
    """Read node reports until every node answered or srun ended; True on MaxWait expiry."""
    while len(rnd.reports) < expected:
        wait = deadline.remaining()
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
    ref: JobRef, rnd: _Round, nodes: list[str], timed_out: bool, deadline: Deadline
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
            f"checkpoint of {ref} abandoned after {deadline} "
            f"(no answer from {', '.join(missing) or 'srun'}){tail}"
        )
    if len(rnd.reports) < len(nodes):
        missing = sorted(set(nodes) - {r["node"] for r in rnd.reports})
        last = rnd.stderr[-1].strip() if rnd.stderr else "srun ended"
        refused = [line.strip() for line in rnd.stderr if slurm_cli.ACCESS_DENIED in line]
        if refused:  # the job is not the caller's: Slurm itself said no to her srun
            return PermissionDeniedError(f"checkpoint of {ref}: Slurm refused: {refused[-1]}")
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
