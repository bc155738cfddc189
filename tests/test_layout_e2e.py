"""One owner of the on-disk layout: `verify`, `show`, `compress`/`decompress` and `restart`
understand every checkpoint ccr writes, the multi-node whole-job one (`J.ckpt/<step>/<rank>/`)
included, and the CLI and the Python API give the same answers for the same inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import COUNTER, Ccr, numbers, wait_for

NODES = {"0": "node1", "1": "node2"}


def running_step(ccr: Ccr, job: int) -> str:
    ccr.program("counter.py", COUNTER)
    step = ccr.detach("python3", "counter.py", options=("--job-id", str(job)))
    wait_for(lambda: len(numbers(ccr.work / f"ccr-{step}.out")) > 3, what=f"{step} counting")
    return step


def multinode_checkpoint(ccr: Ccr, job: int) -> Path:
    """`J.ckpt -> J.ckpt.1/{job.json, 0/0/, 0/1/}`, as `ccr create J` of a two-node step
    publishes it (controller/node_participant.py: node dumps under
    `<staging>/<step>/<rank>/`, then the
    coordinator's signed job manifest with `ranks` and `step_ref`), without Slurm: each rank
    directory holds a real CRIU dump of a real tree, and the job manifest is written and the
    generation published by ccr's own storage functions."""
    from ccr import config
    from ccr.storage.imageset import CheckpointSeries, make_private_dir
    from ccr.storage.manifest import JOB_MANIFEST, JobManifest, ManifestKey, write_signed

    step = running_step(ccr, job)
    ccr.run("create", step)
    ccr.run("cancel", str(job))
    dump = (ccr.work / f"{step}.ckpt").resolve()
    staging = ccr.work / f".{job}.ckpt.dist-{os.getpid()}-0"
    make_private_dir(staging / "0", parents=True)
    for rank in NODES:
        shutil.copytree(dump, staging / "0" / rank)
    key = ManifestKey(config.key_file(ccr.state_dir)).load(create=False)
    assert key is not None
    manifest = JobManifest(job, [0], time.time(), "node1").to_dict()
    manifest.update(ranks={"0": NODES}, step_ref=None)
    write_signed(staging / JOB_MANIFEST, manifest, key)
    CheckpointSeries(ccr.work, f"{job}.ckpt").publish(staging)
    # Only the multi-node checkpoint is left: the local one must not answer for it.
    shutil.rmtree(dump)
    (ccr.work / f"{step}.ckpt").unlink()
    return ccr.work / f"{job}.ckpt"


def test_verify_show_convert_a_multinode_whole_job_checkpoint(ccr: Ccr) -> None:
    link = multinode_checkpoint(ccr, 72001)
    gen = link.resolve()
    ranks = [str(gen / "0" / r) for r in NODES]

    verified = json.loads(ccr.run("verify", str(link), "--json").stdout)
    assert verified["ok"] is True and verified["steps"] == ranks, verified
    for path in (gen, gen / "0", gen / "0" / "1"):  # a generation, a step, a rank
        proc = ccr.run("verify", str(path), check=False)
        assert proc.returncode == 0, proc.stderr
    pstree = next(p.name for p in (gen / "0" / "1").iterdir() if p.name.startswith("pstree"))
    (gen / "0" / "1" / pstree).write_bytes(b"tampered")
    bad = ccr.run("verify", str(link), check=False)
    assert bad.returncode == 7 and f"0/1/{pstree}" in bad.stderr, bad.stderr
    shutil.copy2(gen / "0" / "0" / pstree, gen / "0" / "1" / pstree)

    for target in (str(link), "72001", "72001.0"):
        shown = json.loads(ccr.run("show", target, "--json").stdout)["checkpoints"]
        assert [s["checkpoint"] for s in shown] == ranks, (target, shown)
        assert [s["rank"] for s in shown] == [0, 1]
        assert {s["step"] for s in shown} == {"72001.0"}
        assert all(s["generation"] == 1 and s["authenticated"] for s in shown), shown
        assert all(s["processes"] for s in shown), shown
    text = ccr.run("show", str(link)).stdout
    assert "rank 1" in text, text

    ccr.run("decompress", str(link))
    for rank in NODES:
        names = {p.name for p in (gen / "0" / rank).iterdir()}
        assert "pstree.img" in names and not any(n.endswith(".zst") for n in names), names
    assert (gen / "job.json").is_file()
    assert json.loads(ccr.run("verify", str(link), "--json").stdout)["steps"] == ranks
    ccr.run("compress", str(link), "--compress", "zstd:3")
    shown = json.loads(ccr.run("show", str(link), "--json").stdout)["checkpoints"]
    assert [s["compression"] for s in shown] == ["zstd:3", "zstd:3"], shown
    assert oct((gen / "0" / "1").stat().st_mode & 0o777) == "0o700"
    ccr.run("verify", str(link))


def test_restart_check_and_path_of_a_multinode_checkpoint(ccr: Ccr) -> None:
    link = multinode_checkpoint(ccr, 72002)
    check = json.loads(ccr.run("restart", "--check", "72002", "--json", check=False).stdout)
    integrity = [c for c in check["checks"] if c["check"] == "integrity"]
    assert len(integrity) == 2 and all(c["ok"] for c in integrity), check
    assert any("multi-node" in c["detail"] for c in check["checks"]), check
    # A multi-node checkpoint by path is not restored as local steps (two copies of one step).
    proc = ccr.run("restart", str(link), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "multi-node checkpoint" in proc.stderr and "ccr restart 72002" in proc.stderr


@contextmanager
def in_process(ccr: Ccr, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ccr's own code in this process, on ccr's state dir and work dir; Slurm's clients
    hidden (this machine has them, and a restart must not submit a job to its cluster)."""
    from ccr.engines import slurm_cli as slurm

    monkeypatch.setenv("CCR_STATE_DIR", str(ccr.state_dir))
    monkeypatch.chdir(ccr.work)
    monkeypatch.setattr(slurm, "available", lambda: False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_api_restart_of_a_multinode_job_takes_the_multinode_path(
    ccr: Ccr, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ccr.restart(J)` and `ccr restart J` both hand a multi-node checkpoint to Slurm (here:
    both verify every rank, then say that Slurm is needed), never restore it locally."""
    import ccr as api
    from ccr import cli
    from ccr.errors import CcrError, exit_code_for

    multinode_checkpoint(ccr, 72003)
    with in_process(ccr, monkeypatch):
        with pytest.raises(SystemExit) as code:
            cli.main(["restart", "72003"])
        cli_error = capsys.readouterr().err.strip()
        with pytest.raises(CcrError) as raised:
            api.restart(72003)
    assert cli_error == f"ccr: error: {raised.value}", cli_error
    assert code.value.code == exit_code_for(raised.value)
    assert "multi-node checkpoint" in str(raised.value) and "needs Slurm" in str(raised.value)


def test_restart_dispatch_hands_multinode_checkpoints_to_the_slurm_restarter(ccr: Ccr) -> None:
    """The controller's one dispatch (unit level, an injected Slurm restarter): a job whose
    newest checkpoint is multi-node goes to it; a local one never does."""
    from ccr.controller import dispatch
    from ccr.controller.multinode_restart import SlurmRestart
    from ccr.controller.runtime import Runtime
    from ccr.ids import JobRef

    link = multinode_checkpoint(ccr, 72004)
    rt = Runtime(ccr.state_dir)
    asked: list[Any] = []

    def fake(rt: Runtime, ref: JobRef, opts: dispatch.RestartOptions) -> SlurmRestart:
        asked.append((ref, opts.image_dir))
        return SlurmRestart(ref, 99, "submitted", [link.resolve() / "0"])

    opts = dispatch.RestartOptions(image_dir=ccr.work)
    outcome = dispatch.restart(rt, "72004", opts, multi_node=fake)
    assert asked == [(JobRef(72004), ccr.work)]
    assert outcome.mode == "submitted" and outcome.to_dict()["slurm_job"] == 99
    assert outcome.steps == []


def api(ccr: Ccr, code: str) -> Any:
    """What `import ccr; <code>` returns (the last line is an expression), run as a user's
    script would run it: its own process, ccr's environment, the work dir."""
    *body, last = code.strip().splitlines()
    script = "\n".join(["import json, ccr", *body, f"print(json.dumps({last}, default=str))"])
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ccr.work,
        env=ccr.env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def cli(ccr: Ccr, *args: str) -> Any:
    return json.loads(ccr.run(*args, "--json").stdout)


VOLATILE = {"pid", "supervisor_pid", "restore_time", "unpack_time", "frozen_time", "total_time"}
# The restart's phases and its peak extra memory are measurements too.
VOLATILE |= {"verify_time", "criu_time", "resume_time", "fill_time", "peak_extra_bytes"}


def same_shape(a: Any, b: Any) -> Any:
    """a with the values that differ by nature between two runs (times, PIDs) left out."""
    if isinstance(a, dict):
        return {
            k: same_shape(v, b.get(k) if isinstance(b, dict) else None)
            for k, v in a.items()
            if k not in VOLATILE and not k.startswith("created") and k != "stats"
        }
    if isinstance(a, list):
        return [same_shape(x, None) for x in a]
    return a


def test_cli_and_api_give_the_same_results(ccr: Ccr) -> None:
    step = running_step(ccr, 72005)
    assert api(ccr, "ccr.status(72005)") == cli(ccr, "status", "72005")

    by_cli = cli(ccr, "create", "72005")
    by_api = api(ccr, "ccr.create(72005).to_dict()")
    assert by_cli["generation"] == 1 and by_api["generation"] == 2
    assert set(by_cli) == set(by_api)
    assert {k: v for k, v in by_cli.items() if k in ("job_id", "step_id", "steps", "link")} == {
        k: v for k, v in by_api.items() if k in ("job_id", "step_id", "steps", "link")
    }

    for target in ("72005", step, "72005.ckpt", "72005.ckpt.2/0"):
        assert api(ccr, f"ccr.show({target!r})") == cli(ccr, "show", target)["checkpoints"]
        shown = cli(ccr, "verify", target)
        assert api(ccr, f"[str(p) for p in ccr.verify({target!r})]") == shown["steps"]

    ccr.run("cancel", "72005")
    restarted = cli(ccr, "restart", "72005")
    assert restarted["mode"] == "local"
    ccr.run("cancel", "72005")
    again = api(ccr, "[r.to_dict() for r in ccr.restart(72005)]")
    assert same_shape(again, None) == same_shape(restarted["steps"], None)
    assert [s["checkpoint"] for s in again] == [str((ccr.work / "72005.ckpt").resolve() / "0")]
    wait_for(lambda: ccr.step(step)["state"] == "running", what=f"{step} running again")
    assert api(ccr, "ccr.status(72005)") == cli(ccr, "status", "72005")
