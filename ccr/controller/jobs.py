"""Jobs as users see them: list, status, cancel, and scontrol's able/error/disable/enable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ccr.controller.runtime import Runtime
from ccr.engines import process
from ccr.errors import JobStateError, NotFoundError
from ccr.ids import JobRef, checkpoint_name
from ccr.storage import registry as reg
from ccr.storage.imageset import CheckpointSeries
from ccr.storage.manifest import JOB_MANIFEST, MANIFEST, read_json
from ccr.timestamps import stamp


def live_state(step: reg.StepRecord) -> str:
    """The registry's state, corrected by a look at the process (a dead 'running' is 'lost')."""
    if step.state in (reg.RUNNING, reg.VACATING):
        if step.init_pid and step.init_start:
            if process.ProcessIdentity(step.init_pid, step.init_start).alive():
                return step.state
        return reg.LOST
    return step.state


def step_status(step: reg.StepRecord) -> dict[str, Any]:
    state = live_state(step)
    pids = process.tree_pids(step.init_pid) if state == reg.RUNNING and step.init_pid else []
    return {
        "step": f"{step.job_id}.{step.step_id}",
        "job_id": step.job_id,
        "step_id": step.step_id,
        "state": state,
        "pids": pids,
        "init_pid": step.init_pid,
        "supervisor_pid": step.supervisor_pid,
        "command": step.argv,
        "cwd": step.cwd,
        "output": step.output,
        **stamp("started", step.started),
        **stamp("ended", step.ended),
        "exit_code": step.exit_code,
        **stamp("next_checkpoint", step.next_checkpoint),
    }


def generations(image_dir: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for gen in CheckpointSeries(image_dir, name).generations():
        manifest = gen.path / (JOB_MANIFEST if gen.is_job else MANIFEST)
        created = None
        try:
            created = float(read_json(manifest).get("created", 0.0)) if manifest.exists() else None
        except Exception:  # noqa: BLE001 - a broken manifest still shows as a generation
            created = None
        size = sum(p.stat().st_size for p in gen.path.rglob("*") if p.is_file())
        out.append(
            {
                "path": str(gen.path),
                "generation": gen.number,
                **stamp("created", created),
                "bytes": size,
            }
        )
    return out


def job_status(rt: Runtime, job_id: int) -> dict[str, Any]:
    with rt.registry() as db:
        job = db.job(job_id)
        ckpts = db.checkpoints(job_id)
    image_dir = Path(job.checkpoint_dir)
    steps = [step_status(s) for s in job.steps]
    for entry, step in zip(steps, job.steps, strict=True):
        entry["generations"] = generations(image_dir, checkpoint_name(step.id))
    last = ckpts[-1] if ckpts else None
    return {
        "job_id": job.job_id,
        "checkpoint_dir": job.checkpoint_dir,
        "interval_s": job.interval_s,
        "keep": job.keep,
        "disabled": job.disabled,
        "restart_count": job.restart_count,
        "last_error": job.last_error,
        "steps": steps,
        "job_generations": generations(image_dir, checkpoint_name(JobRef(job_id))),
        "last_checkpoint": None
        if last is None
        else {
            "path": last.path,
            **stamp("time", last.created),
            "step_id": last.step_id,
            "frozen_time": round(last.frozen_time, 4),
            "total_time": round(last.total_time, 4),
            "image_bytes": last.image_bytes,
            "stored_bytes": last.stored_bytes,
        },
    }


def list_jobs(rt: Runtime) -> list[dict[str, Any]]:
    with rt.registry() as db:
        jobs = db.jobs()
    return [
        {
            "job_id": j.job_id,
            "checkpoint_dir": j.checkpoint_dir,
            "steps": [
                {
                    "step": f"{s.job_id}.{s.step_id}",
                    "job_id": s.job_id,
                    "step_id": s.step_id,
                    "state": live_state(s),
                    "command": s.argv,
                }
                for s in j.steps
            ],
        }
        for j in jobs
    ]


def cancel(rt: Runtime, ref: JobRef, grace: float = 5.0) -> list[str]:
    """Terminate the tree of one step or of every live step; return the steps ended."""
    with rt.registry() as db:
        steps = [db.step(ref.step)] if ref.step is not None else db.job(ref.job_id).steps
    live = [s for s in steps if live_state(s) == reg.RUNNING]
    if not live:
        raise JobStateError(f"{ref} has no running step")
    for step in live:
        with rt.registry() as db:
            db.compare_and_set_state(step.id, (reg.RUNNING,), reg.CANCELLED)
        assert step.init_pid is not None and step.init_start is not None
        process.terminate(process.ProcessIdentity(step.init_pid, step.init_start), grace)
    return [str(s.id) for s in live]


def able(rt: Runtime, job_id: int) -> str:
    """scontrol's answer: 'Yes', 'No' (disabled or nothing running) or 'Began at <time>'."""
    return str(able_detail(rt, job_id)["able"])


def able_detail(rt: Runtime, job_id: int) -> dict[str, Any]:
    """`able`'s answer with the job id and, while a checkpoint runs, when it began."""
    with rt.registry() as db:
        job = db.job(job_id)
    if job.ckpt_began is not None:
        answer = f"Began at {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(job.ckpt_began))}"
    elif job.disabled or not any(live_state(s) == reg.RUNNING for s in job.steps):
        answer = "No"
    else:
        answer = "Yes"
    return {"job_id": job_id, "able": answer, **stamp("began", job.ckpt_began)}


def last_error(rt: Runtime, job_id: int) -> tuple[int, str]:
    with rt.registry() as db:
        job = db.job(job_id)
    return job.last_error_code, job.last_error or ""


def set_enabled(rt: Runtime, job_id: int, enable: bool) -> int:
    """disable/enable nest like a counter; return the new counter."""
    with rt.registry() as db:
        if db.find_job(job_id) is None:
            raise NotFoundError(f"unknown job {job_id}")
        return db.adjust_disabled(job_id, -1 if enable else 1)
