"""`ccr run`: launch a step (or resume it from its checkpoint) and supervise it."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from ccr import config, interrupts
from ccr.controller import multinode_restart, placement, relay
from ccr.controller import restart as rst
from ccr.controller import supervisor as sup
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import process
from ccr.errors import JobStateError, NotFoundError, StorageError, UsageError
from ccr.ids import JobRef, StepId
from ccr.storage import layout
from ccr.storage import registry as reg
from ccr.storage.imageset import prepare_image_dir


@dataclass
class RunRequest:
    """Everything `ccr run` was asked to do."""

    argv: list[str]
    job_id: int | None = None
    step_id: int | None = None
    checkpoint_dir: Path | None = None
    output: str | None = None  # -o: a Slurm filename pattern, or "-" (relay only)
    error: str | None = None  # -e: stderr's own file; None: with stdout
    restart_dir: Path | None = None
    detach: bool = False
    mkdir: bool = False  # create a missing checkpoint dir's missing parents too
    settings: sup.SupervisorSettings = field(default_factory=sup.SupervisorSettings)


def _resolve_step(rt: Runtime, req: RunRequest) -> StepId:
    job_id = req.job_id if req.job_id is not None else config.env_int("SLURM_JOB_ID", strict=True)
    step_id = (
        req.step_id if req.step_id is not None else config.env_int("SLURM_STEP_ID", strict=True)
    )
    with rt.registry() as db:
        if job_id is None:
            job_id = db.allocate_job_id()
        if step_id is None:
            step_id = _interrupted_step(db, job_id, req.argv)
        if step_id is None:
            step_id = db.next_step_id(job_id)
    return StepId(job_id, step_id)


def _interrupted_step(db: reg.Registry, job_id: int, argv: list[str]) -> int | None:
    """The step that ran this same command in this job and did not finish (a requeue).

    Running the same command again in the same job (as a requeued batch script does) must
    resume it, not start a new step beside it.
    """
    for step in reversed(db.steps(job_id)):
        if step.argv == argv and step.state in (reg.VACATED, reg.LOST, reg.FAILED):
            return step.step_id
        if step.argv == argv and step.state == reg.RUNNING and not _alive(step):
            return step.step_id
    return None


def _command_exists(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    cmd = argv[0]
    if "/" in cmd:
        target = (cwd / cmd) if not os.path.isabs(cmd) else Path(cmd)
        if not (target.is_file() and os.access(target, os.X_OK)):
            raise UsageError(f"command not found or not executable: {cmd}")
    elif shutil.which(cmd, path=env.get("PATH", os.defpath)) is None:
        raise UsageError(f"command not found: {cmd}")


def run(rt: Runtime, req: RunRequest, announce: sup.Report) -> int:
    """Launch (or resume) a step; return the exit code ccr should exit with.

    announce receives {"step": "<jobid>.<stepid>", ...} once the step is running.
    """
    try:
        return _run(rt, req, announce)
    except interrupts.Interrupted as exc:
        exc.lines = exc.lines or ["interrupted: nothing was started"]
        raise


def _run(rt: Runtime, req: RunRequest, announce: sup.Report) -> int:
    if not req.argv:
        raise UsageError("no command given: ccr run [OPTIONS] -- CMD [ARGS...]")
    cwd = Path.cwd()
    env = dict(os.environ)
    req.settings = placement.task_settings(req.settings)
    if not req.detach:
        req.settings = replace(req.settings, confirm_interrupt=True)
    step = _resolve_step(rt, req)
    ckpt_dir = prepare_image_dir(
        layout.default_image_dir(None, req.checkpoint_dir), "checkpoint directory", req.mkdir
    )
    env.update(placement.task_exports(rt, step, ckpt_dir))
    output = placement.output_file(step, cwd, req.output, req.argv).resolve()
    error = placement.error_file(step, cwd, req.error, req.argv)
    error = None if error is None else error.resolve()
    resume = _resume_image(
        rt, step, req.restart_dir or ckpt_dir, req.restart_dir is not None, req.argv
    )
    if resume is None:
        _command_exists(req.argv, env, cwd)
    with rt.registry() as db:
        existing = db.find_step(step)
        if existing is not None and _alive(existing):
            raise JobStateError(f"step {step} is already running (pid {existing.init_pid})")
        db.ensure_job(
            step.job_id,
            str(ckpt_dir),
            checkpoint_dir=str(ckpt_dir),
            interval_s=req.settings.interval,
            keep=req.settings.keep,
        )

    # A resumed step writes where its checkpoint says; a relay goes on where the last stopped.
    files = (
        (Path(resume.manifest.output), _path(resume.manifest.error))
        if resume is not None
        else (output, error)
    )
    offsets = (
        relay.start_offset(files[0], existing.out_offset if resume and existing else None),
        None
        if files[1] is None
        else relay.start_offset(files[1], existing.err_offset if resume and existing else None),
    )

    def start(report: sup.Report) -> int:
        supervisor = sup.Supervisor(rt, step, req.settings)
        running = ExitStack()
        try:
            if resume is not None:
                # Interrupted or failed, restore_into leaves nothing running.
                result = rst.restore_into(
                    rt, supervisor, resume, Deadline.after(req.settings.max_wait)
                )
                message = {"ok": True, "step": str(step), "pid": result.pid}
                message["resumed"] = str(resume.path)
                message["supervisor_pid"] = os.getpid()
            else:
                pid = supervisor.start_fresh(req.argv, cwd, env, output, error, offsets)
                message = {"ok": True, "step": str(step), "pid": pid, "output": str(output)}
                message["supervisor_pid"] = os.getpid()
                if error is not None:
                    message["error"] = str(error)
            # The step runs: from here a Ctrl-C is the supervisor's to handle (it shows the
            # state, see Supervisor.wait), not a reason to undo the start.
            running.enter_context(interrupts.shielded())
            if resume is not None:
                with rt.registry() as db:
                    db.update_step(step, out_offset=offsets[0], err_offset=offsets[1])
            report(message)
            if resume is not None:
                with rt.registry() as db:
                    db.bump_restart_count(step.job_id)
            placement.record_task(rt, step)
        except BaseException:
            # Nobody was told the step runs (or its caller gave up): it must not run on.
            running.close()
            supervisor.rollback()
            raise
        with running:
            if req.detach:
                return supervisor.wait()
            relaying = _relay(rt, step, files, offsets).start()
            try:
                return supervisor.wait()
            finally:
                relaying.stop()

    what = f"resume of {step}" if resume is not None else f"start of {step}"
    try:
        if req.detach:
            message = sup.spawn_background(str(step), start)
            announce(message)
            return 0
        return start(announce)
    except interrupts.Interrupted as exc:
        started = exc.started
        exc.lines = [
            f"interrupted: {step} was already started (pid {started['pid']}) and keeps running"
            if started is not None
            else f"interrupted: {what} rolled back, nothing running"
        ]
        raise


def _path(name: str | None) -> Path | None:
    return None if name is None else Path(name)


def _relay(
    rt: Runtime, step: StepId, files: tuple[Path, Path | None], offsets: tuple[int, int | None]
) -> relay.Relay:
    """stdout (with stderr, unless -e) to our stdout; -e's file to our stderr."""
    sources = [relay.Source(files[0], offsets[0], sys.stdout.buffer)]
    if files[1] is not None and offsets[1] is not None:
        sources.append(relay.Source(files[1], offsets[1], sys.stderr.buffer))

    def save(done: list[int]) -> None:
        with rt.registry() as db:
            db.update_step(step, out_offset=done[0], err_offset=done[1] if len(done) > 1 else None)

    return relay.Relay(sources, save)


