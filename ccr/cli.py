"""The `ccr` command line: parses arguments, calls the controller, prints results."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import typer

try:  # typer >= 0.2x vendors click; older ones depend on it
    from typer import _click as click  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

from ccr import __version__, config, entrypoint, interrupts, progress, timestamps
from ccr.controller.runtime import Runtime
from ccr.entrypoint import report_failure
from ccr.errors import CcrError, CriuError, JobStateError, UsageError, exit_code_for
from ccr.ids import JobRef, parse_job_ref
from ccr.lazy import lazy_module
from ccr.slurm_commands import register as register_slurm_commands
from ccr.slurm_time import format_seconds, parse_slurm_time

if TYPE_CHECKING:
    from ccr.controller import checkpoint as ckpt
    from ccr.controller import convert, coordinator, describe, dispatch, doctor, jobs
    from ccr.controller import restart as rst
    from ccr.controller import run as runner
    from ccr.controller import supervisor as sup
    from ccr.engines.compression import Codec
    from ccr.storage import layout
else:
    # A read-only command (list, status, checkpoint able/error, --help, --version) must not
    # pay for what it does not use: the controller pulls in CRIU's protobufs (pycriu),
    # psutil, zstandard and blake3, which cost more than the command itself (issue 16:
    # `import ccr.cli` took 0.35 s of `ccr list`'s 0.9 s).  Each module loads on first use.
    ckpt = lazy_module("ccr.controller.checkpoint")
    convert = lazy_module("ccr.controller.convert")
    doctor = lazy_module("ccr.controller.doctor")
    describe = lazy_module("ccr.controller.describe")
    dispatch = lazy_module("ccr.controller.dispatch")
    jobs = lazy_module("ccr.controller.jobs")
    rst = lazy_module("ccr.controller.restart")
    runner = lazy_module("ccr.controller.run")
    coordinator = lazy_module("ccr.controller.coordinator")
    sup = lazy_module("ccr.controller.supervisor")
    layout = lazy_module("ccr.storage.layout")

T = TypeVar("T")

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Transparent checkpoint/restart of batch job steps with CRIU (scontrol checkpoint, back).",
)
checkpoint_app = typer.Typer(no_args_is_help=True, help="scontrol's `checkpoint` verbs.")

JSON_OPT = typer.Option(False, "--json", help="Print machine-readable JSON.")
MKDIR_HELP = "Also create the directory's missing parents (default: only a new last one)."
COMPRESS_HELP = "Image codec: zstd[:LEVEL] (default zstd:1) or none; env CCR_COMPRESS."
TCP_HELP = (
    "Also checkpoint TCP connections to peers outside the step (they must be there, at the "
    "same address, at restart); env CCR_TCP_ESTABLISHED=1.  Connections inside the step are "
    "always checkpointed."
)


def _tcp(flag: bool) -> bool:
    return flag or config.tcp_established_default()


def _codec(text: Optional[str]) -> Codec:
    return ckpt.parse_codec(text) if text is not None else ckpt.default_codec()


class Verbosity:
    """-q / -v, set once by the app callback."""

    level = 0


def _emit(data: Any, as_json: bool, text: str, detail: str = "") -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    elif Verbosity.level >= 0:
        print(text)
        if detail and Verbosity.level > 0:
            print(detail)


def _progress_bar(console: Any = None) -> Any:
    """A rich progress bar on stderr when it is a terminal (or on console); None otherwise."""
    if console is None and (Verbosity.level < 0 or not sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    # A phase without a byte count (CRIU restoring) shows its spinner and name alone.
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[bytes]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=True,
    )
    tasks: dict[int, Any] = {}

    def listen(task_id: int, description: str, done: int, total: int) -> None:
        if task_id not in tasks:
            size = progress.mib_fraction(max(done, 0), total) if total else ""
            tasks[task_id] = bar.add_task(description, total=total or None, bytes=size, speed="")
        if done < 0:
            bar.update(tasks[task_id], completed=total or 0, visible=False)
        else:
            bar.update(tasks[task_id], completed=done)
            if total:
                task = bar.tasks[tasks[task_id]]
                bar.update(
                    tasks[task_id],
                    bytes=progress.mib_fraction(done, total),
                    speed=progress.mib_rate(task.speed),
                )

    progress.set_listener(listen)
    return bar


def _showing_progress(call: Callable[[], T]) -> T:
    """call(), with a progress bar on a terminal while it runs."""
    bar = _progress_bar()
    if bar is None:
        return call()
    with bar:
        return call()


def _print_version(value: bool) -> None:
    if value:
        print(f"ccr {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Say more (CRIU logs, stats); also after the command."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print only errors (and --json); also after the command."
    ),
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print ccr's version and exit (`ccr version` adds CRIU's).",
    ),
) -> None:
    """Transparent checkpoint/restart of batch job steps with CRIU."""
    Verbosity.level = -1 if quiet else (1 if verbose else 0)


F = TypeVar("F", bound=Callable[..., Any])


def _interruptible(func: F) -> F:
    """Ctrl-C / SIGTERM raise Interrupted in func, which rolls back; main says the outcome."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        interrupts.install()
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _InterruptedCommand(exc) from None

    return wrapper  # type: ignore[return-value]


