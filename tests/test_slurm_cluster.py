"""The Slurm mini-cluster itself works: multi-node steps and batch jobs (no ccr involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm


def test_nodes_are_idle(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    assert slurm_cluster.nodes == ["node1", "node2", "node3"]
    slurm_cluster.wait_idle(timeout=30)
    assert slurm_cluster.node_states() == dict.fromkeys(slurm_cluster.nodes, "idle")


def test_srun_two_nodes(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    out = slurm_cluster.srun("-N2", "-t", "1", "hostname", timeout=30).stdout
    names = out.split()
    assert len(names) == 2
    assert len(set(names)) == 2, f"expected two distinct node names, got {names}"
    assert set(names) <= set(slurm_cluster.nodes)


def test_sbatch_runs_to_completion(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    slurm_cluster.wait_idle()  # nodes still completing an earlier step would delay the start
    out = tmp_path / "job-%j.out"
    script = "#!/bin/bash\necho start $SLURM_JOB_ID\nsrun hostname | sort\necho end\n"
    job_id = slurm_cluster.sbatch("-N2", "-t", "1", "-o", str(out), script=script, cwd=tmp_path)
    info = slurm_cluster.wait_job(job_id, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert info["ExitCode"] == "0:0", info
    lines = Path(str(out).replace("%j", str(job_id))).read_text().splitlines()
    assert lines[0] == f"start {job_id}"
    assert lines[-1] == "end"
    assert len(set(lines[1:-1])) == 2 and set(lines[1:-1]) <= set(slurm_cluster.nodes), lines
