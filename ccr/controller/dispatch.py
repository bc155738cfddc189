"""create and restart, dispatched once for both faces of ccr (the CLI prints what these
return, `ccr.api` returns it): a job on this node is checkpointed and restored here, a job on
several nodes through Slurm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr.controller import checkpoint as ckpt
from ccr.controller import coordinator, multinode_restart
from ccr.controller import restart as rst
from ccr.controller.multinode_restart import SlurmRestart
from ccr.controller.restart import RestartOptions, RestartResult
from ccr.controller.runtime import Runtime
from ccr.errors import NotFoundError, UsageError
from ccr.ids import JobRef, parse_job_ref
from ccr.storage import layout

__all__ = ["RestartOptions", "Restarted", "create", "restart"]

# Restarts a job's multi-node checkpoint through Slurm (multinode_restart.restart_multi_node;
# tests pass another, so that no job reaches a real cluster).
MultiNodeRestart = Callable[[Runtime, JobRef, RestartOptions], SlurmRestart]


def create(rt: Runtime, ref: JobRef, opts: ckpt.CheckpointOptions) -> ckpt.CheckpointResult:
    """`ccr create`: through Slurm for a Slurm job not (only) on this node, else locally."""
    if coordinator.distributed(rt, ref):
        return coordinator.create(rt, ref, opts)
    return ckpt.create(rt, ref, opts)


@dataclass
class Restarted:
    """What a restart did: steps restored here (`local`), or a multi-node checkpoint handed
    to Slurm (`requeued`, `submitted`)."""

    ref: JobRef
    mode: str
    steps: list[RestartResult] = field(default_factory=list)
    slurm: SlurmRestart | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"job_id": self.ref.job_id, "step_id": self.ref.step_id}
        data.update(mode=self.mode, steps=[r.to_dict() for r in self.steps])
        if self.slurm is not None:
            data.update(self.slurm.to_dict())
        return data

    def describe(self) -> str:
        if self.slurm is not None:
            return self.slurm.describe()
        return "\n".join(
            f"{r.step} restarted from {r.checkpoint} (pid {r.pid}, {r.restore_time:.2f}s"
            + (", lazily" if r.lazy else "")
            + (f", of which unpacking {r.unpack_time:.2f}s)" if r.unpack_time else ")")
            for r in self.steps
        )


def target_of(target: str | int | JobRef | Path) -> JobRef | Path:
    """What `ccr restart TARGET` names: a job or step (`42`, `42.0`), or a checkpoint path."""
    if isinstance(target, (JobRef, Path)):
        return target
    path = rst.checkpoint_path(str(target))
    return path if path is not None else parse_job_ref(str(target))


def restart(
    rt: Runtime,
    target: str | int | JobRef | Path,
    opts: RestartOptions,
    multi_node: MultiNodeRestart | None = None,
) -> Restarted:
    """`ccr restart`: the checkpoint at a path, or a job's (step's) newest checkpoints,
    restored here; a job whose newest checkpoint is a multi-node one goes to Slurm."""
    named = target_of(target)
    if isinstance(named, Path):
        if opts.image_dir is not None or opts.new_job or opts.rename:
            raise UsageError("restart CKPT takes no --image-dir, --new-job or --rename")
        ref = rst.ref_of_path(named)
        return Restarted(ref, "local", rst.restart_path(rt, named, opts))
    ref = named
    image_dir = rt.image_dir(ref.job_id, opts.image_dir)
    try:
        with rst.nothing_restored_if_interrupted():
            steps = layout.newest(image_dir, ref, rt.manifest_key(create=False))
    except NotFoundError:
        steps = []  # rst.restart says what the directory holds instead
    if any(s.multi_node for s in steps):
        handed = (multi_node or multinode_restart.restart_multi_node)(rt, ref, opts)
        return Restarted(ref, handed.mode, slurm=handed)
    if opts.new_job:
        raise UsageError(f"--new-job: no multi-node checkpoint of {ref} in {image_dir}")
    return Restarted(ref, "local", rst.restart(rt, ref, opts))
