"""Node mounts that come and go while a step runs never break its checkpoint or restart.

A step's mount namespace is a private copy of the node's, made when it starts.  A node mount
unmounted later stays in the step: before ccr dropped such mounts, a file system CRIU
cannot dump itself (a USB stick, NFS: here a loop-mounted ext4) failed every dump with
`mnt: FS mnt ... unsupported`.  A node mount present at the checkpoint and unmounted
before the restart was bound by CRIU from whatever lay at its path then (the directory
beneath: the step's files silently gone), or failed the restore (`Can't stat mountpoint`)
when that path was gone too.  The mounts live under /var/tmp: the step's /tmp is its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import COUNTER, Ccr, numbers, wait_for

PY = sys.executable


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh directory for the test's node mounts; everything mounted below is unmounted."""
    top = Path("/var/tmp") / f"ccr-mounts-{uuid.uuid4().hex[:12]}"
    top.mkdir()
    try:
        yield top
    finally:
        for _ in range(4):  # stacked mounts come off one per round
            with open("/proc/self/mountinfo") as fh:
                points = [ln.split()[4] for ln in fh if f" {top}/" in ln]
            for point in sorted(points, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def tmpfs(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path))
    return path


def loop_ext4(path: Path) -> Path:
    """An ext4 file system on a loop device: a file system CRIU cannot save (like a USB
    stick or NFS), which it can only bind from the node."""
    img = path.with_name(path.name + ".img")
    sh("truncate", "-s", "8M", str(img))
    sh("mkfs.ext4", "-q", "-F", str(img))
    path.mkdir(exist_ok=True)
    sh("mount", "-o", "loop", str(img), str(path))
    return path


def bind(src: Path, dst: Path) -> Path:
    src.mkdir(exist_ok=True)
    dst.mkdir(exist_ok=True)
    sh("mount", "--bind", str(src), str(dst))
    return dst


def step_mounts(ccr: Ccr, step: str) -> list[str]:
    init = ccr.step(step)["init_pid"]
    with open(f"/proc/{init}/mountinfo") as fh:
        return [ln.split()[4] for ln in fh]


def start(ccr: Ccr, job: int, cwd: Path | None = None) -> tuple[str, Path]:
    prog = ccr.program("counter.py", COUNTER)
    step = ccr.detach(PY, str(prog), options=("--job-id", str(job)))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbers(out)) >= 3, 30, "the step to start")
    return step, out


def kill_and_restart(ccr: Ccr, step: str, out: Path, between: Callable[[], None] = lambda: None):
    os.kill(ccr.step(step)["init_pid"], signal.SIGKILL)
    wait_for(lambda: ccr.step(step)["state"] == "failed", 30, "the kill to be recorded")
    between()
    ccr.run("restart", step, "--max-wait", "60")
    count = len(numbers(out))
    wait_for(lambda: len(numbers(out)) > count + 3, 30, "the restored step to go on")


@pytest.mark.parametrize("kind", ["tmpfs", "ext4", "bind"])
def test_node_mount_unmounted_after_the_step_started(ccr: Ccr, base: Path, kind: str) -> None:
    job = {"tmpfs": 9720, "ext4": 9721, "bind": 9722}[kind]
    mnt = base / "m"
    if kind == "tmpfs":
        tmpfs(mnt)
    elif kind == "ext4":
        loop_ext4(mnt)
    else:
        bind(base / "src", mnt)
    (mnt / "only-in-the-mount").write_text("x")
    step, out = start(ccr, job)
    assert str(mnt) in step_mounts(ccr, step)
    sh("umount", str(mnt))  # the node's own: the step keeps its private copy
    ccr.run("create", step, "--max-wait", "60")
    if kind == "ext4":  # CRIU cannot save it: it left the step's namespace at the dump
        assert str(mnt) not in step_mounts(ccr, step)
    kill_and_restart(ccr, step, out)
    init = ccr.step(step)["init_pid"]
    if kind == "ext4":
        assert str(mnt) not in step_mounts(ccr, step)
    else:  # a tmpfs CRIU saves with its content; a bind CRIU binds again from its source
        assert Path(f"/proc/{init}/root{mnt}/only-in-the-mount").read_text() == "x"


