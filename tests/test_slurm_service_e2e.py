"""Slurm as an unprivileged user: ccr-alice's batch jobs on the mini-cluster, with the node
service (`ccr daemon`) on every node and on the submit host, nothing run by alice as root.

Each node is a network + UTS namespace sharing this machine's file system, so each service
has its own socket and state dir, named by the node (`%n`): CCR_SOCKET=<root>/run/ccr-%n.sock,
CCR_STATE_DIR=<root>/state-%n, one CCR_KEY_FILE for all (checkpoints move between nodes).
Alice's environment names only the socket; her jobs inherit it (sbatch --export=ALL).

The mini-cluster tracks processes with proctrack/linuxproc (descendants of slurmstepd): a
step a service launched descends from the service, so Slurm reaches it through alice's
`ccr` client, which it does track: scancel's SIGTERM is forwarded (checkpoint, then end), a
killed client is a disconnect (the same, and the worker killed ORPHAN_GRACE later), and a
killed worker has its steps killed by the service.  The last test proves all three.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import COUNTER, REPO, criu_works, numbers, wait_for
from test_service_e2e import OPT_PYTHON, RUNUSER, ensure_users

from tests.slurm_cluster import FINAL_STATES, SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm

USER = "ccr-alice"
PY = str(OPT_PYTHON)


@dataclass
class UserCluster:
    """The mini-cluster with a ccr service per node, and alice's world on it."""

    cluster: SlurmCluster
    root: Path  # world-traversable: package copy, sockets, state dirs, alice's work dir
    work: Path  # alice's (0700)
    mark: str  # in alice's environment only: finds every process of hers these tests start
    daemons: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    jobs: list[int] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SLURM_CONF": str(self.cluster.conf),
            "CCR_SOCKET": str(self.root / "run" / "ccr-%n.sock"),
            "PYTHONPATH": str(self.root / "pkg"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "CCR_TEST_MARK": self.mark,
        }

    def as_alice(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [RUNUSER, "-u", USER, "--", *cmd],
            cwd=self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def ccr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.as_alice(PY, "-m", "ccr", *args, check=check)

    def submit(self, body: str, header: str = "", nodes: int = 2) -> int:
        script = (
            "#!/bin/bash\n"
            f"#SBATCH -N{nodes} --ntasks-per-node=1 --requeue --open-mode=append -t 10 {header}\n"
            f"#SBATCH -o {self.work}/job-%j.out\n"
            'echo "start restarts=${SLURM_RESTART_COUNT:-0} user=$(id -un)"\n' + body
        )
        out = self.as_alice("sbatch", "--parsable", input=script).stdout
        job = int(out.strip().split(";")[0])
        self.jobs.append(job)
        return job

    def counts(self, job: int, ranks: int = 2) -> list[list[int]]:
        if ranks == 1:
            return [numbers(self.work / f"ccr-{job}.0.out")]
        return [numbers(self.work / f"ccr-{job}.0.{r}.out") for r in range(ranks)]

    def wait_counting(self, job: int, beyond: list[int], timeout: float = 60) -> None:
        def ok() -> bool:
            counts = self.counts(job, len(beyond))
            return all(len(n) > b for n, b in zip(counts, beyond, strict=True))

        wait_for(ok, timeout, f"job {job} counting past {beyond}")

    def step_record(self, node: str, job: int) -> tuple[str, int, int]:
        """(state, init pid, supervisor pid) of job's step 0 in node's service registry."""
        db = sqlite3.connect(self.root / f"state-{node}" / "registry.db", timeout=30)
        try:
            row = db.execute(
                "SELECT state, init_pid, supervisor_pid FROM steps WHERE job_id = ?", (job,)
            ).fetchone()
        finally:
            db.close()
        assert row is not None, f"no step of {job} on {node}"
        return row[0], int(row[1] or 0), int(row[2] or 0)

    def marked(self) -> list[int]:
        """Every live process with this test's mark in its environment (alice's ccr clients,
        the steps the services launched or restored, their programs)."""
        found = []
        needle = f"CCR_TEST_MARK={self.mark}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat[stat.rindex(")") + 2] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
        return found


