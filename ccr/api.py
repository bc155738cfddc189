"""ccr's Python API: the CLI's verbs as functions, for submitit, Snakemake or Nextflow users."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccr import config
from ccr.controller import checkpoint as ckpt
from ccr.controller import describe, dispatch, jobs
from ccr.controller import restart as rst
from ccr.controller import run as runner
from ccr.controller import supervisor as sup
from ccr.controller.multinode_restart import SlurmRestart
from ccr.controller.runtime import Runtime
from ccr.ids import JobRef, parse_job_ref
from ccr.slurm_time import parse_slurm_time


def _ref(ref: str | int | JobRef) -> JobRef:
    return ref if isinstance(ref, JobRef) else parse_job_ref(str(ref))


def run(
    command: list[str],
    *,
    job_id: int | None = None,
    step_id: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint: str = "0",
    keep: int = 2,
    compress: str | None = None,
) -> str:
    """Launch a step in the background (like `ccr run --detach`); return "<jobid>.<stepid>"."""
    settings = sup.SupervisorSettings(
        interval=parse_slurm_time(checkpoint),
        keep=keep,
        codec=ckpt.parse_codec(compress) if compress else ckpt.default_codec(),
    )
    req = runner.RunRequest(
        argv=list(command),
        job_id=job_id,
        step_id=step_id,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        detach=True,
        settings=settings,
    )
    started: dict[str, Any] = {}
    runner.run(Runtime.from_env(), req, started.update)
    return str(started["step"])


def create(
    ref: str | int,
    *,
    image_dir: str | Path | None = None,
    max_wait: float | None = None,
    stop: bool = False,
    compress: str | None = None,
    tcp_established: bool = False,
) -> ckpt.CheckpointResult:
    """Checkpoint a job or step (`ccr create`); stop=True vacates it."""
    opts = ckpt.CheckpointOptions(
        image_dir=Path(image_dir) if image_dir else None,
        max_wait=max_wait,
        stop=stop,
        codec=ckpt.parse_codec(compress) if compress else ckpt.default_codec(),
        tcp_established=tcp_established or config.tcp_established_default(),
    )
    return dispatch.create(Runtime.from_env(), _ref(ref), opts)


def restart(
    ref: str | int | Path,
    *,
    image_dir: str | Path | None = None,
    stick_to_nodes: bool = False,
    max_wait: float | None = None,
    rename: bool = False,
    tcp_established: bool = False,
    new_job: bool = False,
) -> list[rst.RestartResult] | SlurmRestart:
    """Restore a job or step from its newest checkpoint, or the checkpoint at a path
    (`ccr restart`): the restored steps; a multi-node checkpoint is handed to Slurm, which
    restores it (requeued, or submitted as a new job with new_job): what Slurm was asked."""
    opts = rst.RestartOptions(
        image_dir=Path(image_dir) if image_dir else None,
        stick_to_nodes=stick_to_nodes,
        max_wait=max_wait,
        rename=rename,
        tcp_established=tcp_established or config.tcp_established_default(),
        new_job=new_job,
    )
    done = dispatch.restart(Runtime.from_env(), ref, opts)
    return done.slurm if done.slurm is not None else done.steps


def status(job_id: int | str) -> dict[str, Any]:
    """What `ccr status --json` prints."""
    return jobs.job_status(Runtime.from_env(), _ref(job_id).job_id)


def cancel(ref: str | int) -> list[str]:
    """Terminate a job's or step's tree (`ccr cancel`)."""
    return jobs.cancel(Runtime.from_env(), _ref(ref))


def show(target: str | Path) -> list[dict[str, Any]]:
    """What `ccr show --json` prints."""
    return describe.show(Runtime.from_env(), str(target))


def verify(checkpoint: str | Path) -> list[Path]:
    """Raise ccr.errors.IntegrityError unless every step (every rank) of the checkpoint, or of
    a job's newest one, verifies; return the image directories verified (`ccr verify`)."""
    return describe.verify(Runtime.from_env(), str(checkpoint))