def test_nsfs_of_a_deleted_netns(ccr: Ccr) -> None:
    name = f"ccr-test-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        step, out = start(ccr, 9723)
        assert f"/run/netns/{name}" not in step_mounts(ccr, step)  # left out at the start
        sh("ip", "netns", "delete", name)
        ccr.run("create", step, "--max-wait", "60")
        kill_and_restart(ccr, step, out)
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_node_mounts_added_after_the_step_started(ccr: Ccr, base: Path) -> None:
    name = f"ccr-test-{uuid.uuid4().hex[:8]}"
    try:
        step, out = start(ccr, 9724)
        tmpfs(base / "t")
        loop_ext4(base / "e")
        bind(base / "src", base / "b")
        sh("ip", "netns", "add", name)
        seen = step_mounts(ccr, step)
        assert not any(p.startswith(str(base)) for p in seen), seen  # none reach the step
        ccr.run("create", step, "--max-wait", "60")
        kill_and_restart(ccr, step, out)
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4", "tmpfs-and-its-directory"])
def test_node_mount_unmounted_between_checkpoint_and_restart(
    ccr: Ccr, base: Path, kind: str
) -> None:
    job = {"tmpfs": 9725, "ext4": 9726, "tmpfs-and-its-directory": 9727}[kind]
    mnt = loop_ext4(base / "m") if kind == "ext4" else tmpfs(base / "m")
    (mnt / "only-in-the-mount").write_text("x")
    step, out = start(ccr, job)
    ccr.run("create", step, "--max-wait", "60")

    def unmount() -> None:
        sh("umount", str(mnt))
        if kind == "tmpfs-and-its-directory":
            mnt.rmdir()

    kill_and_restart(ccr, step, out, unmount)
    # Not bound from the directory beneath: the step sees the node's path as it is now.
    assert str(mnt) not in step_mounts(ccr, step)


def test_a_gone_mount_the_step_uses_is_refused_at_the_checkpoint(ccr: Ccr, base: Path) -> None:
    mnt = loop_ext4(base / "m")
    prog = ccr.program(
        "holder.py",
        "import sys, time\n"
        f"fh = open({str(mnt / 'data')!r}, 'w')\n"
        "i = 0\n"
        "while True:\n"
        "    print(i, flush=True); fh.write('x'); fh.flush(); i += 1; time.sleep(0.05)\n",
    )
    step = ccr.detach(PY, str(prog), options=("--job-id", "9728"))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbers(out)) >= 3, 30, "the step to start")
    sh("umount", "-l", str(mnt))
    proc = ccr.run("create", step, check=False)
    assert proc.returncode == 4, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("ccr: error: ") and f"{mnt} (ext4 /dev/loop" in line, line
    assert ccr.step(step)["state"] == "running"
    count = len(numbers(out))
    wait_for(lambda: len(numbers(out)) > count + 3, 30, "the step to go on")
    assert str(mnt) in step_mounts(ccr, step)


def test_a_mount_the_step_used_at_its_checkpoint_and_gone_is_refused_at_restart(
    ccr: Ccr, base: Path
) -> None:
    mnt = tmpfs(base / "m")
    prog = ccr.program(
        "holder.py",
        "import time\n"
        f"fh = open({str(mnt / 'data')!r}, 'w')\n"
        "i = 0\n"
        "while True:\n"
        "    print(i, flush=True); i += 1; time.sleep(0.05)\n",
    )
    step = ccr.detach(PY, str(prog), options=("--job-id", "9729"))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbers(out)) >= 3, 30, "the step to start")
    ccr.run("create", step, "--max-wait", "60")
    os.kill(ccr.step(step)["init_pid"], signal.SIGKILL)
    wait_for(lambda: ccr.step(step)["state"] == "failed", 30, "the kill to be recorded")
    sh("umount", str(mnt))
    (mnt / "data").write_text("")  # a file of the same name beneath: must not be taken
    proc = ccr.run("restart", step, check=False)
    assert proc.returncode == 4, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("ccr: error: ") and str(mnt) in line, line
    assert not list(mnt.parent.glob(".*ccr-view-*")) and not list(ccr.work.glob(".*ccr-view-*"))
    tmpfs(mnt)
    (mnt / "data").write_text("")
    ccr.run("restart", step, "--max-wait", "60")  # mounted again: the restart goes ahead
    count = len(numbers(out))
    wait_for(lambda: len(numbers(out)) > count + 3, 30, "the restored step to go on")
