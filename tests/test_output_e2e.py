"""The step's output reaches ccr's own stdout/stderr (the terminal, the batch log) too."""

from __future__ import annotations

import os
import signal
import time

from conftest import COUNTER, Ccr, numbers, wait_for
from test_interrupts_e2e import Lines

from ccr.ids import NO_ARRAY_TASK


def test_foreground_run_relays_output_as_it_is_written(ccr: Ccr) -> None:
    script = "echo first; sleep 1; echo second; echo oops >&2; sleep 0.5; echo third"
    proc = ccr.popen("run", "--job-id", "9120", "--", "sh", "-c", script)
    out = Lines(proc.stdout)
    wait_for(lambda: out.lines, 30, "the first line on ccr's stdout")
    assert out.lines == ["first"]
    assert proc.poll() is None  # relayed while the step runs, not at its end
    assert proc.wait(timeout=30) == 0
    out.join()
    # Without -e, stderr goes with stdout: in the file and in the relay, in order.
    assert out.lines == ["first", "second", "oops", "third"]
    assert (ccr.work / "ccr-9120.0.out").read_text().split() == out.lines


def test_patterns_and_a_separate_error_file(ccr: Ccr) -> None:
    env = dict(ccr.env, SLURM_JOB_NAME="train")
    proc = ccr.run(
        "run",
        *("--job-id", "9121", "-o", "out-%j.%s-%x-%A_%a.log", "-e", "err-%J-%u.log"),
        *("--", "sh", "-c", "echo to-out; echo to-err >&2"),
        env=env,
    )
    out = ccr.work / f"out-9121.0-train-9121_{NO_ARRAY_TASK}.log"
    err = ccr.work / "err-9121.0-root.log"
    assert out.read_text() == "to-out\n"
    assert err.read_text() == "to-err\n"
    assert proc.stdout == "to-out\n"
    assert "to-err\n" in proc.stderr and "to-out" not in proc.stderr
    assert not (ccr.work / "ccr-9121.0.out").exists()


def test_error_file_survives_checkpoint_and_restart(ccr: Ccr) -> None:
    prog = ccr.program(
        "both.py",
        "import sys, time\n"
        "for i in range(10000):\n"
        "    print(i, flush=True); print(-i, file=sys.stderr, flush=True); time.sleep(0.05)\n",
    )
    ccr.detach(
        "python3", str(prog), options=("--job-id", "9122", "-o", "o-%j.txt", "-e", "e-%j.txt")
    )
    out, err = ccr.work / "o-9122.txt", ccr.work / "e-9122.txt"
    wait_for(lambda: len(numbers(err)) > 3, 30, "stderr lines")
    ccr.run("create", "9122", "--stop")
    err.unlink()  # recreated on restart, as the output file is
    ccr.run("restart", "9122")
    wait_for(lambda: len(numbers(err)) > 3, 30, "stderr lines after the restart")
    assert all(n <= 0 for n in numbers(err)) and all(n >= 0 for n in numbers(out))
    assert numbers(out) == list(range(len(numbers(out))))


def test_dash_keeps_the_file_in_the_state_dir_and_relays(ccr: Ccr) -> None:
    proc = ccr.run("run", "--job-id", "9123", "-o", "-", "--", "sh", "-c", "echo hi; echo ho >&2")
    assert proc.stdout == "hi\nho\n"
    kept = ccr.state_dir / "output" / "9123.0.out"
    assert kept.read_text() == "hi\nho\n"
    assert kept.parent.stat().st_mode & 0o777 == 0o700
    assert list(ccr.work.iterdir()) == []  # nothing in the working directory
    assert ccr.step("9123.0")["output"] == str(kept)


def test_a_terminal_is_refused_as_output(ccr: Ccr) -> None:
    leader, follower = os.openpty()
    try:
        name = os.ttyname(follower)
        for flag in ("-o", "-e"):
            proc = ccr.run("run", "--job-id", "9124", flag, name, "--", "true", check=False)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith(f"ccr: error: {flag} {name} is a terminal"), proc.stderr
            assert "omit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finally:
        os.close(leader)
        os.close(follower)
    status = ccr.run("status", "9124", check=False)
    assert status.returncode != 0  # nothing was started


def _relayed_until_preempted(ccr: Ccr, at_least: int) -> list[int]:
    """Run the counter in the foreground until at_least new lines came; preempt; its lines."""
    proc = ccr.popen("run", "--job-id", "9125", "--", "python3", "counter.py")
    out = Lines(proc.stdout)
    wait_for(lambda: len(out.lines) >= at_least, 60, "relayed lines")
    proc.send_signal(signal.SIGTERM)  # preemption: checkpoint, vacate, exit 75
    assert proc.wait(timeout=120) == 75
    out.join()
    return [int(x) for x in out.lines]


def test_relay_goes_on_after_a_requeue_without_repeats_or_gaps(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    first = _relayed_until_preempted(ccr, 10)
    time.sleep(0.3)
    assert ccr.step("9125.0")["state"] == "vacated"
    # The requeued batch script runs the same command again: it resumes, and its relay
    # starts where the first one stopped.
    second = _relayed_until_preempted(ccr, 10)
    assert first and second and second[0] > 0
    assert first + second == list(range(len(first) + len(second)))
    assert numbers(ccr.work / "ccr-9125.0.out") == first + second
