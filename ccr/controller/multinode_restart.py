"""Restart a multi-node checkpoint inside Slurm: requeue the same job, or submit a new one.

A multi-node checkpoint is a directory of rank directories per step (`J.ckpt.N/<step>/<rank>/`,
its job.json naming each rank's node; storage.layout reads it): rank_image is the
directory a requeued task resumes from.

Either way every rank is restored by a ccr task of a Slurm step (`srun ccr _restore-rank`, or
the requeued batch script's own `srun ccr run`), which restores its rank's image as its child
and waits for it: scancel, `scontrol listpids` and exit codes work as for any other step.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ccr.controller import placement
from ccr.controller import restart as rst
from ccr.controller import supervisor as sup
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import slurm_cli
from ccr.errors import CcrError, IntegrityError, JobStateError, NotFoundError, UsageError
from ccr.ids import JobRef, StepId
from ccr.storage import layout

RESTARTABLE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL"}


def rank_image(rt: Runtime, step: StepId, image_dir: Path) -> Path | None:
    """The rank directory this task resumes from, if its step's newest checkpoint is a
    multi-node one."""
    task = slurm_cli.TaskEnv.from_env()
    if task.job_id is None or not image_dir.is_dir():
        return None
    try:
        found = layout.newest(image_dir, JobRef(step.job_id, step.step_id), rt.manifest_key(False))
    except NotFoundError:
        return None
    image = found[0]
    if not image.multi_node:
        return None
    rank = task.rank if task.rank is not None else 0
    if image.ntasks != task.ntasks:
        raise JobStateError(
            f"checkpoint {image.path} holds {image.ntasks} tasks but step {step} has "
            f"{task.ntasks}: run it with the same task count (srun -n{image.ntasks})"
        )
    return image.rank_dir(rank)


@dataclass
class SlurmRestart:
    """A multi-node checkpoint handed back to Slurm."""

    source: JobRef
    job_id: int  # the Slurm job that restores it
    mode: str  # "requeued" or "submitted"
    checkpoints: list[Path]
    nodes: list[str] = field(default_factory=list)  # pinned by StickToNodes

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.source.job_id,
            "step_id": self.source.step_id,
            "slurm_job": self.job_id,
            "mode": self.mode,
            "checkpoints": [str(p) for p in self.checkpoints],
            "nodes": self.nodes,
        }

    def describe(self) -> str:
        where = f" on {','.join(self.nodes)}" if self.nodes else ""
        how = "requeued" if self.mode == "requeued" else f"submitted as job {self.job_id}"
        return f"{self.source} {how}{where}, restoring {', '.join(map(str, self.checkpoints))}"


def restart_multi_node(rt: Runtime, ref: JobRef, opts: rst.RestartOptions) -> SlurmRestart:
    """Restart ref's newest multi-node checkpoints through Slurm (controller.dispatch sends
    here a job whose newest checkpoint is one): requeue the job, or submit a new one."""
    image_dir = rt.image_dir(ref.job_id, opts.image_dir).resolve()
    stick, max_wait, new_job = opts.stick_to_nodes, opts.max_wait, opts.new_job
    key = rt.manifest_key(create=False)
    images = [s for s in layout.newest(image_dir, ref, key) if s.multi_node]
    if not images:
        raise UsageError(f"no multi-node checkpoint of {ref} in {image_dir}")
    for image in images:
        for rank in sorted(image.ranks):
            step_image = rst.load_image(rt, image.rank_dir(rank), full=False)
            rst.check_criu_version(rt, step_image)
            _check_tcp_between_nodes(image, step_image)
    if not slurm_cli.available():
        raise CcrError(f"{ref} is a multi-node checkpoint: restarting it needs Slurm (srun)")
    nodes = sorted({n for image in images for n in image.ranks.values()}) if stick else []
    if stick:
        _check_nodes(ref, images)
    info = None if new_job else slurm_cli.job_info(ref.job_id)
    if info is not None:
        _requeue(ref, info, nodes)
        return SlurmRestart(ref, ref.job_id, "requeued", [i.path for i in images], nodes)
    if len(images) > 1:
        steps = ", ".join(str(i.step) for i in images)
        raise UsageError(f"{ref} holds several steps ({steps}): restart them one at a time")
    job_id = _submit(rt, ref, images[0], nodes, max_wait)
    return SlurmRestart(ref, job_id, "submitted", [images[0].path], nodes)


def _check_tcp_between_nodes(image: layout.StepCheckpoint, rank: rst.StepImage) -> None:
    """Refuse what would come back half: TCP between nodes from a job left running.

    CRIU holds a network lock from a dump until the restore only when the dump stopped the
    tree (a vacate).  A checkpoint that left the job running lifted its lock at once, so
    the ranks restored on one node talk to the other node's before those exist, get reset,
    and die ("Unable to detach ...: No such process", measured on a 2-node MPICH job): one
    node's ranks would run on alone.  Such a checkpoint is refused up front.
    """
    nodes = set(image.ranks.values())
    m = rank.manifest
    if len(nodes) > 1 and m.tcp_established and m.leave_running:
        raise JobStateError(
            f"{image.path} was taken with the job left running and holds TCP connections "
            "(--tcp-established) across nodes, which CRIU restores only from a checkpoint "
            "that stopped the job: restart from a vacate or requeue checkpoint "
            f"(ccr create --stop {m.job_id}, ccr checkpoint requeue {m.job_id})"
        )


def _check_nodes(ref: JobRef, images: list[layout.StepCheckpoint]) -> None:
    """StickToNodes: every node a rank was dumped on must be able to run it again."""
    placed = {n: (i.step.step_id, r) for i in images for r, n in sorted(i.ranks.items())}
    states = slurm_cli.node_states(sorted(placed))
    for node, state in sorted(states.items()):
        if not slurm_cli.node_usable(state):
            sid, rank = placed[node]
            raise JobStateError(
                f"StickToNodes: node {node} (rank {rank} of {ref.job_id}.{sid}) is {state}; "
                "cannot restart there (restart without StickToNodes to move the job)"
            )


def _requeue(ref: JobRef, info: dict[str, str], nodes: list[str]) -> None:
    """Same job id: requeue it (its batch script's `ccr run` resumes), release it in 2 s."""
    state = info.get("JobState", "?")
    if state == "RUNNING":
        raise JobStateError(
            f"job {ref.job_id} is still running: vacate it first (ccr checkpoint vacate "
            f"{ref.job_id}) or restore it beside it as a new job (--new-job)"
        )
    if state != "PENDING":
        if state not in RESTARTABLE or info.get("BatchFlag") != "1":
            raise JobStateError(
                f"job {ref.job_id} ({state}) cannot be requeued: restart it as a new job "
                "(--new-job)"
            )
        slurm_cli.requeue(ref.job_id)
        deadline = time.monotonic() + 30
        while (slurm_cli.job_info(ref.job_id) or {}).get("JobState") != "PENDING":
            if time.monotonic() > deadline:
                raise CcrError(f"job {ref.job_id} did not become PENDING after scontrol requeue")
            time.sleep(0.2)
    slurm_cli.release(ref.job_id, nodes)


def _submit(
    rt: Runtime, ref: JobRef, image: layout.StepCheckpoint, nodes: list[str], max_wait: float | None
) -> int:
    """A new job of one task per rank, each restoring its rank (`ccr _restore-rank`)."""
    first = rst.load_image(rt, image.rank_dir(0), full=False).manifest
    n = str(image.ntasks)
    args = ["-N", n, "-n", n, "--ntasks-per-node=1", "-J", f"ccr-restart-{ref.job_id}"]
    args += ["--chdir", first.cwd, "--open-mode=append", "-o", f"ccr-restart-{ref.job_id}-%j.out"]
    if nodes:
        args += [f"--nodelist={','.join(nodes)}"]
    cmd = [*slurm_cli.ccr_command(), "_restore-rank", str(image.generation)]
    cmd += ["--step", str(image.step.step_id)]
    cmd += ["--stick"] if nodes else []
    cmd += ["--max-wait", f"{max_wait:g}"] if max_wait is not None else []
    script = f"#!/bin/bash\nexec srun --kill-on-bad-exit=0 {shlex.join(cmd)}\n"
    return slurm_cli.sbatch(args, script)


def restore_rank(rt: Runtime, gen: Path, step_id: int, stick: bool, max_wait: float | None) -> int:
    """`ccr _restore-rank`: restore this task's rank as our child, supervise it, pass its code."""
    task = slurm_cli.TaskEnv.from_env()
    if task.job_id is None or task.step_id is None or task.rank is None:
        raise UsageError("ccr _restore-rank runs as a task of a Slurm step (srun)")
    found = layout.generation_steps(gen, rt.manifest_key(create=False))
    image = next((i for i in found if i.step.step_id == step_id and i.multi_node), None)
    if image is None:
        raise IntegrityError(f"{gen} holds no multi-node checkpoint of step {step_id}")
    if stick:
        mine = [r for r, n in sorted(image.ranks.items()) if n == task.node]
        if not mine:
            raise JobStateError(f"StickToNodes: no rank of step {step_id} was on {task.node}")
        rank = mine[0]
    else:
        rank = task.rank
    if task.ntasks != image.ntasks or rank not in image.ranks:
        raise JobStateError(f"{gen} holds {image.ntasks} ranks; this step has {task.ntasks}")
    loaded = rst.load_image(rt, image.rank_dir(rank), full=False)
    new = StepId(task.job_id, task.step_id)
    moved = rst.StepImage(
        loaded.path, replace(loaded.manifest, job_id=new.job_id, step_id=new.step_id)
    )
    # The checks of every other restore: owner and uid, CRIU version, GPU, a live step of
    # that id, the working directory, the files it writes (StickToNodes is by rank, above).
    rst.preflight(rt, moved, stick_to_nodes=False)
    image_dir = gen.parent
    with rt.registry() as db:
        db.ensure_job(new.job_id, str(image_dir), checkpoint_dir=str(image_dir))
        db.bump_restart_count(new.job_id)
    settings = placement.task_settings(sup.SupervisorSettings())
    supervisor = sup.Supervisor(rt, new, settings)
    result = rst.restore_into(rt, supervisor, moved, Deadline.after(max_wait))
    placement.record_task(rt, new, rank=rank, ntasks=image.ntasks)
    print(
        f"ccr: rank {rank} of {loaded.step} restored on {task.node} as {new} (pid {result.pid})",
        file=sys.stderr,
    )
    return supervisor.wait()