def _start_daemon(uc: UserCluster, name: str, enter: list[str]) -> None:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SLURM_CONF": str(uc.cluster.conf),
        "CCR_SOCKET": str(uc.root / "run" / "ccr-%n.sock"),
        "CCR_STATE_DIR": str(uc.root / "state-%n"),
        "CCR_KEY_FILE": str(uc.root / "manifest.key"),
        "PYTHONPATH": str(uc.root / "pkg"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log = open(uc.root / f"daemon-{name}.log", "w")  # noqa: SIM115 - the daemon's for life
    uc.daemons[name] = subprocess.Popen(
        [*enter, PY, "-m", "ccr", "daemon"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log.close()


@pytest.fixture(scope="module")
def users_cluster(slurm_cluster: SlurmCluster) -> Iterator[UserCluster]:  # noqa: F811
    if not OPT_PYTHON.exists():
        raise AssertionError("/opt/ccr is missing: run `make setup` (scripts/install-for-all.sh)")
    if not criu_works():
        pytest.fail("no working CRIU: run scripts/install-criu.sh")
    ensure_users()
    root = Path(tempfile.mkdtemp(prefix="ccr-slurm-svc-"))
    root.chmod(0o755)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "ccr", root / "pkg" / "ccr", ignore=skip)
    subprocess.run(["chmod", "-R", "a+rX", str(root / "pkg")], check=True)
    work = root / "alice"
    work.mkdir(mode=0o700)
    alice = pwd.getpwnam(USER)
    (work / "counter.py").write_text(COUNTER)
    for path in (work, work / "counter.py"):
        os.chown(path, alice.pw_uid, alice.pw_gid)
    uc = UserCluster(slurm_cluster, root, work, secrets.token_hex(8))
    host = os.uname().nodename.split(".")[0]
    try:
        _start_daemon(uc, host, [])  # the submit host's (a login node's) service
        for node in slurm_cluster.nodes:
            pid = str(slurm_cluster.slurmd_pid(node))
            _start_daemon(uc, node, ["nsenter", "-t", pid, "--net", "--uts", "--"])
        for name, proc in uc.daemons.items():
            sock = root / "run" / f"ccr-{name}.sock"
            up = lambda s=sock, p=proc: s.exists() or p.poll() is not None  # noqa: E731
            wait_for(up, 30, f"{name}'s service")
            assert proc.poll() is None, (root / f"daemon-{name}.log").read_text()
        slurm_cluster.wait_idle()
        yield uc
    finally:
        for job in uc.jobs:
            slurm_cluster.run("scancel", "--full", str(job), check=False)
        for job in uc.jobs:
            try:
                slurm_cluster.wait_job(job, tuple(FINAL_STATES), timeout=30)
            except AssertionError:
                pass
        for pid in uc.marked():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in uc.daemons.values():
            proc.send_signal(signal.SIGTERM)
        for proc in uc.daemons.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def consecutive(nums: list[int]) -> bool:
    return nums == list(range(len(nums)))


def _alice_owns_the_ranks(uc: UserCluster, job: int, nodes: list[str]) -> None:
    alice = pwd.getpwnam(USER).pw_uid
    for node in nodes:
        state, init, _ = uc.step_record(node, job)
        assert state == "running", (node, state)
        status = Path(f"/proc/{init}/status").read_text()
        assert f"Uid:\t{alice}\t{alice}\t{alice}\t{alice}" in status, status


def test_alice_preemption_requeue_resume(users_cluster: UserCluster) -> None:
    uc = users_cluster
    # README "Multi-node jobs": the preemption recipe, as alice
    body = (
        f"trap '{PY} -m ccr checkpoint requeue $SLURM_JOB_ID' USR1\n"
        f"srun {PY} -m ccr run -- {PY} {uc.work}/counter.py 0.1 &\n"
        "wait $!\n"
        "wait\n"
    )
    job = uc.submit(body, header="--signal=B:USR1@60")
    uc.cluster.wait_job(job, ("RUNNING",))
    uc.wait_counting(job, [5, 5])
    _alice_owns_the_ranks(uc, job, ["node1", "node2"])
    assert uc.cluster.job(job)["UserId"].startswith(USER)

    uc.cluster.run("scancel", "--batch", "--signal=USR1", str(job))  # Slurm's warning signal
    uc.cluster.wait_job(job, ("PENDING",), timeout=60)
    link = uc.work / f"{job}.ckpt"
    assert (link / "job.json").exists()
    alice = pwd.getpwnam(USER).pw_uid
    assert all(p.lstat().st_uid == alice for p in [link, *link.resolve().rglob("*")])
    stopped = [len(n) for n in uc.counts(job)]
    uc.cluster.scontrol("update", f"jobid={job}", "StartTime=now+2")  # skip cred_expire's hold
    info = uc.cluster.wait_job(job, ("RUNNING",), timeout=60)
    assert info["Restarts"] == "1", info
    uc.wait_counting(job, [stopped[0] + 10, stopped[1] + 10])
    for nums in uc.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]  # state resumed, none lost
    _alice_owns_the_ranks(uc, job, ["node1", "node2"])
    text = (uc.work / f"job-{job}.out").read_text()
    assert "start restarts=0 user=ccr-alice" in text and "start restarts=1" in text, text
    uc.cluster.run("scancel", str(job))
    uc.cluster.wait_job(job, ("CANCELLED",), timeout=30)
    wait_for(lambda: not uc.marked(), 30, "alice's processes gone after scancel")


def test_alice_two_node_create_and_restart(users_cluster: UserCluster) -> None:
    uc = users_cluster
    job = uc.submit(f"srun {PY} -m ccr run -- {PY} {uc.work}/counter.py 0.1\n")
    uc.cluster.wait_job(job, ("RUNNING",))
    uc.wait_counting(job, [5, 5])
    nodes = uc.cluster.run("scontrol", "show", "hostnames", uc.cluster.job(job)["NodeList"])
    ranks = nodes.stdout.split()

    created = json.loads(uc.ccr("create", str(job), "--json").stdout)  # from the submit host
    link = uc.work / f"{job}.ckpt"
    assert Path(created["path"]) == link.resolve(), created
    manifest = json.loads((link / "job.json").read_text())
    assert manifest["ranks"] == {"0": dict(zip(("0", "1"), ranks, strict=True))}, manifest
    before = [len(n) for n in uc.counts(job)]
    uc.wait_counting(job, [before[0] + 3, before[1] + 3])  # still running after create

    uc.ccr("create", "--stop", str(job))
    info = uc.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    assert info["ExitCode"] == "75:0", info
    stopped = [len(n) for n in uc.counts(job)]
    out = uc.ccr("restart", str(job)).stdout  # requeued by alice's own scontrol
    assert "requeued" in out, out
    info = uc.cluster.wait_job(job, ("RUNNING",), timeout=60)
    assert info["Restarts"] == "1", info
    uc.wait_counting(job, [stopped[0] + 10, stopped[1] + 10])
    for nums in uc.counts(job):
        assert consecutive(nums), nums[:5] + ["..."] + nums[-5:]
    _alice_owns_the_ranks(uc, job, ranks)

    # root's job is not alice's: Slurm itself refuses her srun into it, and ccr says so
    # with its permission exit code (9)
    other = uc.cluster.sbatch("-N1", "-w", "node3", "--wrap", "sleep 300")
    uc.jobs.append(other)
    uc.cluster.wait_job(other, ("RUNNING",))
    proc = uc.ccr("create", str(other), check=False)
    assert proc.returncode == 9 and proc.stderr.startswith("ccr: error:"), proc
    assert uc.cluster.job(other)["JobState"] == "RUNNING"
    assert not list(uc.work.glob(f"{other}.ckpt*"))
    uc.cluster.run("scancel", str(job), str(other))
    uc.cluster.wait_job(job, ("CANCELLED",), timeout=30)
    wait_for(lambda: not uc.marked(), 30, "alice's processes gone after scancel")


def _client_pids(uc: UserCluster, node: str, job: int) -> list[int]:
    """The pids Slurm tracks in job (linuxproc: descendants of its slurmstepds) on node."""
    out = uc.cluster.on_node(node, "scontrol", "listpids", str(job)).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()]


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            left.append(pid)
    return left


