"""Interval checkpoints, retention, preemption (SIGTERM, --signal) and auto-resume, real CRIU."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COUNTER, Ccr, mounted_tmpfs, numbers, wait_for

from ccr.errors import EXIT_VACATED


def generations(image_dir: Path, name: str) -> list[int]:
    prefix = name + "."
    return sorted(
        int(p.name[len(prefix) :])
        for p in image_dir.iterdir()
        if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit()
    )


def checkpoints_taken(ccr: Ccr, job: int) -> int:
    last = ccr.status(job)["last_checkpoint"]
    return 0 if last is None else int(last["path"].rsplit(".", 1)[1])


def test_interval_generations_then_kill9_and_restart_rolls_back(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    step = ccr.detach("python3", "counter.py", options=("--job-id", "11", "--checkpoint", "0:02"))
    assert step == "11.0"
    out = ccr.work / "ccr-11.0.out"
    wait_for(lambda: checkpoints_taken(ccr, 11) >= 2, 60, "two interval checkpoints")
    status = ccr.status(11)
    assert status["interval_s"] == 2
    assert status["steps"][0]["next_checkpoint"] is not None
    assert len(status["steps"][0]["generations"]) >= 1
    init_pid = ccr.step("11.0")["init_pid"]
    signal_tree_kill(init_pid)
    wait_for(lambda: ccr.step("11.0")["state"] == "failed", 30, "supervisor to record the kill")
    before = numbers(out)
    assert before and before[-1] > 10
    ccr.run("restart", "11")
    wait_for(lambda: len(numbers(out)) > len(before) + 5, 30, "restored output")
    after = numbers(out)[len(before) :]
    # Rolled back to the last generation: continues from a value taken during the run
    # (not 0), no later than where it was killed, and counts on from there.
    assert 0 < after[0] <= before[-1] + 1
    assert after == list(range(after[0], after[0] + len(after)))
    ccr.run("cancel", "11")


def signal_tree_kill(init_pid: int) -> None:
    import os

    os.kill(init_pid, signal.SIGKILL)


def test_retention_keeps_exactly_n_generations(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    ccr.detach(
        "python3", "counter.py", options=("--job-id", "12", "--checkpoint", "0:01", "--keep", "2")
    )
    wait_for(lambda: checkpoints_taken(ccr, 12) >= 4, 90, "four interval checkpoints")
    ccr.run("cancel", "12")
    gens = generations(ccr.work, "12.0.ckpt")
    assert len(gens) == 2, gens
    link = (ccr.work / "12.0.ckpt").resolve()
    assert link.name == f"12.0.ckpt.{gens[-1]}"
    ccr.run("verify", str(ccr.work / "12.0.ckpt"))


def test_sigterm_checkpoints_vacates_and_same_job_resumes(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    out = ccr.work / "ccr-21.0.out"
    first = ccr.popen("run", "--job-id", "21", "--", "python3", "counter.py")
    wait_for(lambda: len(numbers(out)) > 10, 30, "output")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_VACATED, err
    assert ccr.step("21.0")["state"] == "vacated"
    assert (ccr.work / "21.0.ckpt").is_symlink()
    before = numbers(out)
    # The requeued batch script runs the same command again: it resumes, state intact.
    second = ccr.popen("run", "--job-id", "21", "--", "python3", "counter.py")
    wait_for(lambda: len(numbers(out)) > len(before) + 5, 30, "resumed output")
    after = numbers(out)[len(before) :]
    assert after[0] == before[-1] + 1, (before[-3:], after[:3])
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=120)
    assert second.returncode == EXIT_VACATED


def test_custom_signal_and_restart_dir_env(ccr: Ccr, tmp_path: Path) -> None:
    ccr.program("counter.py", COUNTER)
    ckdir = tmp_path / "ckpts"
    env = dict(ccr.env, SLURM_CHECKPOINT_DIR=str(ckdir), SLURM_JOB_ID="31")
    out = ccr.work / "ccr-31.0.out"
    proc = ccr.popen("run", "--signal", "USR1", "--", "python3", "counter.py", env=env)
    wait_for(lambda: len(numbers(out)) > 10, 30, "output")
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == EXIT_VACATED
    assert (ckdir / "31.0.ckpt").is_symlink()
    before = numbers(out)
    # A fresh state dir (e.g. another node after requeue): SLURM_RESTART_DIR alone resumes.
    env2 = dict(ccr.env, SLURM_RESTART_DIR=str(ckdir), SLURM_JOB_ID="31", SLURM_STEP_ID="0")
    env2["CCR_STATE_DIR"] = ccr.env["CCR_STATE_DIR"]
    again = ccr.popen("run", "--", "python3", "counter.py", env=env2)
    wait_for(lambda: len(numbers(out)) > len(before) + 5, 30, "resumed output")
    assert numbers(out)[len(before)] == before[-1] + 1
    again.send_signal(signal.SIGUSR1)
    again.communicate(timeout=120)


GROWER = """\
import os, sys, time
i = 0
blobs = []
while True:
    if os.path.exists("grow") and not blobs:
        blobs.append(os.urandom(64 * 2**20))  # makes the next image too big for the tmpfs
    print(i, flush=True)
    i += 1
    time.sleep(0.05)
"""


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tiny", "40m") as mnt:
        yield mnt


def test_failing_interval_checkpoint_keeps_job_and_previous_generation(
    ccr: Ccr, tiny_tmpfs: Path
) -> None:
    ccr.program("grow.py", GROWER)
    ccr.detach(
        "python3",
        "grow.py",
        options=("--job-id", "41", "--checkpoint", "0:01", "--checkpoint-dir", str(tiny_tmpfs)),
    )
    wait_for(lambda: checkpoints_taken(ccr, 41) >= 1, 60, "a first checkpoint")
    (ccr.work / "grow").touch()
    good = wait_for(
        lambda: ccr.status(41)["last_error"], 60, "an interval checkpoint to fail for lack of space"
    )
    assert "no space" in good.lower(), good
    error = ccr.run("checkpoint", "error", "41").stdout.strip()
    assert error.startswith("error(") and "no space" in error.lower()
    # The job is still running, and the last complete generation still verifies.
    assert ccr.step("41.0")["state"] == "running"
    ccr.run("verify", str(tiny_tmpfs / "41.0.ckpt"))
    ccr.run("cancel", "41")
    # An attempt may be under way while we look; once the job is gone, none may be left over.
    wait_for(
        lambda: not [p for p in tiny_tmpfs.iterdir() if ".tmp-" in p.name], 30, "no staging left"
    )


def test_able_disable_enable_nest(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", "51"))
    assert ccr.run("checkpoint", "able", "51").stdout.strip() == "Yes"
    ccr.run("checkpoint", "disable", "51")
    ccr.run("checkpoint", "disable", "51")
    assert ccr.run("checkpoint", "able", "51").stdout.strip() == "No"
    refused = ccr.run("checkpoint", "create", "51", check=False)
    assert refused.returncode != 0 and "disabled" in refused.stderr
    ccr.run("checkpoint", "enable", "51")
    assert ccr.run("checkpoint", "able", "51").stdout.strip() == "No"
    ccr.run("checkpoint", "enable", "51")
    assert ccr.run("checkpoint", "able", "51").stdout.strip() == "Yes"
    data = json.loads(ccr.run("checkpoint", "create", "51", "--json").stdout)
    assert data["path"].endswith("51.ckpt.1")
    assert ccr.run("checkpoint", "error", "51").stdout.strip() == "error(0):"
    ccr.run("cancel", "51")