def _signal_number(text: str) -> int:
    name = text.strip().upper()
    if name.startswith("B:"):
        name = name[2:]
    name = name.split("@", 1)[0]
    if name.isdigit():
        num = int(name)
    else:
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            num = int(signal.Signals[name])
        except KeyError:
            raise UsageError(f"unknown signal {text!r}") from None
    if num in (signal.SIGKILL, signal.SIGSTOP) or not 0 < num < signal.NSIG:
        raise UsageError(f"signal {text!r} cannot be caught")
    return num


def _interval(text: Optional[str]) -> int:
    return 0 if text is None else parse_slurm_time(text)


def _max_wait(value: Optional[float]) -> Optional[float]:
    if value is not None and value <= 0:
        raise UsageError("MaxWait must be a positive number of seconds")
    return value


def _ref(text: str) -> JobRef:
    return parse_job_ref(text)


@app.command(context_settings={"allow_interspersed_args": False})
@_interruptible
def run(
    command: list[str] = typer.Argument(..., help="The command to run, after `--`."),
    job_id: Optional[int] = typer.Option(
        None, "--job-id", min=0, help="Job id (default: SLURM_JOB_ID, else a new one)."
    ),
    step_id: Optional[int] = typer.Option(
        None, "--step-id", min=0, help="Step id (default: SLURM_STEP_ID, else the next free one)."
    ),
    checkpoint_dir: Optional[Path] = typer.Option(
        None,
        "--checkpoint-dir",
        envvar=["SLURM_CHECKPOINT_DIR", "SBATCH_CHECKPOINT_DIR"],
        help="Where checkpoints go (default: the current directory).",
    ),
    checkpoint: Optional[str] = typer.Option(
        None,
        "--checkpoint",
        envvar=["SLURM_CHECKPOINT", "SBATCH_CHECKPOINT"],
        help="Checkpoint interval in a Slurm time format: a bare number is minutes (10 = 10 min);"
        " M:S, H:M:S, D-H, D-H:M, D-H:M:S (0:30 = 30 s); 0: none.",
    ),
    keep: int = typer.Option(
        2, "--keep", min=1, help="Complete checkpoint generations to keep per step."
    ),
    restart_dir: Optional[Path] = typer.Option(
        None,
        "--restart-dir",
        envvar="SLURM_RESTART_DIR",
        help="Resume from the checkpoint in this directory instead of starting fresh.",
    ),
    output: Optional[str] = typer.Option(
        None,
        "--output",
        "-o",
        help="The step's stdout (and stderr without -e) file, appended to; Slurm's patterns "
        "%j %J %s %N %n %t %u %x %A %a %%; `-` keeps it in the state dir (default: "
        "ccr-<jobid>.<stepid>.out). A foreground run also shows it.",
    ),
    error: Optional[str] = typer.Option(
        None,
        "--error",
        "-e",
        help="The step's stderr file (patterns as -o; `-`: state dir); default: with stdout.",
    ),
    signal_name: str = typer.Option(
        "TERM",
        "--signal",
        help="Signal meaning 'checkpoint, then terminate' (USR1 for sbatch --signal=B:USR1@120).",
    ),
    grace: Optional[float] = typer.Option(
        None, "--grace", help="MaxWait, in seconds, for the checkpoint taken on that signal."
    ),
    max_wait: Optional[float] = typer.Option(
        None, "--max-wait", help="MaxWait for interval checkpoints and resume, in seconds."
    ),
    detach: bool = typer.Option(
        False,
        "--detach",
        help="Return at once, printing <jobid>.<stepid>; a background supervisor stays.",
    ),
    compress: Optional[str] = typer.Option(None, "--compress", help=COMPRESS_HELP),
    mkdir: bool = typer.Option(False, "--mkdir", help=MKDIR_HELP),
    no_checkpoint_check: bool = typer.Option(
        False,
        "--no-checkpoint-check",
        help="Start the step even if CRIU or pycriu is missing (it cannot be checkpointed).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object: at once with --detach, else when the step exits.",
    ),
    private_tmp: bool = typer.Option(
        True,
        "--private-tmp/--no-private-tmp",
        help="Give the step a /tmp of its own, checkpointed with it (default), or the node's.",
    ),
    tcp_established: bool = typer.Option(False, "--tcp-established", help=TCP_HELP),
) -> None:
    """Launch a job step that ccr can checkpoint; supervise it until it exits.

    Example: ccr run --job-id 42 --checkpoint 0:30 -- python train.py
    """
    rt = Runtime.from_env()
    if not no_checkpoint_check:
        doctor.require_checkpointing(rt.state_dir)
    preempt = {_signal_number(signal_name), signal.SIGTERM}
    settings = sup.SupervisorSettings(
        interval=_interval(checkpoint),
        keep=keep,
        preempt_signals=tuple(sorted(preempt)),
        grace=_max_wait(grace),
        max_wait=_max_wait(max_wait),
        codec=_codec(compress),
        private_tmp=private_tmp,
        tcp_established=_tcp(tcp_established),
    )
    req = runner.RunRequest(
        argv=command,
        job_id=job_id,
        step_id=step_id,
        checkpoint_dir=checkpoint_dir,
        output=output,
        error=error,
        restart_dir=restart_dir,
        detach=detach,
        settings=settings,
        mkdir=mkdir,
    )

    started: dict[str, Any] = {}

    def announce(message: dict[str, Any]) -> None:
        started.update(_run_json(message, detach))
        if detach:
            print(json.dumps(started) if as_json else message["step"])
        elif Verbosity.level >= 0:
            where = f", output {message['output']}" if "output" in message else ""
            print(
                f"ccr: step {message['step']} running (pid {message['pid']}{where})",
                file=sys.stderr,
            )

    code = runner.run(rt, req, announce)
    if as_json and not detach:
        # One line, so that it can be told apart from what the step itself printed.
        print(json.dumps({**started, "exit_code": code}))
    raise typer.Exit(code)