def test_scancel_ends_alices_service_launched_steps(users_cluster: UserCluster) -> None:
    """One job per node, each ended another way Slurm (or a crash) ends things: scancel
    (SIGTERM to the client, forwarded), scancel --signal=KILL (the client killed: a
    disconnect) and the service's worker killed (the service kills its steps)."""
    uc = users_cluster
    body = f"srun {PY} -m ccr run -- {PY} {uc.work}/counter.py 0.1\n"
    jobs = {node: uc.submit(body, header=f"-w {node}", nodes=1) for node in uc.cluster.nodes}
    trees: dict[str, list[int]] = {}
    for node, job in jobs.items():
        uc.cluster.wait_job(job, ("RUNNING",))
        uc.wait_counting(job, [3])
        _, init, worker = uc.step_record(node, job)
        trees[node] = _tree(init)
        assert len(trees[node]) >= 2, trees[node]  # dumb-init and the counter
        tracked = _client_pids(uc, node, job)
        # Slurm tracks alice's ccr client (its signals and KillWait reach it) ...
        clients = [p for p in tracked if b"ccr\0run" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert clients, tracked
        # ... and the step descends from the service's worker, not from slurmstepd
        assert worker in _tree(uc.daemons[node].pid)
    node_term, node_kill, node_crash = uc.cluster.nodes[:3]
    uc.cluster.run("scancel", str(jobs[node_term]))
    uc.cluster.run("scancel", "--signal=KILL", str(jobs[node_kill]))
    _, _, worker = uc.step_record(node_crash, jobs[node_crash])
    os.kill(worker, signal.SIGKILL)
    for node, job in jobs.items():
        wait_for(lambda: not _alive(trees[node]), 60, f"{node}'s step gone")  # noqa: B023
        uc.cluster.wait_job(job, tuple(FINAL_STATES), timeout=60)
    # SIGTERM and a vanished client: checkpointed before the end (the preemption rule)
    for node in (node_term, node_kill):
        state, _, _ = uc.step_record(node, jobs[node])
        assert state == "vacated", (node, state)
        assert list(uc.work.glob(f"{jobs[node]}*.ckpt")), sorted(uc.work.iterdir())
    assert uc.step_record(node_crash, jobs[node_crash])[0] == "failed"
    wait_for(lambda: not uc.marked(), 30, "nothing of alice's left running")
    for node in uc.cluster.nodes:  # and no worker left behind
        wait_for(lambda: _tree(uc.daemons[node].pid) == [uc.daemons[node].pid], 30)  # noqa: B023
