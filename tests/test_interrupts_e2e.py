"""Ctrl-C and SIGTERM on run, create and restart: one line saying what state they left."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import COUNTER, Ccr, numbers, wait_for
from test_faults_e2e import (
    criu_processes,
    processes_with_state_dir,
    progressing,
    staging_dirs,
    start_big,
    stopped_tasks,
)

MIB = 1024  # enough memory that a dump or restore takes a moment to land a signal in


class Lines:
    """Collects a running process's output lines from a thread (reads never block a test)."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def having(self, text: str) -> list[str]:
        return [ln for ln in self.lines if text in ln]

    def join(self) -> None:
        self._thread.join(30)


def our_scratch(ccr: Ccr, purpose: str) -> list[Path]:
    """Raw-image scratch dirs in /dev/shm made by this test's ccr processes."""
    pids = {str(p) for p in processes_with_state_dir(ccr)}
    return [p for p in Path("/dev/shm").glob(f".ccr-{purpose}-*") if p.name.split("-")[2] in pids]


def criu_working(ccr: Ccr, parent: int | None = None) -> bool:
    """CRIU dumps or restores (not `criu --version`) for this test's ccr, or for parent.

    CRIU renames itself (`criu: dump ...`) over its environment, so a dump's CRIU is
    found by its parent.  Cheap enough to poll often: a restore of a GiB lasts a second.
    """
    marker = f"CCR_STATE_DIR={ccr.state_dir}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or not os.readlink(entry / "exe").endswith("/criu"):
                continue
            cmdline = (entry / "cmdline").read_bytes()
            args = cmdline.split(b"\0")
            # `criu swrk` (RPC), `criu restore --stream` (a streamed restore), or a CRIU
            # that renamed itself (`criu: dump ...`).
            if b"swrk" not in args and b"restore" not in args and not cmdline.startswith(b"criu: "):
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent or marker in (entry / "environ").read_bytes().split(b"\0"):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def slow_criu(work: Path) -> Path:
    """A CRIU that waits 3 s before a restore (`criu restore --stream`, or `criu swrk` over
    RPC), then is the real one."""
    from ccr import config

    wrapper = work / "slow-criu"
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" swrk "*|*" restore "*) sleep 3;; esac\n'
        f'exec {config.criu_binary()} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def restore_waiting(ccr: Ccr, wrapper: Path) -> bool:
    """This test's ccr runs the slow CRIU's restore (not yet exec'd)."""
    marker = f"CCR_STATE_DIR={ccr.state_dir}".encode()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if str(wrapper).encode() in cmdline and (b"swrk" in cmdline or b"restore" in cmdline):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    return True
        except OSError:
            continue
    return False


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("moment", ["unpack", "criu"])
def test_interrupted_restart_is_rolled_back(ccr: Ccr, moment: str) -> None:
    start_big(ccr, 9101, MIB)
    ccr.run("create", "9101.0", "--stop")
    wait_for(lambda: ccr.step("9101.0")["state"] == "vacated", 30, "vacate")
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "the vacated tree to go")
    seen: list[Path] = []
    if moment == "unpack":
        proc = ccr.popen("restart", "9101")
        seen = wait_for(lambda: our_scratch(ccr, "restore"), 60, "the images to be unpacked")
    else:
        # CRIU restores a GiB in well under a second, less than a poll can be sure to see
        # on a busy node: the CRIU this restart drives takes 3 s to start its restore, so
        # the interrupt lands while ccr waits on CRIU, as it would in a long restore.
        slow = slow_criu(ccr.work)
        proc = ccr.popen("restart", "9101", env=dict(ccr.env, CCR_CRIU=str(slow)))
        wait_for(lambda: restore_waiting(ccr, slow), 60, "CRIU to restore")
        seen = our_scratch(ccr, "restore")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    assert "ccr: interrupted: restore of 9101.0 rolled back, nothing running" in err, err
    assert "Traceback" not in err
    # CRIU killed, no half-restored tree, no supervisor, no scratch copy in RAM.
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "every rolled-back process to go")
    assert not [p for p in seen if p.exists()], seen
    assert ccr.step("9101.0")["state"] == "vacated"
    assert ccr.step("9101.0")["pids"] == []
    # Nothing was spoilt: the same restart works.
    ccr.run("restart", "9101")
    assert ccr.step("9101.0")["state"] == "running"
    assert progressing(ccr.work / "ccr-9101.0.out")