def _alive(step: reg.StepRecord) -> bool:
    if step.state not in (reg.RUNNING, reg.VACATING) or not step.init_pid or not step.init_start:
        return False
    return process.ProcessIdentity(step.init_pid, step.init_start).alive()


def _resume_image(
    rt: Runtime, step: StepId, image_dir: Path, explicit: bool, argv: list[str]
) -> rst.StepImage | None:
    """The verified checkpoint to resume from, if one exists (an explicit dir must have one)."""
    rank_dir = multinode_restart.rank_image(rt, step, image_dir)
    if rank_dir is not None:  # this task's rank of a multi-node checkpoint
        image = rst.load_image(rt, rank_dir, full=False)
    elif explicit:
        image = _from_restart_dir(rt, step, image_dir, argv)
    else:
        try:
            found = layout.newest(
                image_dir, JobRef(step.job_id, step.step_id), rt.manifest_key(create=False)
            )
        except (NotFoundError, StorageError):
            return None
        rst.refuse_multi_node(found, _AS_A_TASK)
        image = rst.load_image(rt, found[0].path, full=False)
    rst.preflight(rt, image, stick_to_nodes=False)
    print(f"ccr: resuming step {step} from {image.path}", file=sys.stderr)
    return image


# A multi-node checkpoint outside Slurm (rank_image found no Slurm task to resume it in).
_AS_A_TASK = "resume it as the same step of a Slurm job (srun with as many tasks), or ccr restart"


def _from_restart_dir(
    rt: Runtime, step: StepId, restart_dir: Path, argv: list[str]
) -> rst.StepImage:
    """`--restart-dir DIR` (srun's, SLURM_RESTART_DIR): the checkpoint in DIR, resumed as step.

    A job resubmitted after its time limit gets a new job id: DIR then holds the old job's
    checkpoints, which are restored into the new id (their files untouched).  DIR holding
    several jobs' checkpoints is ambiguous and refused, naming them.
    """
    present = layout.checkpoints_in(restart_dir)
    jobs = sorted({job for job, _, _ in present})
    if step.job_id in jobs:
        source = step.job_id
    elif len(jobs) == 1:
        source = jobs[0]
    elif jobs:
        raise UsageError(
            f"--restart-dir {restart_dir} holds checkpoints of several jobs ("
            + ", ".join(str(j) for j in jobs)
            + "): give a directory with one job's checkpoints"
        )
    else:
        raise NotFoundError(f"--restart-dir {restart_dir}: no ccr checkpoint in it")
    ref = JobRef(source, step.step_id if source == step.job_id else None)
    newest = layout.newest(restart_dir, ref, rt.manifest_key(create=False))
    rst.refuse_multi_node(newest, _AS_A_TASK)
    found = [(s.step, rst.load_image(rt, s.path, full=False)) for s in newest]
    if len(found) > 1:  # several steps: the one that ran this command, else this step id
        same = [f for f in found if f[1].manifest.argv == argv] or [
            f for f in found if f[0].step_id == step.step_id
        ]
        if len(same) != 1:
            steps = ", ".join(str(s) for s, _ in found)
            raise UsageError(
                f"--restart-dir {restart_dir} holds several steps of job {source} ({steps}) "
                "and none is this command's: run with --step-id to pick one"
            )
        found = same
    named, image = found[0]
    image = rst.as_step(image, named, rename=False)
    return rst.as_step(image, step, rename=True)
