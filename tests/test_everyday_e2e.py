"""Everyday workloads restart exactly: an event loop on epoll with an eventfd, a periodic
timerfd and inotify; PyTorch's DataLoader with worker processes across epoch boundaries;
a worker that exits just as the dump starts (a zombie with threads, retried).

As in test_step_world_e2e: each program is deterministic and finite, run once without
interruption for the reference text, then checkpointed mid-way, killed and restarted, and
its output must be the reference's (up to the kill, then again from the checkpoint on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Ccr, wait_for
from test_step_world_e2e import assert_same_as_uninterrupted, numbered, out_lines, reference

from ccr.engines import criu as criu_engine
from ccr.engines import image_fixes
from ccr.engines.process import ProcessIdentity

PY = sys.executable

# An event loop: a periodic timerfd (50 ms) drives it; each tick writes an eventfd and,
# every 5th, one of 3 files in a watched directory; the loop prints a tick only once epoll has
# shown it the eventfd (and inotify) events the tick caused.  It reads each expiry only
# `delay` after epoll said the timer fired, so most of the time an expiry is unread: the
# state CRIU dumps as it_value 0 and would restore as a disarmed timer (the loop hangs).
EVENT_LOOP = """\
import ctypes, os, select, sys, time
delay, wdir = float(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
class itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", timespec), ("it_value", timespec)]
tfd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
assert tfd >= 0, ctypes.get_errno()
period = itimerspec(timespec(0, 50_000_000), timespec(0, 50_000_000))
assert libc.timerfd_settime(tfd, 0, ctypes.byref(period), None) == 0
efd = os.eventfd(0, os.EFD_NONBLOCK)
ifd = libc.inotify_init1(os.O_NONBLOCK)
os.makedirs(wdir, exist_ok=True)
for name in ("f0", "f1", "f2"):  # all there first: each write is one IN_CLOSE_WRITE, whether
    open(os.path.join(wdir, name), "w").close()  # or not a killed run wrote it already
assert libc.inotify_add_watch(ifd, wdir.encode(), 0x8) >= 0  # IN_CLOSE_WRITE
ep = select.epoll()
for fd in (tfd, efd, ifd):
    ep.register(fd, select.EPOLLIN)
ticks = events = notes = total = printed = 0
want = set()  # what a tick set off and epoll must show before the tick is printed
while printed < 60:
    for fd, _ in ep.poll(5):
        if fd == tfd and not want:
            time.sleep(delay)
            os.read(tfd, 8)  # the expiry count depends on the timing: not printed
            ticks += 1
            os.eventfd_write(efd, ticks)
            want = {efd}
            if ticks % 5 == 0:
                with open(os.path.join(wdir, f"f{ticks % 3}"), "w") as fh:
                    fh.write(str(ticks))
                want.add(ifd)
        elif fd == efd:
            events += os.eventfd_read(efd)
            want.discard(efd)
        elif fd == ifd:
            notes += len(os.read(ifd, 4096)) // 16
            want.discard(ifd)
    if ticks and not want and printed != ticks:
        total = (total * 31 + ticks * 7 + events + notes) % 1000003
        print(ticks, total, events, notes, flush=True)
        printed = ticks
print("DONE", ticks, total, events, notes, flush=True)
"""

# A worker process exits while its parent goes on; the parent reaps it only much later.
# The worker's main thread ends first (SYS_exit) and its other thread only once the file
# `release` exists: until then it is a zombie with a thread, which CRIU refuses to dump.
ZOMBIE_WORKER = """\
import ctypes, os, sys, threading, time
delay, release = float(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
total = child = 0
for i in range(200):
    if i == 12:
        child = os.fork()
        if child == 0:
            def last():
                while delay and not os.path.exists(release):
                    time.sleep(0.01)
                os._exit(7)
            threading.Thread(target=last).start()
            libc.syscall(60, 0)  # SYS_exit: the main thread alone ends
    if i == 150:
        _, status = os.waitpid(child, 0)
        total += os.waitstatus_to_exitcode(status)
    total = (total * 31 + i) % 1000003
    print(i, total, flush=True)
    time.sleep(delay)
print("DONE", total, flush=True)
"""

# PyTorch: a seeded shuffling DataLoader with 2 worker processes (new ones each epoch),
# 3 epochs of 16 batches; each line: the batch's number, epoch, index, sum and a running
# digest of all batches so far.
DATALOADER = """\
import sys, time
import torch
from torch.utils.data import DataLoader, Dataset
delay = float(sys.argv[1])
torch.manual_seed(1234)
class Data(Dataset):
    def __len__(self):
        return 128
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 1000, (64,), generator=g) * (i + 1)
loader = DataLoader(
    Data(), batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(99)
)
k = 0
digest = torch.zeros(64, dtype=torch.int64)
for epoch in range(3):
    for b, batch in enumerate(loader):
        digest = (digest * 3 + batch.sum(0)) % 1000003
        print(k, epoch, b, int(batch.sum()), int(digest.sum()), flush=True)
        k += 1
        time.sleep(delay)
print("DONE", int(digest.sum()), flush=True)
"""


# -- helpers --------------------------------------------------------------------------------


def init_pid(ccr: Ccr, step: str) -> int:
    return int(ccr.step(step)["init_pid"])


def kill_and_restart(ccr: Ccr, step: str, after: int, *restart_args: str) -> None:
    """Let the step print `after` more lines, SIGKILL its tree, restart it, let it finish."""
    out = ccr.work / f"ccr-{step}.out"
    count = len(numbered(out))
    wait_for(lambda: len(numbered(out)) >= count + after, 60, "the step to go on")
    init = ProcessIdentity.of(init_pid(ccr, step))
    assert init is not None and not any(ln.startswith("DONE") for ln in out_lines(out))
    os.kill(init.pid, signal.SIGKILL)
    wait_for(lambda: ccr.step(step)["state"] == "failed", 30, "the kill to be recorded")
    ccr.run("restart", step, "--max-wait", "120", *restart_args)
    wait_for(lambda: ccr.step(step)["state"] == "completed", 60, "the restored step to finish")


def step_dir(ccr: Ccr, step: str) -> Path:
    return (ccr.work / f"{step}.ckpt").resolve()


def restore_logs(ccr: Ccr, step: str) -> list[Path]:
    return sorted((ccr.state_dir / "logs").glob(f"{step}-restore-*"))


def checkpoint_with_unread_expiry(ccr: Ccr, step: str, *args: str) -> None:
    """Checkpoint until one holds a periodic timerfd with an unread expiry (most do)."""
    for _ in range(10):
        ccr.run("create", step, "--max-wait", "60", *args)
        if image_fixes.corrected_timerfds(step_dir(ccr, step))[1]:
            return
        time.sleep(0.03)
    raise AssertionError("no checkpoint caught the timer with an unread expiry")


# -- epoll, eventfd, timerfd, inotify --------------------------------------------------------


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_event_loop_with_periodic_timerfd_keeps_ticking(ccr: Ccr, compress: str) -> None:
    job = 9510 if compress == "zstd" else 9512
    prog = ccr.program("loop.py", EVENT_LOOP)
    ref = reference(ccr, job, prog, str(ccr.work / "ref-watched"))
    assert ref[-1].split()[1] == "60" and ref[-1].split()[4] != "0", ref[-1]  # inotify counted
    step = ccr.detach(
        PY, str(prog), "0.1", str(ccr.work / "watched"), options=("--job-id", str(job + 1))
    )
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbered(out)) >= 8, 60, "the loop to tick")
    checkpoint_with_unread_expiry(ccr, step, "--compress", compress)
    stored = {p.name: p.read_bytes() for p in step_dir(ccr, step).iterdir() if p.is_file()}
    kill_and_restart(ccr, step, 6)
    assert_same_as_uninterrupted(out, ref)
    notes = (restore_logs(ccr, step)[-1] / "corrections.log").read_text()
    assert "timerfd" in notes and "re-armed" in notes, notes
    # The stored checkpoint is as it was signed: the correction went into a copy.
    after = {p.name: p.read_bytes() for p in step_dir(ccr, step).iterdir() if p.is_file()}
    assert after == stored
    assert not [p for p in step_dir(ccr, step).parent.iterdir() if ".ccr-overlay" in p.name]


# -- a dump refused for a transient state is tried again -------------------------------------


def zombie_with_thread(ccr: Ccr, step: str) -> int:
    """The step's worker, once it is a zombie whose last thread still runs."""
    import psutil

    def find() -> int | None:
        for proc in psutil.Process(init_pid(ccr, step)).children(recursive=True):
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            if "State:\tZ" in status and "Threads:\t2" in status:
                return proc.pid
        return None

    return int(wait_for(find, 30, "the worker to be a zombie with a thread"))


def test_dump_of_a_zombie_with_threads_is_retried(ccr: Ccr) -> None:
    prog = ccr.program("worker.py", ZOMBIE_WORKER)
    release = ccr.work / "release"
    ref = reference(ccr, 9514, prog, str(release))
    step = ccr.detach(PY, str(prog), "0.05", str(release), options=("--job-id", "9515"))
    zombie_with_thread(ccr, step)
    # While it stays so, the dump is refused, tried again, and given up within MaxWait.
    began = time.monotonic()
    refused = ccr.run("create", step, "--max-wait", "4", check=False)
    assert refused.returncode == 5, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "Zombies with threads are not supported" in line and "times" in line, line
    assert time.monotonic() - began < 15
    assert ccr.step(step)["state"] == "running"
    # It passes: the dump that was refused at first succeeds on a later try.
    logs = ccr.state_dir / "logs"
    earlier = set(logs.glob(f"{step}-dump-*"))
    create = ccr.popen("create", step, "--max-wait", "60", "--json")
    wait_for(
        lambda: [
            d
            for d in logs.glob(f"{step}-dump-*")
            if d not in earlier and (d / "dump-try-1.log").exists()
        ],
        30,
        "a refused try",
    )
    release.touch()
    stdout, stderr = create.communicate(timeout=60)
    assert create.returncode == 0, stderr
    stats = json.loads(stdout)["stats"][step]
    assert stats["dump_attempts"] >= 2, stats
    first = Path(stats["criu_log"]).with_name("dump-try-1.log").read_text()
    assert "Zombies with threads are not supported" in first
    kill_and_restart(ccr, step, 8)
    assert_same_as_uninterrupted(ccr.work / f"ccr-{step}.out", ref)


def test_only_known_transient_refusals_are_retried(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("(00.05) Error (criu/seize.c:882): Zombies with threads are not supported\n")
    assert criu_engine.transient_reason(log) == "Zombies with threads are not supported"
    log.write_text("(00.05) Error (criu/sk-inet.c:1): Connected TCP socket, consider using\n")
    assert criu_engine.transient_reason(log) is None
    assert criu_engine.transient_reason(tmp_path / "missing.log") is None


# -- missing directories of bound Unix sockets ---------------------------------------------


def test_socket_dirs_are_made_for_the_jobs_user_only_where_they_could(tmp_path: Path) -> None:
    """Real directories: made 0700 and owned by the job's user; never in a directory that
    user could not write to; never over an existing one."""
    uid = gid = 54321
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, uid, gid)
    locked = tmp_path / "locked"  # root's, 0755: the user could not create anything here
    locked.mkdir(mode=0o755)
    existing = home / "there"
    existing.mkdir(mode=0o755)
    sockets = [home / "a" / "b" / "sock", locked / "c" / "sock", existing / "sock"]
    made = image_fixes.make_socket_dirs(sockets, uid, gid)
    assert made == [home / "a", home / "a" / "b"]
    for path in made:
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o700)
    assert not (locked / "c").exists()
    assert existing.stat().st_mode & 0o7777 == 0o755 and existing.stat().st_uid == 0