@pytest.mark.parametrize(
    ("options", "sig"), [((), signal.SIGINT), (("--stop",), signal.SIGTERM)], ids=["int", "term"]
)
def test_interrupted_create_leaves_the_job_running(
    ccr: Ccr, options: tuple[str, ...], sig: int
) -> None:
    out = start_big(ccr, 9102, MIB)
    proc = ccr.popen("create", "9102", *options)
    if sig == signal.SIGINT:  # while CRIU dumps
        wait_for(lambda: criu_working(ccr, proc.pid), 60, "CRIU to dump")
    else:  # while anything of it runs: dump or compression
        wait_for(lambda: staging_dirs(ccr.work), 60, "the checkpoint to begin")
    seen = our_scratch(ccr, "dump")
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 128 + sig, err
    assert err.strip().splitlines() == ["ccr: interrupted: 9102 keeps running, nothing published"]
    assert not (ccr.work / "9102.ckpt").exists()
    assert not staging_dirs(ccr.work)
    assert not [p for p in seen if p.exists()], seen
    wait_for(lambda: not criu_processes(ccr), 10, "no CRIU process left")
    assert ccr.step("9102.0")["state"] == "running"
    assert not stopped_tasks(ccr, "9102.0")
    assert progressing(out)
    error = ccr.run("checkpoint", "error", "9102").stdout
    name = signal.Signals(sig).name
    assert error.strip() == (
        f"error({128 + sig}): checkpoint of 9102 interrupted ({name}); "
        "the job is running, nothing was published"
    )
    ccr.run("create", "9102")  # and the next one works
    ccr.run("verify", str(ccr.work / "9102.ckpt"))


def test_foreground_run_asks_before_interrupting(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    proc = ccr.popen("run", "--job-id", "9103", "--", "python3", "counter.py")
    err = Lines(proc.stderr)
    out = ccr.work / "ccr-9103.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "the step to print")
    ccr.run("create", "9103")
    proc.send_signal(signal.SIGINT)
    line = wait_for(lambda: err.having("press Ctrl-C again"), 10, "the state line")[0]
    pid = ccr.step("9103.0")["pids"][0]
    assert line.startswith(f"ccr: step 9103.0 running, pid {pid}, "), line
    assert "last checkpoint " in line and "9103.ckpt" in line, line
    # One Ctrl-C alone never stops the step, however long it stays alone.
    time.sleep(1.5)
    assert proc.poll() is None
    assert ccr.step("9103.0")["state"] == "running"
    assert progressing(out)
    # Two within a second: the step gets SIGINT (Python dies of it: 128 + 2), and says so.
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    err.join()
    assert err.having(f"sending SIGINT to step 9103.0 (pid {pid})"), err.lines
    assert len(err.having("press Ctrl-C again")) == 2, err.lines
    step = ccr.step("9103.0")
    assert (step["state"], step["exit_code"]) == ("failed", 130)
    assert "KeyboardInterrupt" in out.read_text()


def test_interrupted_resume_in_a_foreground_run_is_rolled_back(ccr: Ccr) -> None:
    start_big(ccr, 9104, MIB)
    ccr.run("create", "9104", "--stop")
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "the vacated tree to go")
    # The requeued script runs the same command again: ccr resumes it, and is interrupted.
    proc = ccr.popen("run", "--job-id", "9104", "--", "python3", "big.py", str(MIB))
    wait_for(lambda: criu_working(ccr), 60, "CRIU to restore")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err
    assert "ccr: interrupted: resume of 9104.0 rolled back, nothing running" in err, err
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "every rolled-back process to go")
    assert ccr.step("9104.0")["state"] == "vacated"
    ccr.run("restart", "9104")
    assert ccr.step("9104.0")["state"] == "running"
