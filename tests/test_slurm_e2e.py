"""ccr with Slurm as the distributed engine, on the mini-cluster: 2-node jobs checkpointed
through an overlapping step, restarted by requeue or as a new job, StickToNodes, a node whose
dump fails, and preemption -> requeue -> resume.

Every job a test submits is scancelled at the end, and every process it started is killed by
PID (from the per-node registries, checked against its environment), never by name.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import COUNTER, criu_works, numbers, run_ccr, wait_for

from tests.slurm_cluster import FINAL_STATES, SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Dist:
    """One test's world: a work dir on the shared file system, per-node ccr state, its jobs."""

    cluster: SlurmCluster
    work: Path
    env: dict[str, str]
    jobs: list[int] = field(default_factory=list)
    downed: list[str] = field(default_factory=list)

    def ccr(self, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout=120):
        return run_ccr(args, cwd=self.work, env=env or self.env, check=check, timeout=timeout)

    def submit(self, *sbatch_args: str, body: str | None = None, header: str = "") -> int:
        body = body or f"srun {PY} -m ccr run -- {PY} {self.work}/counter.py 0.1\n"
        script = (
            "#!/bin/bash\n"
            f"#SBATCH -N2 --ntasks-per-node=1 --requeue --open-mode=append -t 10 {header}\n"
            f"#SBATCH -o {self.work}/job-%j.out\n"
            'echo "start restarts=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST"\n' + body
        )
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args],
            input=script,
            cwd=self.work,
            env=self.env,  # the job's tasks get our CCR_STATE_DIR and key
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        job = int(proc.stdout.strip().split(";")[0])
        self.jobs.append(job)
        return job

    def track(self, job: int) -> None:
        self.jobs.append(job)

    def out(self, job: int, rank: int) -> Path:
        return self.work / f"ccr-{job}.0.{rank}.out"

    def counts(self, job: int) -> list[list[int]]:
        return [numbers(self.out(job, r)) for r in (0, 1)]

    def wait_counting(self, job: int, beyond: tuple[int, int] = (5, 5), timeout=60) -> None:
        def ok() -> bool:
            c = self.counts(job)
            return all(len(n) > b for n, b in zip(c, beyond, strict=True))

        wait_for(ok, timeout, f"both ranks of job {job} counting past {beyond}")

    def wait_state(self, job: int, state: str, timeout: float = 60) -> dict[str, str]:
        return self.cluster.wait_job(job, (state,), timeout=timeout)

    def nodes_of(self, job: int) -> str:
        return self.cluster.job(job)["NodeList"]

    # cleanup ---------------------------------------------------------------------------
    def pids(self) -> list[int]:
        found = []
        for db_path in self.work.glob("state-*/registry.db"):
            db = sqlite3.connect(db_path, timeout=30)
            try:
                rows = db.execute("SELECT init_pid, supervisor_pid FROM steps").fetchall()
            finally:
                db.close()
            found += [p for row in rows for p in row if p]
        marker = f"CCR_STATE_DIR={self.env['CCR_STATE_DIR']}".encode()
        mine = []
        for pid in found:
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    mine.append(pid)
            except OSError:
                continue
        return mine

    def cleanup(self) -> None:
        for node in self.downed:
            self.cluster.scontrol("update", f"nodename={node}", "state=resume", check=False)
        for job in self.jobs:
            self.cluster.run("scancel", "--full", str(job), check=False)
        for job in self.jobs:
            try:
                self.cluster.wait_job(job, tuple(FINAL_STATES), timeout=30)
            except AssertionError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self.pids(), 15, "test processes gone")


