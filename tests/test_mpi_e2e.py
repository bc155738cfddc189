"""MPI under ccr on one node: `ccr run -- mpiexec -n 2 prog`, with MPICH and Open MPI.

The program (C, built with each implementation's mpicc) has 2 ranks that each step draw a
number from their own fixed-seed generator and allreduce it; rank 0 prints the step, the
reduced value and the running sum, then `DONE` with the sum.  As in test_step_world_e2e,
a run checkpointed mid-way, killed a few lines later and restarted must print what an
uninterrupted run prints: the lines up to the kill, then again from the checkpoint on.
Each transport keeps its state elsewhere (UCX's POSIX and SysV shared memory, Open MPI's
vader segments in /dev/shm, its session directory in /tmp, the launchers' loopback TCP), so
each is a case of its own.

MPICH and Open MPI come from Debian; the session fixture installs them when missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Ccr, wait_for
from test_step_world_e2e import assert_same_as_uninterrupted, numbered, out_lines

from ccr.engines.process import ProcessIdentity

pytestmark = pytest.mark.heavy

RING = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    int steps = atoi(argv[1]);
    double delay = atof(argv[2]);
    unsigned long long x = 12345 + rank, sum = 0;
    for (int i = 0; i < steps; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned long long mine = (x >> 33) % 1000, all = 0;
        MPI_Allreduce(&mine, &all, 1, MPI_UNSIGNED_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
        sum += all;
        if (rank == 0) { printf("%d %llu %llu\n", i, all, sum); fflush(stdout); }
        if (delay > 0) usleep((useconds_t)(delay * 1e6));
    }
    if (rank == 0) { printf("DONE %llu\n", sum); fflush(stdout); }
    MPI_Finalize();
    return 0;
}
"""

STEPS = "120"
DELAY = "0.05"
PACKAGES = ["mpich", "libmpich-dev", "openmpi-bin", "libopenmpi-dev"]
BINARIES = ["mpicc.mpich", "mpiexec.mpich", "mpicc.openmpi", "mpiexec.openmpi"]

# Open MPI refuses root without these; --oversubscribe: 2 ranks may exceed the cores.
OMPI_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
IMPLS = {
    "mpich": ["mpiexec.mpich", "-n", "2"],
    "openmpi": ["mpiexec.openmpi", "--oversubscribe", "-n", "2"],
}
# (implementation, extra environment): each transport a case of its own.
CASES = {
    "mpich-ucx": ("mpich", {}),  # UCX picks POSIX shared memory (files unlinked at once)
    "mpich-ucx-sysv": ("mpich", {"UCX_TLS": "sysv,cma,self"}),  # SysV segments: IPC ns
    "openmpi-vader": ("openmpi", {**OMPI_ROOT, "OMPI_MCA_btl": "self,vader"}),
    "openmpi-tcp": ("openmpi", {**OMPI_ROOT, "OMPI_MCA_btl": "self,tcp"}),
}


def _install() -> None:
    """apt-get install the MPI packages unless their binaries are there (update once if
    the first try fails: the package lists may be missing or stale)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"cannot install {' '.join(PACKAGES)}: {proc.stderr[-2000:]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        pytest.fail(f"installed {' '.join(PACKAGES)} but {' '.join(missing)} still missing")


@pytest.fixture(scope="session")
def ring_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ring program built with each implementation's mpicc."""
    _install()
    build = tmp_path_factory.mktemp("mpi")
    source = build / "ring.c"
    source.write_text(RING)
    built = {}
    for impl in IMPLS:
        exe = build / f"ring.{impl}"
        subprocess.run([f"mpicc.{impl}", "-O2", "-o", str(exe), str(source)], check=True)
        built[impl] = exe
    return built


def _program(ccr: Ccr, ring_binaries: dict[str, Path], impl: str) -> str:
    # In the step's working directory: a private /tmp hides pytest's temporary directory.
    exe = ccr.work / f"ring.{impl}"
    shutil.copy2(ring_binaries[impl], exe)
    return str(exe)


def _reference(ccr: Ccr, job: int, cmd: list[str], env: dict[str, str]) -> list[str]:
    ccr.run("run", "--job-id", str(job), "--", *cmd, STEPS, "0", env=env, timeout=120)
    text = out_lines(ccr.work / f"ccr-{job}.0.out")
    assert text and text[-1].startswith("DONE"), text[-5:]
    return text