# -- PyTorch DataLoader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_installed() -> None:
    """PyTorch (CPU) in this venv: installed here once if it is not yet."""
    check = [PY, "-c", "import torch"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    errors = []
    for spec in ("torch==2.13.0+cpu", "torch==2.13.0"):
        proc = subprocess.run(
            [PY, "-m", "pip", "install", "-q", spec], capture_output=True, text=True, timeout=900
        )
        if proc.returncode == 0 and subprocess.run(check, capture_output=True).returncode == 0:
            return
        errors.append(f"{spec}: {proc.stderr.strip().splitlines()[-1:]}")
    pytest.fail(f"cannot install PyTorch: {errors}")


def pymp_dirs(step_path: Path) -> list[Path]:
    return sorted({p.parent for p in image_fixes.bound_socket_paths(step_path)})


@pytest.mark.heavy
def test_dataloader_with_workers_across_epochs(ccr: Ccr, torch_installed: None) -> None:
    prog = ccr.program("loader.py", DATALOADER)
    ref = reference(ccr, 9516, prog)
    assert len(ref) == 49 and ref[16].split()[1:3] == ["1", "0"], ref[:17]
    step = ccr.detach(PY, str(prog), "0.3", options=("--job-id", "9517"))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbered(out)) >= 3, 120, "the first batches")
    ccr.run("create", step, "--max-wait", "120")
    # Its multiprocessing sockets are in the step's own /tmp, which CRIU restores.
    assert not image_fixes.bound_socket_paths(step_dir(ccr, step))
    kill_and_restart(ccr, step, 3)
    assert_same_as_uninterrupted(out, ref)
    nums = numbered(out)
    resumed = next(nums[k] for k in range(1, len(nums)) if nums[k] <= nums[k - 1])
    assert resumed < 16, f"checkpointed in epoch {resumed // 16}, not 0"  # crossed two