def _run_json(message: dict[str, Any], detach: bool) -> dict[str, Any]:
    """`ccr run --json`'s object from the supervisor's start report."""
    job, _, step = str(message["step"]).partition(".")
    return {
        "step": message["step"],
        "job_id": int(job),
        "step_id": int(step),
        "pid": message.get("pid"),
        "supervisor_pid": message.get("supervisor_pid"),
        "output": message.get("output"),
        "resumed": message.get("resumed"),
        "detached": detach,
        "exit_code": None,
    }


@_interruptible
def _create(
    ref_text: str,
    image_dir: Optional[Path],
    max_wait: Optional[float],
    stop: bool,
    as_json: bool,
    compress: Optional[str] = None,
    mkdir: bool = False,
    tcp_established: bool = False,
) -> None:
    ref = _ref(ref_text)
    opts = ckpt.CheckpointOptions(
        image_dir=image_dir,
        max_wait=_max_wait(max_wait),
        stop=stop,
        codec=_codec(compress),
        mkdir=mkdir,
        tcp_established=_tcp(tcp_established),
    )
    result = _showing_progress(lambda: dispatch.create(Runtime.from_env(), ref, opts))
    verb = "vacated" if stop else "checkpointed"
    details = [
        f"  step {m.job_id}.{m.step_id}: {m.stats.get('pages_written', 0)} pages written, "
        f"memdump {m.stats.get('memdump_time', 0):.3f}s, CRIU log {m.stats.get('criu_log')}"
        for m in result.manifests
    ]
    _emit(
        result.to_dict(),
        as_json,
        f"{ref} {verb}: {result.link} -> {result.path.name} "
        f"({result.image_bytes / 2**20:.1f} MiB raw, {result.stored_bytes / 2**20:.1f} MiB stored, "
        f"frozen {result.frozen_time:.2f}s, total {result.total_time:.2f}s)",
        "\n".join(details),
    )
    _raise_if_interrupted(f"{ref} was already {verb} ({result.link})")


