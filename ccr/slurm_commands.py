"""ccr's internal per-node commands, run by Slurm steps that ccr itself launches (hidden)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ccr.controller.runtime import Runtime
from ccr.ids import parse_job_ref


def node_checkpoint(
    ref: str = typer.Argument(..., metavar="JOBID[.STEPID]"),
    staging: str = typer.Option(..., "--staging"),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir"),
    stop: bool = typer.Option(False, "--stop"),
    max_wait: Optional[float] = typer.Option(None, "--max-wait"),
    compress: str = typer.Option("zstd:1", "--compress"),
    mkdir: bool = typer.Option(False, "--mkdir"),
    keep: Optional[int] = typer.Option(None, "--keep"),
    tcp_established: bool = typer.Option(False, "--tcp-established"),
) -> None:
    """Dump this node's tasks of a job for `ccr create` (one task per node of an srun step)."""
    from ccr.controller import node_participant  # not for every other command's start-up
    from ccr.engines.compression import parse_codec

    code = node_participant.node_checkpoint(
        Runtime.from_env(),
        parse_job_ref(ref),
        staging,
        image_dir,
        stop,
        max_wait,
        parse_codec(compress),
        mkdir,
        keep,
        tcp_established,
    )
    raise typer.Exit(code)


def restore_rank(
    gen: Path = typer.Argument(..., metavar="CKPT"),
    step: int = typer.Option(..., "--step"),
    stick: bool = typer.Option(False, "--stick"),
    max_wait: Optional[float] = typer.Option(None, "--max-wait"),
) -> None:
    """Restore this task's rank of a multi-node checkpoint and wait for it (under srun)."""
    from ccr.controller import multinode_restart

    code = multinode_restart.restore_rank(Runtime.from_env(), gen, step, stick, max_wait)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the hidden per-node commands to the `ccr` app."""
    app.command("_node-checkpoint", hidden=True)(node_checkpoint)
    app.command("_restore-rank", hidden=True)(restore_rank)
