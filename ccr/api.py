"""ccr's Python API: the CLI's verbs as functions, for submitit, Snakemake or Nextflow users.

One face with the CLI: where the CLI goes through the node service (a user other than root,
or root with CCR_SOCKET naming a live one), so does each function here, running the same
command line with `--json` and handing back the same objects (errors: the CcrError
subclass of the exit code, with the CLI's message).
"""

from __future__ import annotations

import json
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
from ccr.errors import error_for_code
from ccr.ids import JobRef, StepId, parse_job_ref
from ccr.slurm_time import parse_slurm_time


def _ref(ref: str | int | JobRef) -> JobRef:
    return ref if isinstance(ref, JobRef) else parse_job_ref(str(ref))


def _options(**values: object) -> list[str]:
    """CLI options from keyword values: None is left out, True is a bare flag, False none."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _served(command: str, *args: str) -> Any:
    """`ccr COMMAND --json ARGS` through the node service when the CLI would use it: its
    JSON; else None (the caller goes on in-process)."""
    from ccr.service import client

    argv = [command, "--json", *args]
    if not client.wants_service(argv):
        return None
    code, out, err = client.call_captured(argv)
    if code != 0:
        try:
            message = json.loads(err.strip().splitlines()[-1])["error"]
        except (ValueError, KeyError, IndexError, TypeError):
            message = err.strip() or f"ccr {command} exited {code}"
        raise error_for_code(code, message)
    return json.loads(out)


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
    opts = _options(
        detach=True,
        job_id=job_id,
        step_id=step_id,
        checkpoint_dir=checkpoint_dir,
        checkpoint=checkpoint,
        keep=keep,
        compress=compress,
    )
    data = _served("run", *opts, "--", *command)
    if data is not None:
        return str(data["step"])
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
    served = _options(
        image_dir=image_dir,
        max_wait=max_wait,
        stop=stop,
        compress=compress,
        tcp_established=tcp_established,
    )
    data = _served("create", *served, str(ref))
    if data is not None:
        return ckpt.CheckpointResult(
            ref=JobRef(data["job_id"], data["step_id"]),
            path=Path(data["path"]),
            link=Path(data["link"]),
            steps=list(data["steps"]),
            frozen_time=float(data["frozen_time"]),
            total_time=float(data["total_time"]),
            image_bytes=int(data["image_bytes"]),
            stored_bytes=int(data["stored_bytes"]),
        )
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
    lazy: bool | None = None,
) -> list[rst.RestartResult] | SlurmRestart:
    """Restore a job or step from its newest checkpoint, or the checkpoint at a path
    (`ccr restart`): the restored steps; a multi-node checkpoint is handed to Slurm, which
    restores it (requeued, or submitted as a new job with new_job): what Slurm was asked.

    lazy (None: CCR_RESTART_LAZY): the steps run before their memory is in (`--lazy`);
    this returns once it is all in, fill_time set."""
    served = _options(
        image_dir=image_dir,
        stick_to_nodes=stick_to_nodes,
        max_wait=max_wait,
        rename=rename,
        tcp_established=tcp_established,
        new_job=new_job,
    ) + ([] if lazy is None else ["--lazy" if lazy else "--eager"])
    data = _served("restart", *served, str(ref))
    if data is not None:
        if data["mode"] in ("requeued", "submitted"):
            return SlurmRestart(
                source=JobRef(data["job_id"], data["step_id"]),
                job_id=int(data["slurm_job"]),
                mode=data["mode"],
                checkpoints=[Path(c) for c in data["checkpoints"]],
                nodes=list(data["nodes"]),
            )
        return [
            rst.RestartResult.from_message(
                r, StepId(r["job_id"], r["step_id"]), Path(r["checkpoint"])
            )
            for r in data["steps"]
        ]
    opts = rst.RestartOptions(
        image_dir=Path(image_dir) if image_dir else None,
        stick_to_nodes=stick_to_nodes,
        max_wait=max_wait,
        rename=rename,
        tcp_established=tcp_established or config.tcp_established_default(),
        new_job=new_job,
        lazy=config.restart_lazy_default() if lazy is None else lazy,
    )
    done = dispatch.restart(Runtime.from_env(), ref, opts)
    rst.wait_filled(done.steps)
    return done.slurm if done.slurm is not None else done.steps


def status(job_id: int | str) -> dict[str, Any]:
    """What `ccr status --json` prints."""
    data = _served("status", str(job_id))
    if data is not None:
        return dict(data)
    return jobs.job_status(Runtime.from_env(), _ref(job_id).job_id)


def cancel(ref: str | int) -> list[str]:
    """Terminate a job's or step's tree (`ccr cancel`)."""
    data = _served("cancel", str(ref))
    if data is not None:
        return [str(s["step"]) for s in data["cancelled"]]
    return jobs.cancel(Runtime.from_env(), _ref(ref))


def show(target: str | Path) -> list[dict[str, Any]]:
    """What `ccr show --json` prints."""
    data = _served("show", str(target))
    if data is not None:
        return list(data["checkpoints"])
    return describe.show(Runtime.from_env(), str(target))


def verify(checkpoint: str | Path) -> list[Path]:
    """Raise ccr.errors.IntegrityError unless every step (every rank) of the checkpoint, or of
    a job's newest one, verifies; return the image directories verified (`ccr verify`)."""
    data = _served("verify", str(checkpoint))
    if data is not None:
        return [Path(d) for d in data["steps"]]
    return describe.verify(Runtime.from_env(), str(checkpoint))