def _raise_if_interrupted(outcome: str) -> None:
    """A Ctrl-C that came past the point of no return: the work is done; say so, exit 130."""
    signum = interrupts.pending()
    if signum is not None:
        raise interrupts.Interrupted(signum, [f"interrupted: {outcome}"])


@app.command()
def create(
    ref: str = typer.Argument(..., metavar="JOBID[.STEPID]"),
    image_dir: Optional[Path] = typer.Option(
        None, "--image-dir", help="ImageDir (default: the job's checkpoint dir)."
    ),
    max_wait: Optional[float] = typer.Option(
        None, "--max-wait", help="Abandon the checkpoint after this many seconds."
    ),
    leave_running: bool = typer.Option(
        True,
        "--leave-running/--stop",
        help="Keep the job running (default) or terminate it after the checkpoint.",
    ),
    compress: Optional[str] = typer.Option(None, "--compress", help=COMPRESS_HELP),
    mkdir: bool = typer.Option(False, "--mkdir", help=MKDIR_HELP),
    tcp_established: bool = typer.Option(False, "--tcp-established", help=TCP_HELP),
    as_json: bool = JSON_OPT,
) -> None:
    """Checkpoint every live step of a job, or one step (scontrol checkpoint create).

    Example: ccr create 42.0 --image-dir /scratch/ckpt --max-wait 60
    """
    _create(ref, image_dir, max_wait, not leave_running, as_json, compress, mkdir, tcp_established)


@_interruptible
def _restart(
    target: str,
    image_dir: Optional[Path],
    stick: bool,
    max_wait: Optional[float],
    as_json: bool,
    check: bool = False,
    new_job: bool = False,
    rename: bool = False,
    tcp_established: bool = False,
    lazy: Optional[bool] = None,
) -> None:
    if check:
        path = rst.checkpoint_path(target)
        checks = describe.restart_check(Runtime.from_env(), path or _ref(target), image_dir, stick)
        ok = all(c.ok for c in checks)
        lines = [f"{'ok ' if c.ok else 'NO '} {c.name}: {c.detail}" for c in checks]
        lines.append(f"restart of {target}: {'possible' if ok else 'blocked'}")
        ref = rst.ref_of_path(path) if path is not None else _ref(target)
        data = _restart_json(ref, "check", ok=ok, checks=[c.to_dict() for c in checks])
        _emit(data, as_json, "\n".join(lines))
        raise typer.Exit(0 if ok else JobStateError.exit_code)
    opts = rst.RestartOptions(
        image_dir=image_dir,
        stick_to_nodes=stick,
        max_wait=_max_wait(max_wait),
        rename=rename,
        tcp_established=_tcp(tcp_established),
        new_job=new_job,
        lazy=config.restart_lazy_default() if lazy is None else lazy,
    )
    done = _showing_progress(lambda: dispatch.restart(Runtime.from_env(), target, opts))
    if any(r.lazy for r in done.steps):
        # The steps run; the command returns once their memory is all in (or says why not).
        if not as_json:
            print(done.describe(), flush=True)
        rst.wait_filled(done.steps)
        lines = [f"{r.step}: memory filled in {r.fill_time:.2f}s" for r in done.steps if r.lazy]
        _emit(done.to_dict(), as_json, "\n".join(lines))
        return
    _emit(done.to_dict(), as_json, done.describe())


def _restart_json(ref: JobRef, mode: str, **fields: Any) -> dict[str, Any]:
    """restart's one shape: mode is local, check, requeued or submitted (multi-node)."""
    return {"job_id": ref.job_id, "step_id": ref.step_id, "mode": mode, "steps": [], **fields}