@pytest.fixture
def dist(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[Dist]:  # noqa: F811
    if not criu_works():
        pytest.fail("no working CRIU: run scripts/install-criu.sh")
    work = tmp_path / "work"
    work.mkdir()
    (work / "counter.py").write_text(COUNTER)
    env = dict(slurm_cluster.env)
    for var in list(env):
        if var.startswith(("SLURM_", "SBATCH_", "CCR_")) and var != "SLURM_CONF":
            del env[var]
    env.update(
        CCR_STATE_DIR=str(work / "state-%n"),
        CCR_KEY_FILE=str(work / "manifest.key"),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    slurm_cluster.wait_idle()
    d = Dist(slurm_cluster, work, env)
    try:
        yield d
    finally:
        d.cleanup()


def consecutive(nums: list[int]) -> bool:
    """Printed 0, 1, 2, ... with no restart from 0 and no value lost or repeated."""
    return nums == list(range(len(nums)))


def test_two_node_create_then_restart_same_job_id(dist: Dist) -> None:
    job = dist.submit()
    dist.wait_state(job, "RUNNING")
    dist.wait_counting(job)
    assert dist.nodes_of(job) == "node[1-2]"

    t0 = time.monotonic()
    created = dist.ccr("create", str(job), "--json")
    took = time.monotonic() - t0
    data = json.loads(created.stdout)
    link = dist.work / f"{job}.ckpt"
    assert link.is_symlink() and Path(data["path"]) == link.resolve(), data
    manifest = json.loads((link / "job.json").read_text())
    assert manifest["ranks"] == {"0": {"0": "node1", "1": "node2"}}, manifest
    assert sorted(p.name for p in (link / "0").iterdir()) == ["0", "1"]
    assert took < 20, f"2-node checkpoint took {took:.1f}s"
    before = [len(n) for n in dist.counts(job)]
    dist.wait_counting(job, (before[0] + 3, before[1] + 3))  # still running after create

    dist.ccr("create", "--stop", str(job))
    info = dist.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    assert info["ExitCode"] == "75:0", info  # every rank: "checkpointed, requeue me"
    stopped = [len(n) for n in dist.counts(job)]

    out = dist.ccr("restart", str(job)).stdout
    assert "requeued" in out, out
    info = dist.wait_state(job, "RUNNING")
    assert info["Restarts"] == "1", info
    dist.wait_counting(job, (stopped[0] + 10, stopped[1] + 10))
    for nums in dist.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]
    listed = dist.cluster.on_node("node1", "scontrol", "listpids", f"{job}.0").stdout
    assert len(listed.splitlines()) > 2, listed  # restored tree is managed by Slurm again
    dist.cluster.run("scancel", str(job))
    dist.cluster.wait_job(job, ("CANCELLED",), timeout=30)


def vacated_on_node2_and_node3(dist: Dist) -> tuple[int, list[int]]:
    """A 2-node job on node2+node3, counting, then vacated: (job id, lines each rank wrote)."""
    job = dist.submit("-w", "node2,node3")
    dist.wait_state(job, "RUNNING")
    dist.wait_counting(job)
    dist.ccr("create", "--stop", str(job))
    dist.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    return job, [len(n) for n in dist.counts(job)]


def test_new_job_restart_sticks_to_nodes_or_moves(dist: Dist) -> None:
    job, stopped = vacated_on_node2_and_node3(dist)

    # StickToNodes honoured: a new job, pinned to node2+node3 although node1 is idle
    out = json.loads(
        dist.ccr("restart", str(job), "--new-job", "--stick-to-nodes", "--json").stdout
    )
    job2 = int(out["slurm_job"])
    dist.track(job2)
    assert out["mode"] == "submitted" and out["nodes"] == ["node2", "node3"], out
    dist.wait_state(job2, "RUNNING")
    assert dist.nodes_of(job2) == "node[2-3]"
    dist.wait_counting(job, (stopped[0] + 5, stopped[1] + 5))  # same output files go on
    registry = dist.work / "state-node2" / "registry.db"
    row = (
        sqlite3.connect(registry)
        .execute("SELECT state, rank, node FROM steps WHERE job_id = ?", (job2,))
        .fetchone()
    )
    assert row == ("running", 0, "node2"), row

    # checkpoint the restored job, then restart it without StickToNodes: it moves to node1+2
    dist.ccr("create", "--stop", str(job2))
    info = dist.cluster.wait_job(job2, tuple(FINAL_STATES), timeout=60)
    assert info["ExitCode"] == "75:0", info
    stopped = [len(n) for n in dist.counts(job)]
    out = json.loads(dist.ccr("restart", str(job2), "--new-job", "--json").stdout)
    job3 = int(out["slurm_job"])
    dist.track(job3)
    dist.wait_state(job3, "RUNNING")
    assert dist.nodes_of(job3) == "node[1-2]"
    dist.wait_counting(job, (stopped[0] + 5, stopped[1] + 5))
    for nums in dist.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]

    # scancel reaches the restored tasks, and so does the exit status
    dist.cluster.run("scancel", str(job3))
    dist.cluster.wait_job(job3, ("CANCELLED",), timeout=30)
    wait_for(lambda: not dist.pids(), 20, "restored tasks gone after scancel")


