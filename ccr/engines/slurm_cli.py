"""Thin wrappers around Slurm's client commands (scontrol, sinfo, sbatch, srun) and task env."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ccr.config import env_int as _int
from ccr.config import env_str, node_name
from ccr.errors import CcrError, JobStateError, NotFoundError, PermissionDeniedError

TIMEOUT = 60.0
# What Slurm says when the caller may not act on a job (ESLURM_ACCESS_DENIED's text): a
# user's srun into, or scontrol of, another user's job.  ccr reports it as exit 9.
ACCESS_DENIED = "Access/permission denied"
_FIELD = re.compile(r"(\w+)=(\S*)")


def available() -> bool:
    """True when Slurm's clients are installed (whether a controller answers is another matter)."""
    return shutil.which("scontrol") is not None and shutil.which("srun") is not None


def run(argv: list[str], timeout: float = TIMEOUT, input: str | None = None) -> str:
    """Run a Slurm client; its stdout, or a one-line CcrError naming what it said."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except FileNotFoundError:
        raise CcrError(f"{argv[0]} not found: is Slurm installed here?") from None
    except subprocess.TimeoutExpired:
        raise CcrError(f"{' '.join(argv[:3])} did not answer within {timeout:g}s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        said = lines[-1] if lines else proc.returncode
        cls = PermissionDeniedError if any(ACCESS_DENIED in ln for ln in lines) else CcrError
        raise cls(f"{' '.join(argv[:3])} failed: {said}")
    return proc.stdout


def job_info(job_id: int) -> dict[str, str] | None:
    """`scontrol show job -o J` as a dict; None when Slurm does not know the job (or no Slurm)."""
    if not available():
        return None
    try:
        out = run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    except CcrError:
        return None
    info = dict(_FIELD.findall(out))
    return info if info.get("JobId") == str(job_id) else None


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist expression (node[1-3]) into names."""
    if not nodelist or nodelist == "(null)":
        return []
    return run(["scontrol", "show", "hostnames", nodelist]).split()


def node_states(nodes: list[str]) -> dict[str, str]:
    """sinfo's compact state of each node (idle, alloc, down*, drain, ...)."""
    out = run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %t"])
    states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return {n: states.get(n, "unknown") for n in nodes}


def node_usable(state: str) -> bool:
    """Whether a node in this sinfo state can run a job (not down, drained, failing, unknown)."""
    bad = ("down", "drain", "drng", "fail", "unk", "maint", "boot", "futr", "inval")
    return not state.endswith("*") and not state.startswith(bad) and state != "unknown"


def requeue(job_id: int) -> None:
    run(["scontrol", "requeue", str(job_id)])


def release(job_id: int, nodes: list[str] | None = None) -> None:
    """Let a requeued (held for cred_expire) job start in 2 s, optionally pinned to nodes.

    Not `now`: a relaunch in the same second as the requeue is killed by slurmd with
    "Job credential revoked" (revocation compares 1-second timestamps).
    """
    cmd = ["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"]
    if nodes:
        cmd.append(f"ReqNodeList={','.join(nodes)}")
    run(cmd)


def sbatch(args: list[str], script: str) -> int:
    """Submit a batch script (its text on stdin); the new job id."""
    out = run(["sbatch", "--parsable", *args], input=script)
    try:
        return int(out.strip().split(";")[0])
    except ValueError:
        raise CcrError(f"sbatch printed no job id: {out.strip()!r}") from None


def srun_overlap(job_id: int, nodes: list[str], command: list[str]) -> subprocess.Popen[str]:
    """One task per node of a running job, as an overlapping step; stdin goes to every task."""
    n = str(len(nodes))
    argv = [
        "srun",
        f"--jobid={job_id}",
        "--overlap",
        "-N",
        n,
        "-n",
        n,
        "--ntasks-per-node=1",
        f"--nodelist={','.join(nodes)}",
        "--input=all",
        "--unbuffered",
        "--kill-on-bad-exit=0",
        "-J",
        "ccr-checkpoint",
        *command,
    ]
    # Step-specific variables of a caller that is itself a step must not leak into this one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_STEP", "SLURM_NTASKS"))}
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
    except FileNotFoundError:
        raise CcrError("srun not found: is Slurm installed here?") from None


def running_nodes(job_id: int) -> list[str]:
    """The nodes of a RUNNING job; raise when the job is unknown or not running."""
    info = job_info(job_id)
    if info is None:
        raise NotFoundError(f"Slurm does not know job {job_id}")
    if info.get("JobState") != "RUNNING":
        raise JobStateError(f"job {job_id} is {info.get('JobState', '?')}, not RUNNING")
    return hostnames(info.get("NodeList", ""))


@dataclass(frozen=True)
class TaskEnv:
    """Who this process is in Slurm: job, step, rank and node (all None outside Slurm)."""

    job_id: int | None
    step_id: int | None
    rank: int | None
    ntasks: int
    nnodes: int
    node: str
    nodelist: str
    restart_count: int | None

    @classmethod
    def from_env(cls) -> TaskEnv:
        in_step = _int("SLURM_STEP_ID") is not None
        return cls(
            job_id=_int("SLURM_JOB_ID"),
            step_id=_int("SLURM_STEP_ID"),
            rank=_int("SLURM_PROCID") if in_step else None,
            ntasks=(_int("SLURM_STEP_NUM_TASKS") or _int("SLURM_NTASKS") or 1) if in_step else 1,
            nnodes=(_int("SLURM_STEP_NUM_NODES") or _int("SLURM_NNODES") or 1) if in_step else 1,
            node=node_name(),
            nodelist=env_str("SLURM_STEP_NODELIST") or env_str("SLURM_NODELIST"),
            restart_count=_int("SLURM_RESTART_COUNT"),
        )

    @property
    def multi(self) -> bool:
        """A task of a step with more than one task (checkpoints must be coordinated)."""
        return self.rank is not None and self.ntasks > 1


def ccr_command() -> list[str]:
    """How to run this ccr on a node (same interpreter; the install must be shared)."""
    import sys

    return [sys.executable, "-m", "ccr"]