@app.command()
def restart(
    ref: str = typer.Argument(..., metavar="JOBID[.STEPID]|CKPT"),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="ImageDir to restore from."),
    stick_to_nodes: bool = typer.Option(
        False,
        "--stick-to-nodes",
        help="Refuse unless this is the node the checkpoint was taken on.",
    ),
    max_wait: Optional[float] = typer.Option(
        None, "--max-wait", help="Abandon the restore after this many seconds."
    ),
    check: bool = typer.Option(
        False, "--check", help="Change nothing: say what would block a restart."
    ),
    new_job: bool = typer.Option(
        False, "--new-job", help="Multi-node checkpoint: submit a new job instead of requeueing."
    ),
    rename: bool = typer.Option(
        False,
        "--rename",
        help="Restore a checkpoint whose manifest names another job (a renamed copy) as JOBID.",
    ),
    tcp_established: bool = typer.Option(False, "--tcp-established", help=TCP_HELP),
    lazy: Optional[bool] = typer.Option(
        None,
        "--lazy/--eager",
        help="Lazy: the job runs at once, its memory brought in on demand and in the "
        "background (env CCR_RESTART_LAZY=1 makes it the default).",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Restore a job or step from its newest checkpoint (scontrol checkpoint restart), or the
    checkpoint at a path (a .ckpt link, a generation, or a step directory in one).

    Example: ccr restart 42 --image-dir /scratch/ckpt    or    ccr restart /scratch/ckpt/42.ckpt
    """
    _restart(
        ref,
        image_dir,
        stick_to_nodes,
        max_wait,
        as_json,
        check,
        new_job,
        rename,
        tcp_established,
        lazy,
    )


@app.command()
def show(
    target: str = typer.Argument(..., metavar="CKPT|JOBID[.STEPID]"),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Where to look for JOBID."),
    as_json: bool = JSON_OPT,
) -> None:
    """What a checkpoint holds: command, node, CRIU, process tree, sizes, times, stats.

    Example: ccr show 42.0    or    ccr show /scratch/ckpt/42.0.ckpt --json
    """
    data = describe.show(Runtime.from_env(), target, image_dir)
    lines = []
    for d in data:
        created = timestamps.local(d["created_epoch"])
        rank = f" rank {d['rank']}" if "rank" in d else ""
        lines += [
            f"{d['step']}{rank}  generation {d['generation']}  {d['checkpoint']}",
            f"  command   {' '.join(d['command'])}  (cwd {d['cwd']})",
            f"  node      {d['node']}  uid {d['uid']}  created {created}  CRIU {d['criu_version']}",
            f"  images    {d['image_bytes'] / 2**20:.1f} MiB raw, {d['stored_bytes'] / 2**20:.1f}"
            f" MiB stored ({d['compression']}, ratio {d['ratio']})",
            f"  times     frozen {d['frozen_time']:.3f}s, total {d['total_time']:.3f}s",
            f"  signed    {'yes, manifest authenticated' if d['authenticated'] else 'NO'}",
            f"  GPU       {d['gpu'] or 'none'}",
            "  processes (pid in the step's namespace):",
        ]
        for proc in d["processes"]:
            lines.append(
                f"    {proc['pid']:>6} ppid {proc['ppid']:<6} {proc['command']:<16} "
                f"threads {proc['threads']:<3} rss {proc['rss_bytes'] / 2**20:.1f} MiB"
            )
    _emit({"checkpoints": data}, as_json, "\n".join(lines))


@app.command("list")
def list_(as_json: bool = JSON_OPT) -> None:
    """List jobs and their steps.

    Example: ccr list --json
    """
    data = jobs.list_jobs(Runtime.from_env())
    lines = [f"{'STEP':<12} {'STATE':<10} COMMAND"]
    for job in data:
        for step in job["steps"]:
            lines.append(f"{step['step']:<12} {step['state']:<10} {' '.join(step['command'])}")
    _emit({"jobs": data}, as_json, "\n".join(lines))


@app.command()
def status(job_id: str = typer.Argument(..., metavar="JOBID"), as_json: bool = JSON_OPT) -> None:
    """Show a job: steps, states, PIDs, checkpoint dir, generations, last checkpoint.

    Example: ccr status 42 --json
    """
    ref = _ref(job_id)
    data = jobs.job_status(Runtime.from_env(), ref.job_id)
    every = f"every {format_seconds(data['interval_s'])}" if data["interval_s"] else "none"
    lines = [
        f"job {data['job_id']}  checkpoint dir {data['checkpoint_dir']}",
        f"  interval checkpoints: {every}, keep {data['keep']}"
        + ("  (disabled)" if data["disabled"] else ""),
    ]
    for step in data["steps"]:
        lines.append(
            f"  {step['step']:<10} {step['state']:<10} pids {step['pids'] or '-'}"
            + (f" exit {step['exit_code']}" if step["exit_code"] is not None else "")
        )
        if step["next_checkpoint_epoch"] is not None and step["state"] == "running":
            lines.append(f"    next checkpoint {timestamps.local(step['next_checkpoint_epoch'])}")
        lines += _generation_lines(step["generations"])
    lines += _generation_lines(data["job_generations"], "job ")
    last = data["last_checkpoint"]
    lines.append(
        f"  last checkpoint: {last['path']} at {timestamps.local(last['time_epoch'])}"
        if last
        else "  no checkpoint yet"
    )
    _emit(data, as_json, "\n".join(lines))


def _generation_lines(gens: list[dict[str, Any]], what: str = "") -> list[str]:
    return [
        f"    {what}generation {g['generation']}  {timestamps.local(g['created_epoch'])}  "
        f"{g['bytes'] / 2**20:.1f} MiB  {g['path']}"
        for g in gens
    ]


@app.command()
def cancel(
    ref: str = typer.Argument(..., metavar="JOBID[.STEPID]"), as_json: bool = JSON_OPT
) -> None:
    """Terminate a job's (or one step's) process tree: SIGTERM, then SIGKILL.

    Example: ccr cancel 42.1
    """
    job_ref = _ref(ref)
    ended = jobs.cancel(Runtime.from_env(), job_ref)
    steps = [{"step": s, "job_id": job_ref.job_id, "step_id": int(s.split(".")[1])} for s in ended]
    _emit(
        {"job_id": job_ref.job_id, "cancelled": steps},
        as_json,
        "\n".join(f"{s} cancelled" for s in ended),
    )


def _convert(ckpt_dir: Path, codec: Codec, as_json: bool) -> None:
    path = _showing_progress(lambda: convert.convert(Runtime.from_env(), ckpt_dir, codec))
    _emit(
        {"checkpoint": str(path), "codec": codec.spec}, as_json, f"{path}: stored as {codec.spec}"
    )


@app.command()
def compress(
    ckpt_dir: Path = typer.Argument(..., metavar="CKPT"),
    level: Optional[str] = typer.Option(None, "--compress", help=COMPRESS_HELP),
    as_json: bool = JSON_OPT,
) -> None:
    """Compress a checkpoint in place, atomically.

    Example: ccr compress /scratch/ckpt/42.0.ckpt --compress zstd:3
    """
    codec = _codec(level)
    if codec.name == "none":
        raise UsageError("ccr compress needs a zstd codec (use ccr decompress for none)")
    _convert(ckpt_dir, codec, as_json)


@app.command()
def decompress(
    ckpt_dir: Path = typer.Argument(..., metavar="CKPT"), as_json: bool = JSON_OPT
) -> None:
    """Store a checkpoint uncompressed, in place, atomically (e.g. for crit or criu by hand).

    Example: ccr decompress /scratch/ckpt/42.0.ckpt
    """
    _convert(ckpt_dir, ckpt.Codec("none", 0), as_json)


@app.command()
def verify(
    target: str = typer.Argument(..., metavar="CKPT|JOBID[.STEPID]"),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Where to look for JOBID."),
    as_json: bool = JSON_OPT,
) -> None:
    """Check a checkpoint's manifest and every file without restoring it.

    Example: ccr verify /scratch/ckpt/42.0.ckpt    or    ccr verify 42
    """
    dirs = describe.verify(Runtime.from_env(), target, image_dir)
    where = Path(target).resolve() if Path(target).exists() else layout.generation_of(dirs[0])
    _emit(
        {"checkpoint": str(where), "ok": True, "steps": [str(d) for d in dirs]},
        as_json,
        f"{target}: OK ({len(dirs)} image dir(s) verified)",
    )


def _keywords(args: list[str]) -> tuple[Optional[Path], Optional[float], bool]:
    image_dir: Optional[Path] = None
    max_wait: Optional[float] = None
    stick = False
    for arg in args:
        key, _, value = arg.partition("=")
        low = key.lower()
        if low == "imagedir" and value:
            image_dir = Path(value)
        elif low == "maxwait" and value:
            try:
                max_wait = float(value)
            except ValueError:
                raise UsageError(f"MaxWait={value!r} is not a number of seconds") from None
        elif low[:5] == "stick" and not value:
            stick = True
        else:
            raise UsageError(
                f"unknown checkpoint option {arg!r} (ImageDir=, MaxWait=, StickToNodes)"
            )
    return image_dir, max_wait, stick


@checkpoint_app.callback()
def checkpoint_group() -> None:
    """scontrol checkpoint OP JOBID[.STEPID] [ImageDir=DIR] [MaxWait=S] [StickToNodes]."""


# scontrol's keyword options, listed in each verb's --help.
KEYWORDS = typer.Argument(
    None,
    metavar="[ImageDir=DIR] [MaxWait=SECONDS] [StickToNodes]",
    help="ImageDir=DIR: where images go (default: the job's checkpoint dir); "
    "MaxWait=SECONDS: abandon and roll back after this long; "
    "StickToNodes: restart only on the node the checkpoint was taken on (restart).",
    show_default=False,
)


def _checkpoint_verb(name: str, stop: bool, requeue: bool, doc: str) -> None:
    """Register `ccr checkpoint create|vacate|requeue`: one checkpoint, three endings."""

    def verb(
        ref: str = typer.Argument(..., metavar="JOBID[.STEPID]"),
        options: Optional[list[str]] = KEYWORDS,
        as_json: bool = JSON_OPT,
    ) -> None:
        image_dir, max_wait, _ = _keywords(options or [])
        _create(ref, image_dir, max_wait, stop, as_json)
        if requeue:
            coordinator.requeue_if_slurm(_ref(ref))  # a Slurm batch job: scontrol requeue

    verb.__doc__ = doc
    checkpoint_app.command(name)(verb)


_checkpoint_verb(
    "create",
    stop=False,
    requeue=False,
    doc="Checkpoint and leave running.  Example: ccr checkpoint create 42 ImageDir=/ck MaxWait=30",
)
_checkpoint_verb(
    "vacate",
    stop=True,
    requeue=False,
    doc="Checkpoint, then terminate.  Example: ccr checkpoint vacate 42 MaxWait=60",
)
_checkpoint_verb(
    "requeue",
    stop=True,
    requeue=True,
    doc="Checkpoint, terminate, and leave it for `ccr restart` (a Slurm batch job is requeued, "
    "as scontrol did).  Example: ccr checkpoint requeue 42",
)


@checkpoint_app.command("restart")
def cp_restart(
    ref: str = typer.Argument(..., metavar="JOBID[.STEPID]"),
    options: Optional[list[str]] = KEYWORDS,
    as_json: bool = JSON_OPT,
) -> None:
    """Restore from the newest checkpoint.  Example: ccr checkpoint restart 42 StickToNodes"""
    image_dir, max_wait, stick = _keywords(options or [])
    _restart(ref, image_dir, stick, max_wait, as_json)


@checkpoint_app.command("able")
def cp_able(ref: str, as_json: bool = JSON_OPT) -> None:
    """Yes, No, or `Began at <time>`.  Example: ccr checkpoint able 42"""
    data = jobs.able_detail(Runtime.from_env(), _ref(ref).job_id)
    _emit(data, as_json, data["able"])


@checkpoint_app.command("error")
def cp_error(ref: str, as_json: bool = JSON_OPT) -> None:
    """The last checkpoint error, as `error(<code>): <msg>`.  Example: ccr checkpoint error 42"""
    job_id = _ref(ref).job_id
    code, msg = jobs.last_error(Runtime.from_env(), job_id)
    _emit({"job_id": job_id, "code": code, "message": msg}, as_json, f"error({code}): {msg}")


@checkpoint_app.command("disable")
def cp_disable(ref: str, as_json: bool = JSON_OPT) -> None:
    """Block checkpoints (nests like a counter).  Example: ccr checkpoint disable 42"""
    job_id = _ref(ref).job_id
    count = jobs.set_enabled(Runtime.from_env(), job_id, enable=False)
    _emit({"job_id": job_id, "disabled": count}, as_json, f"disabled (count {count})")


@checkpoint_app.command("enable")
def cp_enable(ref: str, as_json: bool = JSON_OPT) -> None:
    """Undo one disable.  Example: ccr checkpoint enable 42"""
    job_id = _ref(ref).job_id
    count = jobs.set_enabled(Runtime.from_env(), job_id, enable=True)
    _emit(
        {"job_id": job_id, "disabled": count},
        as_json,
        "enabled" if count == 0 else f"still disabled (count {count})",
    )


@app.command()
def version(as_json: bool = JSON_OPT) -> None:
    """ccr's version, CRIU's version and the CRIU features ccr can use.

    Example: ccr version --json
    """
    data = doctor.version_info()
    criu = data["criu"]
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in criu["features"].items())
    lines = [
        f"ccr {data['version']} (Python {data['python']}, kernel {data['kernel']})",
        f"CRIU {criu['version'] or 'not found'} at {criu['binary'] or '-'}"
        + (f": {criu['error']}" if criu.get("error") else "")
        + ("" if criu["works"] else " (criu check fails: see ccr doctor)"),
    ]
    if feats:
        lines.append(f"CRIU features: {feats}")
    lines.append(f"pycriu: {'importable' if data['pycriu'] else 'missing (see ccr doctor)'}")
    _emit(data, as_json, "\n".join(lines))


@app.command("doctor")
def doctor_(as_json: bool = JSON_OPT) -> None:
    """Say what checkpointing needs and is missing here, and how to get it (exit 0 or 5).

    Example: ccr doctor
    """
    findings = doctor.diagnose()
    ok = all(f.ok for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{'ok ' if f.ok else 'NO '} {f.name}: {f.detail}")
        if f.fix:
            lines.append(f"      fix: {f.fix}")
    lines.append("ccr can checkpoint here" if ok else "ccr cannot checkpoint here (see the fixes)")
    _emit({"ok": ok, "checks": [f.to_dict() for f in findings]}, as_json, "\n".join(lines))
    raise typer.Exit(0 if ok else CriuError.exit_code)


@app.command()
def daemon(
    socket_path: Optional[str] = typer.Option(
        None, "--socket", help="Unix socket (default: CCR_SOCKET, else /run/ccr/ccr.sock)."
    ),
) -> None:
    """Run the node service (as root) that serves every other user's ccr commands.

    Example: ccr daemon --socket /run/ccr/ccr.sock    (or: systemctl start ccr-daemon)
    """
    from ccr.service import server  # the service runs this module's app: loaded on use

    raise typer.Exit(server.main(socket_path))


app.add_typer(checkpoint_app, name="checkpoint")
register_slurm_commands(app)


GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _normalise(root: Any, args: list[str]) -> tuple[list[str], bool]:
    """Move -q/-v given after a subcommand to the front; say whether --json was given.

    Only ccr's own options count: not an option's value, nothing after `--`, and nothing
    from `ccr run`'s command onwards (`ccr run python x.py -v` passes -v to x.py).
    """
    front: list[str] = []
    out: list[str] = []
    current = root
    as_json = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1 :]
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
            continue
        if arg.startswith("-") and len(arg) > 1:
            out.append(arg)
            name = arg.split("=", 1)[0]
            param = next(
                (
                    p
                    for p in current.params
                    if p.param_type_name == "option" and name in (*p.opts, *p.secondary_opts)
                ),
                None,
            )
            if name == "--json" and param is not None:
                as_json = True
            takes_value = param is not None and not (param.is_flag or param.count)
            if takes_value and "=" not in arg and i < len(args):
                out.append(args[i])
                i += 1
            continue
        sub = getattr(current, "commands", {}).get(arg)
        out.append(arg)
        if sub is not None:
            current = sub
        elif not current.context_settings.get(
            "allow_interspersed_args", current.allow_interspersed_args
        ):
            out += args[i:]  # e.g. ccr run's command and its own arguments
            break
    return front + out, as_json


class _InterruptedCommand(Exception):
    """Carries a command's KeyboardInterrupt past typer (which would swallow it) to main."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: say what state it left (run, create, restart roll back first)."""
    lines = exc.lines if isinstance(exc, interrupts.Interrupted) else []
    for line in lines or ["interrupted"]:
        print(f"ccr: {line}", file=sys.stderr)
    return 128 + interrupts.signum_of(exc)


