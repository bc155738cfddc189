"""Faults a checkpoint must survive (MaxWait, ccr killed, full disk, bad images): nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import COUNTER, Ccr, mounted_tmpfs, numbers, wait_for

from ccr.storage.manifest import MANIFEST, ManifestKey, read_json, write_signed

# A step holding `MIB` MiB of populated memory, printing a counter: big enough that a dump
# takes a noticeable time, so a fault can land in the middle of it.
BIG = """\
import os, sys, time
blob = bytearray(os.urandom(1 << 20)) * int(sys.argv[1])
i = 0
while True:
    print(i, flush=True)
    i += 1
    time.sleep(0.05)
"""


def progressing(out: Path) -> bool:
    before = len(numbers(out))
    time.sleep(0.5)
    return len(numbers(out)) > before


def stopped_tasks(ccr: Ccr, step: str) -> list[int]:
    stopped = []
    for pid in ccr.step(step)["pids"]:
        try:
            if psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                stopped.append(pid)
        except psutil.NoSuchProcess:
            pass
    return stopped


def processes_with_state_dir(ccr: Ccr) -> list[int]:
    marker = f"CCR_STATE_DIR={ccr.state_dir}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            if marker in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                found.append(proc.pid)
        except OSError:
            continue
    return found


def criu_processes(ccr: Ccr) -> list[int]:
    """CRIU processes (criu itself or helpers it forked) that ran for this test's ccr."""
    found = []
    for pid in processes_with_state_dir(ccr):
        try:
            if Path(os.readlink(f"/proc/{pid}/exe")).name == "criu":
                found.append(pid)
        except OSError:
            continue
    return found


def start_big(ccr: Ccr, job: int, mib: int = 1024) -> Path:
    ccr.program("big.py", BIG)
    ccr.detach("python3", "big.py", str(mib), options=("--job-id", str(job)))
    out = ccr.work / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 60, "the big step to start")
    return out


def staging_dirs(image_dir: Path) -> list[Path]:
    return [p for p in image_dir.iterdir() if ".tmp-" in p.name]


def test_maxwait_abandons_dump_job_keeps_running(ccr: Ccr) -> None:
    out = start_big(ccr, 61)
    proc = ccr.run("create", "61", "--max-wait", "0.05", check=False)
    assert proc.returncode == 6, proc.stderr
    assert "MaxWait" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (ccr.work / "61.ckpt").exists()
    assert not staging_dirs(ccr.work)
    assert ccr.step("61.0")["state"] == "running"
    assert not stopped_tasks(ccr, "61.0")
    # Nor any CRIU helper (e.g. its vdso probe child, stopped for its parent to trace).
    wait_for(lambda: not criu_processes(ccr), 10, "no CRIU process left")
    assert progressing(out)
    assert "MaxWait" in ccr.run("checkpoint", "error", "61").stdout
    # And with time enough, the same checkpoint works.
    ccr.run("create", "61", "--max-wait", "300")
    ccr.run("verify", str(ccr.work / "61.ckpt"))


def test_maxwait_abandons_restore_without_leftovers(ccr: Ccr) -> None:
    start_big(ccr, 62)
    ccr.run("create", "62.0", "--stop")
    wait_for(lambda: ccr.step("62.0")["state"] == "vacated", 30, "vacate")
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "the vacated tree to go")
    proc = ccr.run("restart", "62", "--max-wait", "0.05", check=False)
    assert proc.returncode == 6, proc.stderr
    assert "MaxWait" in proc.stderr
    # No half-restored tree (nor its supervisor) is left behind.
    wait_for(lambda: not processes_with_state_dir(ccr), 30, "rolled-back processes to go")
    assert ccr.step("62.0")["state"] != "running"
    ccr.run("restart", "62", "--max-wait", "300")
    assert ccr.step("62.0")["state"] == "running"


def test_concurrent_creates_are_serialized(ccr: Ccr) -> None:
    start_big(ccr, 63)
    first = ccr.popen("create", "63.0")
    wait_for(lambda: staging_dirs(ccr.work), 30, "the first checkpoint to start")
    second = ccr.run("create", "63.0", "--max-wait", "0.01", check=False)
    assert second.returncode == 6
    assert "another checkpoint of job 63" in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 0
    ccr.run("create", "63.0", "--max-wait", "300")
    assert (ccr.work / "63.0.ckpt").resolve().name == "63.0.ckpt.2"


