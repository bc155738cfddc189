"""Read-only commands load only the CLI and the registry, and run no subprocess (issue 16).

Each command runs in a fresh interpreter (as `ccr` would), against a registry that holds a
job, with subprocess creation made to fail loudly; the modules it loaded are then listed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What a read-only command must never load: the engines that drive CRIU, compression, GPUs
# and Slurm, and the heavy libraries behind them (CRIU's protobufs, zstd, BLAKE3, psutil,
# rich's progress bars).
FORBIDDEN = (
    "ccr.engines.criu",
    "ccr.engines.compression",
    "ccr.engines.gpu",
    "ccr.engines.slurm_cli",
    "ccr.controller.checkpoint",
    "ccr.controller.restart",
    "pycriu",
    "google.protobuf",
    "zstandard",
    "blake3",
    "psutil",
    "rich.progress",
)

PROBE = """\
import json, os, subprocess, sys

def refuse(*args, **kwargs):
    raise AssertionError(f"a read-only command started a subprocess: {args!r}")

subprocess.Popen = refuse
os.posix_spawn = os.posix_spawnp = refuse
from ccr import cli
sys.argv = ["ccr", *json.loads(sys.argv[1])]
try:
    cli.main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["status", "7"],
    ["status", "7", "--json"],
    ["checkpoint", "able", "7"],
    ["checkpoint", "error", "7"],
    ["--help"],
    ["--version"],
    ["status", "--help"],
]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding job 7 with one (finished) step, made through the registry API."""
    from ccr.storage.registry import COMPLETED, Registry, StepRecord

    state = tmp_path_factory.mktemp("state")
    with Registry.open(state) as db:
        db.ensure_job(7, str(state))
        db.put_step(
            StepRecord(
                job_id=7,
                step_id=0,
                argv=["true"],
                cwd=str(state),
                output=str(state / "out"),
                state=COMPLETED,
                init_pid=None,
                init_start=None,
                supervisor_pid=None,
                started=0.0,
            )
        )
    return state


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_read_only_command_loads_no_engine(state_dir: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"CCR_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), proc.stdout + proc.stderr
    loaded = [
        m for m in report["modules"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert loaded == [], f"ccr {' '.join(args)} loaded {loaded}"
    assert "a read-only command started a subprocess" not in proc.stderr


FORWARD_PROBE = """\
import json, sys
from ccr.service import client

def forwarded(argv, stdio=(0, 1, 2)):
    print(json.dumps({"argv": argv, "modules": sorted(sys.modules)}), file=sys.stderr)
    return 0

client.call = forwarded
from ccr import entrypoint
sys.argv = ["ccr", "create", "7"]
try:
    entrypoint.main()
except SystemExit:
    pass
"""


def test_a_command_for_the_service_is_forwarded_before_typer_loads(tmp_path: Path) -> None:
    """The client (every user's `ccr`) imports neither typer nor ccr's controller: the
    service's worker has them loaded (they cost the client ~60 ms a call)."""
    import socket as socket_module

    path = tmp_path / "svc.sock"
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # a live root-owned socket: root's ccr goes to it (CCR_SOCKET)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FORWARD_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            env={"CCR_SOCKET": str(path), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
        )
    finally:
        listener.close()
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["argv"] == ["create", "7"]
    heavy = [
        m
        for m in report["modules"]
        if m.split(".")[0] in ("typer", "click", "rich") or m.startswith("ccr.controller")
    ]
    assert heavy == []