@pytest.mark.heavy
def test_dataloader_on_the_nodes_tmp_gets_its_socket_dirs_back(
    ccr: Ccr, torch_installed: None
) -> None:
    """With the node's /tmp (--no-private-tmp), the multiprocessing directory of its
    listener socket may be gone at restart (tmp cleaning, a reboot): ccr makes it again."""
    prog = ccr.program("loader.py", DATALOADER)
    ref = reference(ccr, 9518, prog)
    step = ccr.detach(PY, str(prog), "0.3", options=("--job-id", "9519", "--no-private-tmp"))
    out = ccr.work / f"ccr-{step}.out"
    dirs: list[Path] = []
    try:
        wait_for(lambda: len(numbered(out)) >= 5, 120, "the first batches")
        ccr.run("create", step, "--stop", "--max-wait", "120")
        wait_for(lambda: ccr.step(step)["state"] == "vacated", 30, "the vacate")
        dirs = pymp_dirs(step_dir(ccr, step))
        assert dirs and all(d.parent == Path("/tmp") and d.name.startswith("pymp-") for d in dirs)
        for d in dirs:
            subprocess.run(["rm", "-rf", "--", str(d)], check=True)
        ccr.run("restart", step, "--max-wait", "120")
        for d in dirs:
            st = d.stat()
            assert st.st_mode & 0o7777 == 0o700 and st.st_uid == 0, d
        notes = (restore_logs(ccr, step)[-1] / "corrections.log").read_text()
        assert all(str(d) in notes for d in dirs), notes
        wait_for(lambda: ccr.step(step)["state"] == "completed", 120, "the restored step")
        assert out_lines(out) == ref  # vacated: it goes on from where it stopped
    finally:
        for d in dirs:
            subprocess.run(["rm", "-rf", "--", str(d)], check=False)
