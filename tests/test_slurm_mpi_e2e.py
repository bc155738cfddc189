"""One MPI job across 2 nodes of the Slurm mini-cluster, checkpointed, killed, restarted.

MPICH's mpiexec (hydra) with its `manual` launcher: rank 0's task (node1) runs mpiexec and
its local proxy, rank 1's task (node2) runs the proxy mpiexec printed for it; each task is
one `srun ccr run` step, so both nodes' trees are dumped together by `ccr create J`.  The
ranks talk over TCP between the nodes (UCX), and the proxy on node2 to mpiexec on node1:
connections to outside each step, checkpointed with CCR_TCP_ESTABLISHED=1 and restored at
the same addresses (--stick-to-nodes).  The output from the checkpoint on must be an
uninterrupted run's.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import wait_for
from test_mpi_e2e import RING, _install
from test_slurm_e2e import PY, Dist, dist  # noqa: F401
from test_step_world_e2e import numbered, out_lines

from tests.slurm_cluster import FINAL_STATES, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.heavy]

STEPS, DELAY = "200", "0.05"

# $1: the shared work dir.  Each task publishes its node's address; node 0 starts mpiexec
# with the manual launcher and hands node 1 its proxy command through a file.
NODE_SCRIPT = r"""#!/bin/bash
cd "$1"
me="addr.$SLURM_NODEID"
hostname -I | awk '{print $1}' > "$me.new" && mv "$me.new" "$me"
if [ "$SLURM_NODEID" = 0 ]; then
  while [ ! -f addr.1 ]; do sleep 0.1; done
  a0=$(cat addr.0); a1=$(cat addr.1)
  mpiexec.mpich -launcher manual -localhost "$a0" -hosts "$a0,$a1" -n 2 -ppn 1 \
      ./ring.mpich STEPS DELAY | while IFS= read -r line; do
    case "$line" in
      HYDRA_LAUNCH:*) echo "${line#HYDRA_LAUNCH: }" >> launch.new ;;
      HYDRA_LAUNCH_END) mv launch.new launch; (sed -n 1p launch | bash) & ;;
      *) echo "$line" ;;
    esac
  done
  wait
else
  while [ ! -f launch ]; do sleep 0.1; done
  exec bash -c "$(sed -n 2p launch)"
fi
"""


def test_two_node_mpi_job_restarts_from_its_checkpoint(dist: Dist) -> None:  # noqa: F811
    _install()
    source = dist.work / "ring.c"
    source.write_text(RING)
    subprocess.run(
        ["mpicc.mpich", "-O2", "-o", str(dist.work / "ring.mpich"), str(source)], check=True
    )
    ref_run = subprocess.run(
        ["mpiexec.mpich", "-n", "2", str(dist.work / "ring.mpich"), STEPS, "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    ref = ref_run.stdout.split("\n")[:-1]
    script = dist.work / "mpi-node.sh"
    script.write_text(NODE_SCRIPT.replace("STEPS", STEPS).replace("DELAY", DELAY))
    script.chmod(0o755)
    dist.env["CCR_TCP_ESTABLISHED"] = "1"  # the connections between the nodes' steps

    job = dist.submit(
        header="-w node1,node2", body=f"srun {PY} -m ccr run -- {script} {dist.work}\n"
    )
    out = dist.out(job, 0)
    wait_for(lambda: len(numbered(out)) >= 15, 60, "the 2-node MPI job to get going")
    # A checkpoint that leaves the job running cannot bring TCP between nodes back (CRIU
    # lifted its network lock at once): refused up front, naming what works instead.
    dist.ccr("create", str(job))
    at_checkpoint = len(numbered(out))
    wait_for(lambda: len(numbered(out)) >= at_checkpoint + 8, 60, "the job to go on")
    assert not any(ln.startswith("DONE") for ln in out_lines(out)), "ended too soon"
    dist.cluster.run("scancel", str(job))
    dist.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    refused = dist.ccr("restart", str(job), "--new-job", "--stick-to-nodes", check=False)
    assert refused.returncode == 4 and "vacate or requeue" in refused.stderr, refused.stderr

    # A vacate holds the lock on each node until that node's ranks are restored.
    for name in ("addr.0", "addr.1", "launch"):  # the first job's launch rendezvous
        (dist.work / name).unlink(missing_ok=True)
    job = dist.submit(
        header="-w node1,node2", body=f"srun {PY} -m ccr run -- {script} {dist.work}\n"
    )
    out = dist.out(job, 0)
    wait_for(lambda: len(numbered(out)) >= 15, 60, "the 2-node MPI job to get going")
    dist.ccr("create", str(job), "--stop")
    dist.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    at_checkpoint = len(numbered(out))

    data = json.loads(
        dist.ccr("restart", str(job), "--new-job", "--stick-to-nodes", "--json").stdout
    )
    job2 = int(data["slurm_job"])
    dist.track(job2)
    assert data["mode"] == "submitted" and data["nodes"] == ["node1", "node2"], data
    info = dist.cluster.wait_job(job2, tuple(FINAL_STATES), timeout=120)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    # Vacated, the job printed nothing past the checkpoint: its whole output is exactly the
    # uninterrupted run's.
    assert out_lines(out) == ref and len(numbered(out)) > at_checkpoint, out_lines(out)[-3:]
