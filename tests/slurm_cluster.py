"""A real Slurm mini-cluster for tests: scripts/slurm-minicluster.sh behind a pytest fixture.

Use it from a test module with::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

    @pytest.mark.slurm
    def test_x(slurm_cluster): ...

The fixture is session-scoped: the cluster (3 nodes, node1..node3, each slurmd in its own
network + UTS namespace) starts once, after a `down` that clears leftovers from a crashed run,
and is torn down at the end of the session, also when several modules import the fixture.

It skips (never fails) only where the machine can't run the cluster: not root, no network
namespaces or bridges, or the Slurm/munge packages missing and not installable.  Set
CCR_REQUIRE_SLURM=1 to turn those skips into failures (CI that must run the Slurm tests).
Once the machine qualifies, a cluster that doesn't come up is a test failure.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm-minicluster.sh"

# Job states after which a job will not run again by itself.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

UP_TIMEOUT = 300.0  # includes apt-get install on a fresh machine
DOWN_TIMEOUT = 120.0


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class SlurmCluster:
    """A running mini-cluster; every helper runs the Slurm clients against its slurm.conf."""

    conf: Path
    base: Path
    env: dict[str, str]
    nodes: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self,
        *cmd: str,
        timeout: float = 60.0,
        check: bool = True,
        input: str | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command with SLURM_CONF set; on check failure, the message has its output."""
        proc = subprocess.run(
            list(cmd),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def srun(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("srun", *args, timeout=timeout, check=check)

    def scontrol(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("scontrol", *args, timeout=timeout, check=check)

    def sbatch(self, *args: str, script: str | None = None, cwd: str | Path | None = None) -> int:
        """Submit a job (`script` is the batch script's text, else pass --wrap); its id."""
        proc = self.run("sbatch", "--parsable", *args, input=script, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (finished jobs stay visible for MinJobAge=300 s)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(
        self, job_id: int | str, states: Sequence[str] = tuple(FINAL_STATES), timeout: float = 60.0
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (default: any final state); its record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not in {list(states)} after {timeout}s: {info}")

    def node_states(self) -> dict[str, str]:
        """sinfo's compact state of every node, e.g. {"node1": "idle", "node2": "comp"}."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every node is idle (nodes stay `completing` briefly after each job)."""
        deadline = time.monotonic() + timeout
        states = self.node_states()
        while any(states.get(n) != "idle" for n in self.nodes):
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes not idle after {timeout}s: {states}")
            time.sleep(0.1)
            states = self.node_states()

    def slurmd_pid(self, node: str) -> int:
        """PID of `node`'s slurmd; `nsenter -t PID --net --uts` enters that node."""
        return int((self.base / "run" / f"slurmd-{node}.pid").read_text().strip())

    def on_node(
        self, node: str, *cmd: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd in `node`'s network and UTS namespaces (e.g. `scontrol listpids`)."""
        enter = ["nsenter", "-t", str(self.slurmd_pid(node)), "--net", "--uts", "--"]
        return self.run(*enter, *cmd, timeout=timeout, check=check)


def _ok(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def skip_reason() -> str | None:
    """Why this machine can't run the mini-cluster, or None if it can."""
    if os.geteuid() != 0:
        return "the Slurm mini-cluster needs root"
    missing = [t for t in ("ip", "nsenter", "unshare", "runuser") if shutil.which(t) is None]
    if missing:
        return f"the Slurm mini-cluster needs {', '.join(missing)}"
    probe = f"ccr-probe{os.getpid() % 100000}"
    if not _ok(["ip", "netns", "add", probe]):
        return "`ip netns add` fails here (no network namespaces)"
    _ok(["ip", "netns", "del", probe])
    if not _ok(["ip", "link", "add", probe, "type", "bridge"]):
        return "`ip link add type bridge` fails here"
    _ok(["ip", "link", "del", probe])
    proc = _script("install", timeout=UP_TIMEOUT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"Slurm/munge packages missing and not installable: {last}"
    return None


def _skip(reason: str) -> None:
    if os.environ.get("CCR_REQUIRE_SLURM") == "1":
        pytest.fail(f"CCR_REQUIRE_SLURM=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def start_cluster() -> SlurmCluster:
    """`down` (leftovers of a crashed run), then `up`; fails the test if `up` fails."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    _script("down", timeout=DOWN_TIMEOUT)
    timings["down_before"] = time.monotonic() - t0
    t0 = time.monotonic()
    up = _script("up", timeout=UP_TIMEOUT)
    timings["up"] = time.monotonic() - t0
    if up.returncode != 0:
        _script("down", timeout=DOWN_TIMEOUT)
        pytest.fail(f"slurm-minicluster.sh up failed:\n{up.stderr}", pytrace=False)
    m = re.search(r"SLURM_CONF=(\S+)", _script("env", timeout=30).stdout)
    assert m, "slurm-minicluster.sh env printed no SLURM_CONF"
    conf = Path(shlex.split(m.group(1))[0])
    env = dict(os.environ, SLURM_CONF=str(conf))
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True, check=True
    )
    nodes = sorted(set(sinfo.stdout.split()))
    return SlurmCluster(conf=conf, base=conf.parent.parent, env=env, nodes=nodes, timings=timings)


def stop_cluster() -> subprocess.CompletedProcess[str]:
    return _script("down", timeout=DOWN_TIMEOUT)


class _Shared:
    """One cluster per session even if several test modules import the fixture (pytest then
    registers one session fixture per module): the first user starts it, the last stops it."""

    checked = False
    skip: str | None = None
    cluster: SlurmCluster | None = None
    users = 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not _Shared.checked:
        _Shared.skip = skip_reason()
        _Shared.checked = True
    if _Shared.skip is not None:
        _skip(_Shared.skip)
    if _Shared.cluster is None:
        _Shared.cluster = start_cluster()
    cluster = _Shared.cluster
    _Shared.users += 1
    try:
        yield cluster
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.cluster = None
            down = stop_cluster()
            if down.returncode != 0:
                raise AssertionError(f"slurm-minicluster.sh down failed:\n{down.stderr}")