@pytest.mark.parametrize("mode", ["leave-running", "stop"])
def test_sigkill_of_ccr_mid_dump(ccr: Ccr, mode: str) -> None:
    out = start_big(ccr, 64)
    ccr.run("create", "64.0")  # an earlier good checkpoint that must survive
    good = (ccr.work / "64.0.ckpt").resolve()
    args = ["create", "64.0"] + (["--stop"] if mode == "stop" else [])
    victim = ccr.popen(*args)
    wait_for(lambda: staging_dirs(ccr.work), 30, "the dump to start")
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    # The job runs on (a stopped vacate is resumed by its supervisor), the newest visible
    # checkpoint is still the earlier good one, and the next create works and cleans up.
    wait_for(lambda: ccr.step("64.0")["state"] == "running", 30, "the step to be running")
    wait_for(lambda: not stopped_tasks(ccr, "64.0"), 30, "no stopped task")
    assert progressing(out)
    assert (ccr.work / "64.0.ckpt").resolve() == good
    ccr.run("verify", str(ccr.work / "64.0.ckpt"))
    ccr.run("create", "64.0")
    assert not staging_dirs(ccr.work)
    dead = [p for p in Path("/dev/shm").glob(".ccr-*") if f"-{victim.pid}-" in p.name]
    assert dead == [], dead  # no raw images of the killed ccr left in RAM
    assert (ccr.work / "64.0.ckpt").resolve().name == "64.0.ckpt.2"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small", "300m") as mnt:
        yield mnt


def test_disk_full_during_dump(ccr: Ccr, small_tmpfs: Path) -> None:
    out = start_big(ccr, 65, mib=200)
    ccr.run("create", "65.0", "--image-dir", str(small_tmpfs))
    proc = ccr.run("create", "65.0", "--image-dir", str(small_tmpfs), check=False)
    assert proc.returncode == 8, proc.stderr
    assert "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert ccr.step("65.0")["state"] == "running" and progressing(out)
    assert (small_tmpfs / "65.0.ckpt").resolve().name == "65.0.ckpt.1"
    ccr.run("verify", str(small_tmpfs / "65.0.ckpt"))
    assert not staging_dirs(small_tmpfs)


def vacated_checkpoint(ccr: Ccr, job: int) -> Path:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", str(job)))
    wait_for(lambda: len(numbers(ccr.work / f"ccr-{job}.0.out")) > 3, 30, "output")
    ccr.run("create", f"{job}.0", "--stop")
    wait_for(lambda: ccr.step(f"{job}.0")["state"] == "vacated", 30, "vacate")
    return (ccr.work / f"{job}.0.ckpt").resolve()


