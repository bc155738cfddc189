"""Job and step identifiers and the checkpoint names derived from them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ccr.errors import UsageError

# Slurm's job and step ids are 32-bit unsigned.
MAX_ID = 2**32 - 1
_REF = re.compile(r"^([0-9]{1,10})(?:\.([0-9]{1,10}))?$")


@dataclass(frozen=True, order=True)
class StepId:
    """One step of one job: `<jobid>.<stepid>`."""

    job_id: int
    step_id: int

    def __str__(self) -> str:
        return f"{self.job_id}.{self.step_id}"


@dataclass(frozen=True)
class JobRef:
    """A job, or one step of it, as a user names it: `<jobid>` or `<jobid>.<stepid>`."""

    job_id: int
    step_id: int | None = None

    def __str__(self) -> str:
        return str(self.job_id) if self.step_id is None else f"{self.job_id}.{self.step_id}"

    @property
    def step(self) -> StepId | None:
        return None if self.step_id is None else StepId(self.job_id, self.step_id)


def parse_job_ref(text: str) -> JobRef:
    """Parse `<jobid>` or `<jobid>.<stepid>` (non-negative integers)."""
    match = _REF.match(text.strip()) if text else None
    if not match:
        raise UsageError(f"malformed job id {text!r}: expected <jobid> or <jobid>.<stepid>")
    step = match.group(2)
    job_id = int(match.group(1))
    step_id = None if step is None else int(step)
    if job_id > MAX_ID or (step_id is not None and step_id > MAX_ID):
        raise UsageError(f"job id {text!r} is out of range (Slurm ids are at most {MAX_ID})")
    return JobRef(job_id, step_id)


def parse_step_id(text: str) -> StepId:
    """Parse `<jobid>.<stepid>`; a bare job id is an error."""
    ref = parse_job_ref(text)
    if ref.step_id is None:
        raise UsageError(f"malformed step id {text!r}: expected <jobid>.<stepid>")
    return StepId(ref.job_id, ref.step_id)


def checkpoint_name(ref: JobRef | StepId) -> str:
    """Slurm's image names: `<jobid>.ckpt` for a job, `<jobid>.<stepid>.ckpt` for a step."""
    return f"{ref}.ckpt"


def output_name(step: StepId) -> str:
    """Default output file of a step, as `ccr-<jobid>.<stepid>.out`."""
    return f"ccr-{step}.out"