def main(argv: Optional[list[str]] = None) -> None:
    """The `ccr` command (ccr.entrypoint.main: the service's client, else in-process)."""
    entrypoint.main(argv)


def run_in_process(argv: list[str]) -> int:
    """Run one command line in this process; return its exit code (the service's workers
    call this with the caller's argv)."""
    command = typer.main.get_command(app)
    args, as_json = _normalise(command, argv)
    try:
        result = command.main(args=args, prog_name="ccr", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except _InterruptedCommand as exc:
        code = _interrupted(exc.interrupt)
    except typer.Abort:
        code = report_failure("aborted", 130, as_json)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message())  # `ccr` (or `ccr checkpoint`) alone: the help, not an error
        code = 0
    except click.ClickException as exc:
        code = report_failure(exc.format_message(), exc.exit_code, as_json)
    except CcrError as exc:
        code = report_failure(str(exc), exit_code_for(exc), as_json)
    except KeyboardInterrupt as exc:
        code = _interrupted(exc)
    except Exception as exc:  # noqa: BLE001 - a user sees one line, never a traceback
        if config.debug():
            raise
        message = f"{type(exc).__name__}: {exc} (CCR_DEBUG=1 for details)"
        if as_json:
            code = report_failure(f"internal error: {message}", 1, True)
        else:
            print(f"ccr: internal error: {message}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    main()
