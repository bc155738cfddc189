"""Where a task of a Slurm step puts things: its environment, settings and output files.

What `ccr run` (and a restored rank) does differently as one task of a Slurm step: the
exports a fresh task gets, no self-checkpoints for a task of a multi-task step, Slurm's
filename patterns for -o/-e, and the rank/node record a multi-node checkpoint finds it by.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import replace
from pathlib import Path

from ccr import config, identity
from ccr.controller import supervisor as sup
from ccr.controller.runtime import Runtime
from ccr.engines import slurm_cli
from ccr.errors import (
    StorageError,
    UsageError,
)
from ccr.ids import (
    FileContext,
    StepId,
    expand_filename_pattern,
    output_name,
)


def task_exports(rt: Runtime, step: StepId, image_dir: Path) -> dict[str, str]:
    """What a freshly launched task gets in its environment (restored ones keep their own)."""
    out = {"SLURM_CHECKPOINT_IMAGE_DIR": str(image_dir)}
    if slurm_cli.TaskEnv.from_env().restart_count is None:
        with rt.registry() as db:
            job = db.find_job(step.job_id)
        out["SLURM_RESTART_COUNT"] = str(job.restart_count if job else 0)
    return out


def task_settings(settings: sup.SupervisorSettings) -> sup.SupervisorSettings:
    """A task of a multi-task step must not checkpoint itself alone: `ccr create J` does it."""
    if not slurm_cli.TaskEnv.from_env().multi:
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
    task = slurm_cli.TaskEnv.from_env()
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
    task = slurm_cli.TaskEnv.from_env()
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
    task = slurm_cli.TaskEnv.from_env()

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
    task = slurm_cli.TaskEnv.from_env()
    rank = task.rank if rank is None else rank
    if rank is None:
        return
    with rt.registry() as db:
        db.update_step(
            step, rank=rank, node=task.node, ntasks=ntasks or task.ntasks, nnodes=task.nnodes
        )