def assert_refused(ccr: Ccr, job: int, *needles: str) -> None:
    proc = ccr.run("restart", str(job), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert ccr.step(f"{job}.0")["state"] == "vacated"  # nothing was started
    verdict = ccr.run("verify", str(ccr.work / f"{job}.0.ckpt"), check=False)
    assert verdict.returncode != 0


def test_corrupted_image_refused(ccr: Ccr) -> None:
    ckpt = vacated_checkpoint(ccr, 66)
    pages = max(ckpt.glob("pages-*"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))
    assert_refused(ccr, 66, pages.name, "corrupted")


def test_truncated_image_refused(ccr: Ccr) -> None:
    ckpt = vacated_checkpoint(ccr, 67)
    pages = max(ckpt.glob("pages-*"), key=lambda p: p.stat().st_size)
    os.truncate(pages, pages.stat().st_size // 2)
    assert_refused(ccr, 67, pages.name, "truncated")


def test_missing_image_file_refused(ccr: Ccr) -> None:
    ckpt = vacated_checkpoint(ccr, 68)
    (ckpt / "pstree.img").unlink()
    assert_refused(ccr, 68, "pstree.img", "missing")


def test_tampered_manifest_refused(ccr: Ccr) -> None:
    ckpt = vacated_checkpoint(ccr, 69)
    data = read_json(ckpt / MANIFEST)
    data["argv"] = ["sh", "-c", "evil"]
    (ckpt / MANIFEST).write_text(json.dumps(data))
    assert_refused(ccr, 69, "authentication")


def test_incompatible_criu_version_refused(ccr: Ccr) -> None:
    ckpt = vacated_checkpoint(ccr, 70)
    data = read_json(ckpt / MANIFEST)
    data.pop("hmac")
    data["criu_version"] = "99.0"
    key = ManifestKey(ccr.state_dir / "manifest.key").load(create=False)
    assert key is not None
    write_signed(ckpt / MANIFEST, data, key)
    proc = ccr.run("restart", "70", check=False)
    assert proc.returncode != 0 and "CRIU 99.0" in proc.stderr
    assert ccr.step("70.0")["state"] == "vacated"


def test_restart_after_kill_never_collides_on_pids(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", "71"))
    out = ccr.work / "ccr-71.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    ccr.run("create", "71.0")
    os.kill(ccr.step("71.0")["init_pid"], signal.SIGKILL)
    # Restart at once, while the killed tree may still linger as zombies: its PIDs are
    # namespace-private, so they are free in the fresh namespace whatever the host holds.
    wait_for(lambda: ccr.step("71.0")["state"] == "failed", 30, "the kill to be recorded")
    ccr.run("restart", "71")
    root = ccr.step("71.0")["init_pid"]
    status = Path(f"/proc/{root}/status").read_text()
    nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()
    assert nspid[-1] == "1"
    wait_for(lambda: progressing(out), 30, "restored output")


def test_restart_with_deleted_output_and_cwd(ccr: Ccr, tmp_path: Path) -> None:
    ckpt = vacated_checkpoint(ccr, 72)
    out = ccr.work / "ccr-72.0.out"
    out.unlink()
    ccr.run("restart", "72")
    wait_for(lambda: len(numbers(out)) > 3, 30, "output in the recreated file")
    ccr.run("cancel", "72")
    assert ckpt.exists()
    # A vanished working directory is named plainly.
    cwd = tmp_path / "gone"
    cwd.mkdir()
    (cwd / "counter.py").write_text(COUNTER)
    ccr.run(
        "run",
        "--detach",
        "--job-id",
        "73",
        "--checkpoint-dir",
        str(ccr.work),
        "--",
        "python3",
        "counter.py",
        cwd=cwd,
    )
    wait_for(lambda: len(numbers(cwd / "ccr-73.0.out")) > 3, 30, "output")
    ccr.run("create", "73.0", "--stop")
    shutil.rmtree(cwd)
    proc = ccr.run("restart", "73", check=False)
    assert proc.returncode != 0 and "working directory" in proc.stderr and str(cwd) in proc.stderr


def test_bad_image_dirs(ccr: Ccr, tmp_path: Path) -> None:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", "74"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = ccr.run("create", "74", "--image-dir", str(a_file), check=False)
    assert proc.returncode == 8 and "Traceback" not in proc.stderr
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        proc = ccr.run("create", "74", "--image-dir", str(ro), check=False)
        assert proc.returncode == 8 and "read-only" in proc.stderr, proc.stderr
    proc = ccr.run("restart", "74", "--image-dir", str(a_file), check=False)
    assert proc.returncode == 8 and "not a directory" in proc.stderr
    assert ccr.step("74.0")["state"] == "running"


def test_images_are_private_whatever_the_umask(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    env = dict(ccr.env)
    ccr.run("run", "--detach", "--job-id", "75", "--", "python3", "counter.py", env=env)
    old = os.umask(0)
    try:
        ccr.run("create", "75")
    finally:
        os.umask(old)
    ckpt = (ccr.work / "75.ckpt").resolve()
    for path in [ckpt, *ckpt.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert (ccr.state_dir / "manifest.key").stat().st_mode & 0o777 == 0o600


def test_concurrent_dumps_of_two_jobs_and_a_stale_parasite_dir(ccr: Ccr) -> None:
    # CRIU's parasite creates `proc.crtools` in the root task's cwd ("/" for dumb-init) when
    # the root has no procfs of its own: concurrent dumps must not collide on it, and a
    # leftover one must not break dumps.  Steps now have their own /proc, so their dumps
    # never need it (and never touch a stale one: it is not theirs).
    scratch = Path("/proc.crtools")
    made = not scratch.exists()
    if made:
        scratch.mkdir()
    ccr.program("counter.py", COUNTER)
    for job in ("76", "77"):
        ccr.detach("python3", "counter.py", options=("--job-id", job, "--checkpoint", "0:01"))
    wait_for(
        lambda: all(
            (ccr.status(j)["last_checkpoint"] or {}).get("path", "").endswith(".ckpt.4")
            for j in ("76", "77")
        ),
        90,
        "four interval checkpoints of each job",
    )
    for job in ("76", "77"):
        assert ccr.status(job)["last_error"] is None
        ccr.run("cancel", job)
    if made:
        scratch.rmdir()