def _detach(ccr: Ccr, job: int, cmd: list[str], env: dict[str, str]) -> str:
    args = ("run", "--detach", "--job-id", str(job), "--", *cmd, STEPS, DELAY)
    return ccr.run(*args, env=env).stdout.strip()


def _checkpoint_kill_restart(ccr: Ccr, steps: list[str]) -> None:
    """Checkpoint every step, let them go on, kill them all, restart them all."""
    outs = [ccr.work / f"ccr-{step}.out" for step in steps]
    for out in outs:
        wait_for(lambda out=out: len(numbered(out)) >= 10, 60, "the MPI job to get going")
    counts = []
    for step in steps:
        ccr.run("create", step, "--max-wait", "60")
        counts.append(len(numbered(ccr.work / f"ccr-{step}.out")))
    for out, count in zip(outs, counts, strict=True):
        wait_for(lambda out=out, c=count: len(numbered(out)) >= c + 8, 60, "the job to go on")
    for step, out in zip(steps, outs, strict=True):
        init = ProcessIdentity.of(ccr.step(step)["init_pid"])
        assert init is not None, (ccr.step(step), out_lines(out)[-3:])
        assert not any(ln.startswith("DONE") for ln in out_lines(out)), "ended too soon"
        os.kill(init.pid, signal.SIGKILL)
    for step in steps:
        wait_for(lambda s=step: ccr.step(s)["state"] == "failed", 30, "the kill to be recorded")
    for step in steps:
        ccr.run("restart", step, "--max-wait", "60")
    for step in steps:
        wait_for(
            lambda s=step: ccr.step(s)["state"] in ("completed", "failed"), 60, "the job to end"
        )
        assert ccr.step(step)["state"] == "completed", ccr.step(step)


@pytest.mark.parametrize("case", list(CASES))
def test_mpi_job_restarts_from_its_checkpoint(
    ccr: Ccr, ring_binaries: dict[str, Path], case: str
) -> None:
    impl, extra = CASES[case]
    env = {**ccr.env, **extra}
    job = 9610 + 2 * list(CASES).index(case)
    cmd = [*IMPLS[impl], _program(ccr, ring_binaries, impl)]
    ref = _reference(ccr, job, cmd, env)
    step = _detach(ccr, job + 1, cmd, env)
    _checkpoint_kill_restart(ccr, [step])
    assert_same_as_uninterrupted(ccr.work / f"ccr-{step}.out", ref)


def test_two_open_mpi_jobs_at_once_have_their_own_session_dirs(
    ccr: Ccr, ring_binaries: dict[str, Path]
) -> None:
    """Open MPI keys its session directory by the launcher's PID, 2 in every ccr step:
    with the node's /tmp, every job on the node would use /tmp/ompi.<host>.0/pid.2, and one
    finishing removes the other's.  Each step's private /tmp has its own."""
    _, extra = CASES["openmpi-vader"]
    env = {**ccr.env, **extra}
    cmd = [*IMPLS["openmpi"], _program(ccr, ring_binaries, "openmpi")]
    ref = _reference(ccr, 9630, cmd, env)
    node_tmp = set(os.listdir("/tmp"))
    steps = [_detach(ccr, job, cmd, env) for job in (9631, 9632)]
    for step in steps:
        wait_for(lambda s=step: len(numbered(ccr.work / f"ccr-{s}.out")) >= 3, 60, "output")
    session_dirs = []
    for step in steps:
        root = Path(f"/proc/{ccr.step(step)['init_pid']}/root/tmp")
        [top] = [p for p in root.iterdir() if p.name.startswith("ompi.")]
        session = top / "pid.2"
        assert session.is_dir(), sorted(p.name for p in top.iterdir())
        session_dirs.append(os.stat(session))
    first, second = session_dirs
    assert (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino)
    assert not {n for n in set(os.listdir("/tmp")) - node_tmp if n.startswith("ompi.")}
    _checkpoint_kill_restart(ccr, steps)
    for step in steps:
        assert_same_as_uninterrupted(ccr.work / f"ccr-{step}.out", ref)
