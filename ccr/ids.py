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


# Slurm's value of %a for a job that is not part of an array (NO_VAL - 1, as sbatch prints).
NO_ARRAY_TASK = 4294967294

_PATTERN = re.compile(r"%(\d*)(.)", re.DOTALL)


@dataclass(frozen=True)
class FileContext:
    """What Slurm's filename patterns (`-o`, `-e`) expand to for one step task."""

    job_id: int
    step_id: int
    node: str
    user: str
    job_name: str
    array_job_id: int | None = None  # SLURM_ARRAY_JOB_ID; None: not an array job
    array_task_id: int | None = None  # SLURM_ARRAY_TASK_ID
    task_id: int = 0  # SLURM_PROCID
    node_id: int = 0  # SLURM_NODEID


def expand_filename_pattern(pattern: str, ctx: FileContext) -> str:
    """Expand srun/sbatch filename patterns: %j %J %s %N %n %t %u %x %A %a %%.

    A number after `%` pads a numeric value with zeros (`%4j` -> 0042), as in Slurm.
    Outside an array `%A` is the job id and `%a` is 4294967294, as Slurm writes them.
    """
    numbers = {
        "j": ctx.job_id,
        "s": ctx.step_id,
        "A": ctx.job_id if ctx.array_job_id is None else ctx.array_job_id,
        "a": NO_ARRAY_TASK if ctx.array_task_id is None else ctx.array_task_id,
        "t": ctx.task_id,
        "n": ctx.node_id,
    }
    words = {"N": ctx.node, "u": ctx.user, "x": ctx.job_name}

    def one(match: re.Match[str]) -> str:
        width, key = match.group(1), match.group(2)
        pad = int(width) if width else 0
        if key == "%" and not width:
            return "%"
        if key in numbers:
            return str(numbers[key]).zfill(pad)
        if key == "J":
            return f"{str(ctx.job_id).zfill(pad)}.{str(ctx.step_id).zfill(pad)}"
        if key in words and not width:
            return words[key]
        raise UsageError(
            f"unknown filename pattern %{width}{key} in {pattern!r} "
            "(known: %j %J %s %N %n %t %u %x %A %a %%)"
        )

    if pattern.endswith("%") and not pattern.endswith("%%"):
        raise UsageError(f"filename pattern {pattern!r} ends in a lone %")
    return _PATTERN.sub(one, pattern)