def test_stick_to_nodes_with_a_pinned_node_down(dist: Dist) -> None:
    job, stopped = vacated_on_node2_and_node3(dist)

    dist.downed.append("node3")
    dist.cluster.scontrol("update", "nodename=node3", "state=down", "reason=ccr-test")
    for extra in ([], ["--new-job"]):
        proc = dist.ccr("restart", str(job), "--stick-to-nodes", *extra, check=False)
        assert proc.returncode == 4, proc
        assert "node3" in proc.stderr and "rank 1" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert dist.cluster.job(job)["JobState"] in FINAL_STATES  # nothing requeued
    queued = dist.cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    assert queued == [], queued  # nothing submitted

    dist.cluster.scontrol("update", "nodename=node3", "state=resume")
    dist.downed.remove("node3")
    dist.cluster.wait_idle(timeout=90)  # `idle*` (not yet responding) is still refused
    out = dist.ccr("restart", str(job), "--stick-to-nodes").stdout  # same job id, pinned
    assert "requeued on node2,node3" in out, out
    dist.wait_state(job, "RUNNING")
    assert dist.nodes_of(job) == "node[2-3]"
    dist.wait_counting(job, (stopped[0] + 5, stopped[1] + 5))
    for nums in dist.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]


def _failing_criu(work: Path, node: str, action: str) -> Path:
    wrapper = work / f"criu-{action}-on-{node}.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$SLURMD_NODENAME" = {node} ] && [ "$1" = swrk ]; then {action}; fi\n'
        'exec /usr/local/sbin/criu "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_one_node_failing_its_dump_publishes_nothing(dist: Dist) -> None:
    job = dist.submit()
    dist.wait_state(job, "RUNNING")
    dist.wait_counting(job)

    def assert_untouched(proc: subprocess.CompletedProcess[str], codes: tuple[int, ...]) -> None:
        assert proc.returncode in codes, proc
        assert "node2" in proc.stderr and "nothing was published" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        leftovers = sorted(p.name for p in dist.work.iterdir() if ".ckpt" in p.name)
        assert leftovers == [], leftovers  # no link, no generation, no staging dir
        assert dist.cluster.job(job)["JobState"] == "RUNNING"
        now = [len(n) for n in dist.counts(job)]
        dist.wait_counting(job, (now[0] + 5, now[1] + 5), timeout=20)  # nobody left stopped

    failing = dict(dist.env, CCR_CRIU=str(_failing_criu(dist.work, "node2", "exit 1")))
    # CRIU dying under ccr reads as a CRIU (5) or I/O (8) failure, depending on when it died
    assert_untouched(dist.ccr("create", "--stop", str(job), env=failing, check=False), (5, 8))

    slow = dict(dist.env, CCR_CRIU=str(_failing_criu(dist.work, "node2", "exec sleep 60")))
    t0 = time.monotonic()
    proc = dist.ccr("create", "--stop", str(job), "--max-wait", "3", env=slow, check=False)
    assert time.monotonic() - t0 < 30
    assert_untouched(proc, (6,))

    dist.ccr("create", str(job))  # and the next checkpoint works
    assert (dist.work / f"{job}.ckpt" / "job.json").exists()


def test_preemption_requeue_resume(dist: Dist) -> None:
    body = (
        f"trap '{PY} -m ccr checkpoint requeue $SLURM_JOB_ID' USR1\n"
        f"srun {PY} -m ccr run -- {PY} {dist.work}/counter.py 0.1 &\n"
        "wait $!\n"  # a trapped signal interrupts wait; the trap then vacates and requeues
        "wait\n"
    )
    job = dist.submit(body=body, header="--signal=B:USR1@60")
    dist.wait_state(job, "RUNNING")
    dist.wait_counting(job)

    # Slurm's warning signal (--signal=B:USR1@60) delivered now, to the batch shell only
    dist.cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    dist.wait_state(job, "PENDING", timeout=60)
    assert (dist.work / f"{job}.ckpt" / "job.json").exists()
    stopped = [len(n) for n in dist.counts(job)]
    # skip the cred_expire hold of a requeued job (as `ccr restart` does)
    dist.cluster.scontrol("update", f"jobid={job}", "StartTime=now+2")
    info = dist.wait_state(job, "RUNNING", timeout=60)
    assert info["Restarts"] == "1", info
    dist.wait_counting(job, (stopped[0] + 10, stopped[1] + 10))
    for nums in dist.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]
    text = (dist.work / f"job-{job}.out").read_text()
    assert "start restarts=0" in text and "start restarts=1" in text, text
