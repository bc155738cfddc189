"""Multi-node checkpoints on one machine: the real coordinator and node participants, real
CRIU on real trees, only Slurm's clients faked (tests/fake_slurm.py).

Each "node" is a ccr with its own state dir (CCR_STATE_DIR=.../state-%n, SLURMD_NODENAME)
running one rank of a 2-task step; `ccr create J` fans out through the fake srun exactly as
through Slurm's.  What these tests pin is what the local path already did and the
multi-node path once did not: retention with the job's keep, `checkpoint able` while a
checkpoint runs, `checkpoint error` after one failed, GPU rollback on an aborted node dump,
and the restore's permission checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import COUNTER, Ccr, criu_works, numbers, wait_for

from tests import fake_slurm

HERE = Path(__file__).resolve().parent
NODES = ["node1", "node2"]


@dataclass
class Nodes:
    """Two fake nodes sharing one work dir (the shared file system) and one manifest key."""

    ccr: Ccr  # its env: state-%n, the fake Slurm first on PATH
    jobs_file: Path

    @property
    def work(self) -> Path:
        return self.ccr.work

    def node_env(self, node: str, **extra: str) -> dict[str, str]:
        return dict(self.ccr.env, SLURMD_NODENAME=node, **extra)

    def state(self, node: str) -> Path:
        return self.work.parent / f"state-{node}"

    def start_job(self, job: int, *options: str, **extra: str) -> None:
        """A 2-task step J.0, rank r on node r+1, counting, known to the fake scontrol."""
        counter = self.work / "counter.py"
        counter.write_text(COUNTER)
        for rank, node in enumerate(NODES):
            env = self.node_env(
                node,
                SLURM_JOB_ID=str(job),
                SLURM_STEP_ID="0",
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_NNODES="2",
                **extra,
            )
            argv = [sys.executable, str(counter), "0.05"]
            self.ccr.run("run", "--detach", *options, "--", *argv, env=env)
        jobs = json.loads(self.jobs_file.read_text()) if self.jobs_file.exists() else {}
        jobs[str(job)] = {"JobState": "RUNNING", "NodeList": ",".join(NODES), "BatchFlag": "0"}
        self.jobs_file.write_text(json.dumps(jobs))
        for rank in (0, 1):
            self.wait_counting(job, rank, 3)

    def out(self, job: int, rank: int) -> Path:
        return self.work / f"ccr-{job}.0.{rank}.out"

    def wait_counting(self, job: int, rank: int, beyond: int) -> None:
        wait_for(lambda: len(numbers(self.out(job, rank))) > beyond, 30, f"rank {rank} counting")

    def still_counting(self, job: int) -> None:
        for rank in (0, 1):
            now = len(numbers(self.out(job, rank)))
            self.wait_counting(job, rank, now + 3)

    def on(self, node: str, *args: str, check: bool = True, **extra: str):  # type: ignore[no-untyped-def]
        return self.ccr.run(*args, env=self.node_env(node, **extra), check=check)

    def failing_criu(self, node: str, action: str) -> dict[str, str]:
        """The env in which CRIU on `node` first does action (`exit 1`, `sleep 3`)."""
        wrapper = self.work / f"criu-{node}-{abs(hash(action))}.sh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'if [ "$SLURMD_NODENAME" = {node} ] && [ "$1" = swrk ]; then {action}; fi\n'
            'exec /usr/local/sbin/criu "$@"\n'
        )
        wrapper.chmod(0o755)
        return dict(self.ccr.env, CCR_CRIU=str(wrapper))

    def generations(self, job: int) -> list[str]:
        return sorted(p.name for p in self.work.iterdir() if p.name.startswith(f"{job}.ckpt."))


@pytest.fixture
def nodes(ccr: Ccr, tmp_path: Path) -> Iterator[Nodes]:
    if not criu_works():
        pytest.fail("no working CRIU: run scripts/install-criu.sh")
    bin_dir = fake_slurm.install(tmp_path / "fake-slurm-bin")
    jobs_file = tmp_path / "fake-slurm-jobs.json"
    # ccr's cleanup kills by CCR_STATE_DIR in the environment: the per-node pattern is it.
    ccr.state_dir = tmp_path / "state-%n"
    ccr.env.update(
        CCR_STATE_DIR=str(ccr.state_dir),
        CCR_KEY_FILE=str(tmp_path / "manifest.key"),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_SLURM_JOBS=str(jobs_file),
        PYTHONPATH=f"{HERE.parent}:{HERE}",
    )
    yield Nodes(ccr, jobs_file)


def test_the_jobs_keep_is_kept(nodes: Nodes) -> None:
    job = 71001
    nodes.start_job(job, "--keep", "5")
    for _ in range(6):
        nodes.ccr.run("create", str(job))
    gens = nodes.generations(job)
    assert len(gens) == 5, gens
    nodes.still_counting(job)


def test_able_says_began_at_while_a_multinode_checkpoint_runs(nodes: Nodes) -> None:
    job = 71003
    nodes.start_job(job)
    assert nodes.on("node1", "checkpoint", "able", str(job)).stdout.strip() == "Yes"
    # node2's CRIU starts 4 s late: node1 has dumped and waits for the decision meanwhile.
    slow = nodes.failing_criu("node2", "sleep 4")
    proc = nodes.ccr.popen("create", str(job), env=slow)
    seen: dict[str, str] = {}

    def began_everywhere() -> bool:
        for node in NODES:
            answer = nodes.on(node, "checkpoint", "able", str(job)).stdout.strip()
            if answer.startswith("Began at"):
                seen[node] = answer
        return len(seen) == 2 or proc.poll() is not None

    wait_for(began_everywhere, 30, "the checkpoint to end or be seen")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(seen) == NODES, seen
    for node in NODES:  # and once it is over
        assert nodes.on(node, "checkpoint", "able", str(job)).stdout.strip() == "Yes"


def test_error_is_recorded_on_every_node_after_a_failed_multinode_checkpoint(
    nodes: Nodes,
) -> None:
    job = 71004
    nodes.start_job(job)
    failing = nodes.failing_criu("node2", "exit 1")
    proc = nodes.ccr.run("create", str(job), env=failing, check=False)
    assert proc.returncode in (5, 8), proc
    for node in NODES:
        answer = json.loads(nodes.on(node, "checkpoint", "error", str(job), "--json").stdout)
        assert answer["code"] == proc.returncode, (node, answer)
        assert "node2" in answer["message"] or node == "node2", (node, answer)
        assert answer["message"], (node, answer)
    assert nodes.generations(job) == []
    nodes.still_counting(job)
    nodes.ccr.run("create", str(job))  # a checkpoint that works clears it everywhere
    for node in NODES:
        answer = json.loads(nodes.on(node, "checkpoint", "error", str(job), "--json").stdout)
        assert answer["code"] == 0 and not answer["message"], (node, answer)


def test_an_aborted_node_dump_gives_the_gpu_back(nodes: Nodes, tmp_path: Path) -> None:
    job = 71005
    nodes.start_job(job)
    log = tmp_path / "gpu-log"
    log.mkdir()
    env = dict(
        nodes.failing_criu("node2", "exit 1"),
        CCR_TEST_NODE_WRAPPER=str(HERE / "fake_gpu_node.py"),
        CCR_TEST_GPU_LOG=str(log),
    )
    proc = nodes.ccr.run("create", "--stop", str(job), env=env, check=False)
    assert proc.returncode in (5, 8), proc
    reports = {p.name.split("-")[0]: json.loads(p.read_text()) for p in log.iterdir()}
    assert sorted(reports) == NODES, reports
    for node, data in reports.items():
        ops = [op for op, _ in data["ops"]]
        assert "checkpoint" in ops, (node, data)  # the fake driver did see the dump
        assert set(data["states"].values()) == {"running"}, (node, data)
    nodes.still_counting(job)


def test_restore_of_a_rank_checks_the_owner(nodes: Nodes) -> None:
    job = 71006
    nodes.start_job(job)
    nodes.ccr.run("create", str(job))
    gen = (nodes.work / f"{job}.ckpt").resolve()
    rank_dir = gen / "0" / "0"
    os.chown(rank_dir, 54321, 54321)  # neither root nor the job's owner (uid 0)
    env = nodes.node_env(
        "node3",
        SLURM_JOB_ID="71007",
        SLURM_STEP_ID="0",
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccr", "_restore-rank", str(gen), "--step", "0"],
        cwd=nodes.work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    nodes.ccr.popens.append(proc)  # killed at teardown if it restored and waits on its rank
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("_restore-rank restored a rank owned by uid 54321 (no owner check)")
    assert proc.returncode == 9, err  # PermissionDeniedError
    assert "owned by uid 54321" in err and len(err.splitlines()) == 1, err
    time.sleep(0.2)
    assert (
        not (nodes.state("node3") / "registry.db").exists()
        or "71007" not in nodes.on("node3", "list", check=False).stdout
    )
