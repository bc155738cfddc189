"""A step is a small world of its own: its /proc, /dev/shm, /tmp, IPC and in-step TCP.

Every program here is deterministic and finite: it prints numbered lines, then `DONE` with
a digest of its whole state.  Run once by `ccr run` without interruption (no delay) it gives
the reference text.  Run again, checkpointed mid-way, killed a few lines later and
restarted, it must print the same text: the lines up to the kill, then again from the
checkpoint on (the restored tree repeats what it did after the checkpoint), and the same
`DONE` line.  State that did not come back as it was at the checkpoint (a shared memory
block left as it was at the kill, a file in /tmp, a TCP stream) shows as a different line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import Ccr, wait_for

from ccr.engines import criu as criu_engine
from ccr.engines.process import ProcessIdentity
from ccr.errors import MaxWaitExceeded

PY = sys.executable

# multiprocessing.shared_memory shared by a parent and its child: the child adds the
# parent's step number to a counter in the shared block, the parent prints the block.
SHARED_MEMORY = """\
import os, sys, time
from multiprocessing import shared_memory
delay, name = float(sys.argv[1]), sys.argv[2]
shm = shared_memory.SharedMemory(create=True, size=16, name=name)
buf = shm.buf
r, w = os.pipe()
r2, w2 = os.pipe()
if os.fork() == 0:
    while True:
        step = int.from_bytes(os.read(r, 8), "little")
        total = int.from_bytes(buf[0:8], "little") + step * step
        buf[0:8] = total.to_bytes(8, "little")
        os.write(w2, b"k")
for i in range(120):
    os.write(w, i.to_bytes(8, "little"))
    os.read(r2, 1)
    print(i, int.from_bytes(buf[0:8], "little"), len(os.listdir("/dev/shm")), flush=True)
    time.sleep(delay)
print("DONE", int.from_bytes(buf[0:8], "little"), flush=True)
shm.unlink()  # (its resource tracker, restored with the tree, would warn of a leak)
"""

# psutil and /proc about the process itself, inside the step (its own procfs).  A fresh
# psutil.Process() each step; the one made at start only for what does not check the
# process's start time (which a restored process cannot keep: see README).
PSUTIL = """\
import os, sys, time, psutil
delay = float(sys.argv[1])
first = psutil.Process()
total = 0
for i in range(120):
    me = psutil.Process()
    stat_pid = int(open("/proc/self/stat").read().split()[0])
    same = me.pid == first.pid == os.getpid() == stat_pid == int(os.readlink("/proc/self"))
    st = me.status() in ("running", "sleeping") and me.memory_info().rss > 0
    total += me.ppid() + len(first.cmdline()) + first.num_threads() + len(me.children())
    print(i, same, st, me.pid, me.ppid(), me.name(), me.num_threads(), total, flush=True)
    time.sleep(delay)
print("DONE", total, flush=True)
"""

# A file in /tmp rewritten every step (its content is the running state).
TMP_FILE = """\
import os, sys, time
delay, name = float(sys.argv[1]), sys.argv[2]
path = os.path.join("/tmp", name)
with open(path, "w") as fh:
    fh.write("0")
for i in range(120):
    with open(path) as fh:
        value = int(fh.read()) * 3 % 1000003 + i
    with open(path + ".new", "w") as fh:
        fh.write(str(value))
    os.rename(path + ".new", path)
    print(i, value, flush=True)
    time.sleep(delay)
print("DONE", open(path).read(), flush=True)
"""

# A TCP server and its client over 127.0.0.1, both in the step: the client sends its
# counter, the server answers with a running sum the client prints.
TCP_PAIR = """\
import os, socket, sys, time
delay = float(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR, as servers set it (README)
port = srv.getsockname()[1]
if os.fork() == 0:
    conn, _ = srv.accept()
    f = conn.makefile("rwb", buffering=0)
    total = 0
    while line := f.readline():
        total += int(line) * 7
        f.write(f"{total}\\n".encode())
    os._exit(0)
c = socket.create_connection(("127.0.0.1", port))
f = c.makefile("rwb", buffering=0)
for i in range(120):
    f.write(f"{i}\\n".encode())
    print(i, int(f.readline()), flush=True)
    time.sleep(delay)
f.close()
c.close()
os.wait()
print("DONE", flush=True)
"""

# A SysV shared memory segment (shmget/shmat through ctypes) a parent and child share.
SYSV_SHM = """\
import ctypes, os, sys, time
delay = float(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
shmid = libc.shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
assert shmid >= 0, ctypes.get_errno()
cell = ctypes.c_uint64.from_address(libc.shmat(shmid, None, 0))
libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once both detach (the segment stays attached)
r, w = os.pipe()
r2, w2 = os.pipe()
if os.fork() == 0:
    while True:
        step = int.from_bytes(os.read(r, 8), "little")
        cell.value = (cell.value * 31 + step) % (1 << 61)
        os.write(w2, b"k")
for i in range(120):
    os.write(w, i.to_bytes(8, "little"))
    os.read(r2, 1)
    print(i, cell.value, flush=True)
    time.sleep(delay)
print("DONE", cell.value, flush=True)
"""

DELAY = "0.05"


# -- helpers --------------------------------------------------------------------------------


def out_lines(path: Path) -> list[str]:
    try:
        return path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []


def numbered(path: Path) -> list[int]:
    return [int(ln.split()[0]) for ln in out_lines(path) if ln[:1].isdigit()]


def reference(ccr: Ccr, job: int, prog: Path, *args: str) -> list[str]:
    """The program's whole output from one uninterrupted `ccr run` (no delay)."""
    ccr.run("run", "--job-id", str(job), "--", PY, str(prog), "0", *args, timeout=120)
    text = out_lines(ccr.work / f"ccr-{job}.0.out")
    assert text and text[-1].startswith("DONE"), text[-5:]
    return text


def interrupted(ccr: Ccr, job: int, prog: Path, *args: str, options: tuple[str, ...] = ()) -> Path:
    """Run prog as a step; checkpoint it mid-way, let it go on, kill it, restart it, and
    return its output file once the restored tree has finished."""
    step = ccr.detach(PY, str(prog), DELAY, *args, options=("--job-id", str(job), *options))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbered(out)) >= 10, 60, "the step to get going")
    ccr.run("create", step, "--max-wait", "60")
    at_checkpoint = len(numbered(out))
    wait_for(lambda: len(numbered(out)) >= at_checkpoint + 8, 60, "the step to go on")
    init = ProcessIdentity.of(ccr.step(step)["init_pid"])
    assert init is not None and not any(ln.startswith("DONE") for ln in out_lines(out))
    os.kill(init.pid, signal.SIGKILL)
    wait_for(lambda: ccr.step(step)["state"] == "failed", 30, "the kill to be recorded")
    ccr.run("restart", step, "--max-wait", "60")
    wait_for(lambda: ccr.step(step)["state"] == "completed", 60, "the restored step to finish")
    return out


def assert_same_as_uninterrupted(out: Path, ref: list[str]) -> None:
    """Output = ref up to the kill, then ref again from the checkpoint on, to its end."""
    got = out_lines(out)
    nums = [int(ln.split()[0]) if ln[:1].isdigit() else None for ln in got]
    # Where the restored tree's output starts: the first line numbered below its previous.
    cut = next(
        (k for k in range(1, len(nums)) if nums[k] is not None and nums[k] <= nums[k - 1]),  # type: ignore[operator]
        None,
    )
    assert cut is not None, "no repeated lines: the kill did not follow the checkpoint"
    before, after = got[:cut], got[cut:]
    assert before == ref[: len(before)], "output before the kill differs from the reference"
    assert after == ref[len(ref) - len(after) :], (
        "the restored step's output differs from an uninterrupted run's:\n"
        + "\n".join(
            f"got {a!r} want {b!r}"
            for a, b in zip(after, ref[-len(after) :], strict=False)
            if a != b
        )
    )
    resumed_at = nums[cut]
    assert resumed_at is not None and 0 < resumed_at < len(before), (
        f"restored at line {resumed_at}: not from the checkpoint"
    )


# -- tests ----------------------------------------------------------------------------------


def test_shared_memory_continues_from_the_checkpoint(ccr: Ccr) -> None:
    prog = ccr.program("shm.py", SHARED_MEMORY)
    names = [f"ccr-world-{uuid.uuid4().hex}" for _ in range(2)]
    ref = reference(ccr, 9310, prog, names[0])
    assert ref[0].split()[2] == "1", ref[0]  # the step's /dev/shm holds its block alone
    try:
        out = interrupted(ccr, 9311, prog, names[1])
        assert_same_as_uninterrupted(out, ref)
        assert not Path("/dev/shm", names[1]).exists()  # never in the node's /dev/shm
    finally:
        for name in names:  # (only ever there without a /dev/shm of the step's own)
            Path("/dev/shm", name).unlink(missing_ok=True)


def test_psutil_reads_its_own_process_before_and_after_restore(ccr: Ccr) -> None:
    prog = ccr.program("ps.py", PSUTIL)
    ref = reference(ccr, 9312, prog)
    assert ref[0].split()[1:3] == ["True", "True"], ref[0]
    out = interrupted(ccr, 9313, prog)
    assert_same_as_uninterrupted(out, ref)


def test_private_tmp_is_checkpointed_and_not_the_nodes(ccr: Ccr) -> None:
    prog = ccr.program("tmpfile.py", TMP_FILE)
    name = f"ccr-world-{uuid.uuid4().hex}"
    ref = reference(ccr, 9314, prog, name)
    step = ccr.detach(PY, str(prog), "0.2", name, options=("--job-id", "9315"))
    wait_for(lambda: len(numbered(ccr.work / f"ccr-{step}.out")) >= 2, 30, "output")
    assert not Path("/tmp", name).exists(), "the step's /tmp file is on the node's /tmp"
    root = ccr.step(step)["init_pid"]
    assert Path(f"/proc/{root}/root/tmp/{name}").exists()  # it is in the step's own /tmp
    ccr.run("cancel", step)
    out = interrupted(ccr, 9316, prog, name)
    assert_same_as_uninterrupted(out, ref)
    assert not Path("/tmp", name).exists()


def test_no_private_tmp_shares_the_nodes_tmp(ccr: Ccr) -> None:
    prog = ccr.program("tmpfile.py", TMP_FILE)
    name = f"ccr-world-{uuid.uuid4().hex}"
    shared = Path("/tmp", name)
    try:
        step = ccr.detach(
            PY, str(prog), "0.1", name, options=("--job-id", "9317", "--no-private-tmp")
        )
        out = ccr.work / f"ccr-{step}.out"
        wait_for(lambda: len(numbered(out)) >= 3, 30, "output")
        wait_for(shared.exists, 10, "the step's file in the node's /tmp")
        ccr.run("create", step, "--stop")
        wait_for(lambda: ccr.step(step)["state"] == "vacated", 30, "vacate")
        ccr.run("restart", step)
        count = len(numbered(out))
        wait_for(lambda: len(numbered(out)) > count + 3, 30, "the restored step to go on")
        assert shared.exists()
    finally:
        for path in (shared, shared.with_name(name + ".new")):
            path.unlink(missing_ok=True)


def test_tcp_pair_inside_the_step_continues(ccr: Ccr) -> None:
    prog = ccr.program("tcp.py", TCP_PAIR)
    ref = reference(ccr, 9318, prog)
    out = interrupted(ccr, 9319, prog)
    assert_same_as_uninterrupted(out, ref)
    ckpt = (ccr.work / "9319.0.ckpt").resolve()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["tcp_established"] is True and manifest["network_lock"] == "skip"


def test_sysv_shared_memory_comes_back_with_its_content(ccr: Ccr) -> None:
    prog = ccr.program("sysv.py", SYSV_SHM)
    ref = reference(ccr, 9320, prog)
    out = interrupted(ccr, 9321, prog)
    assert_same_as_uninterrupted(out, ref)


def test_tcp_to_outside_is_refused_unless_asked_for(ccr: Ccr) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    prog = ccr.program(
        "client.py",
        "import socket, sys, time\n"
        f"c = socket.create_connection(('127.0.0.1', {port}))\n"
        "i = 0\n"
        "while True:\n"
        "    c.sendall(b'x'); print(i, flush=True); i += 1; time.sleep(0.05)\n",
    )
    try:
        step = ccr.detach(PY, str(prog), options=("--job-id", "9322"))
        peer, _ = server.accept()
        out = ccr.work / f"ccr-{step}.out"
        wait_for(lambda: len(numbered(out)) >= 3, 30, "output")
        proc = ccr.run("create", step, check=False)
        assert proc.returncode == 4, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("ccr: error: ") and "--tcp-established" in line, line
        assert f"127.0.0.1:{port}" in line, line
        ccr.run("create", step, "--tcp-established")
        count = len(numbered(out))
        wait_for(lambda: len(numbered(out)) > count + 3, 30, "the step to go on")
        peer.setblocking(False)
        assert peer.recv(4096)  # the connection still carries data after the checkpoint
        peer.close()
    finally:
        server.close()


def test_dumps_of_steps_take_no_node_wide_lock(
    ccr: Ccr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-cwd dump lock (for roots seeing the node's /proc) is not taken for steps:
    held by someone else, it blocks a legacy root's dump but not a step's."""
    from ccr.deadline import Deadline
    from ccr.locking import exclusive_lock

    prog = ccr.program("sleeper.py", "import time\nwhile True: time.sleep(1)\n")
    steps = [ccr.detach(PY, str(prog), options=("--job-id", str(j))) for j in (9323, 9324)]
    monkeypatch.setattr(criu_engine, "LOCK_DIR", tmp_path)
    legacy = subprocess.Popen(["sleep", "60"], cwd="/")
    try:
        with exclusive_lock(criu_engine.scratch_lock("/"), Deadline.after(1), "test"):
            for step in steps:
                with criu_engine.parasite_scratch(ccr.step(step)["init_pid"], Deadline.after(1)):
                    pass
            with pytest.raises(MaxWaitExceeded):
                with criu_engine.parasite_scratch(legacy.pid, Deadline.after(0.5)):
                    pass
    finally:
        legacy.kill()
        legacy.wait()
    # Two real dumps at once both succeed.
    procs = [ccr.popen("create", step, "--max-wait", "60") for step in steps]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for step in steps:
        assert ccr.step(step)["state"] == "running"


def test_dump_watchdog_ends_a_dump_without_maxwait(ccr: Ccr) -> None:
    """With no MaxWait, a dump that does not finish in time is killed; the job runs on."""
    prog = ccr.program(
        "big.py",
        "import os, time\n"
        "blob = bytearray(os.urandom(1 << 20)) * 300\n"  # 300 MiB, incompressible
        "i = 0\n"
        "while True:\n"
        "    print(i, flush=True); i += 1; time.sleep(0.05)\n",
    )
    step = ccr.detach(PY, str(prog), options=("--job-id", "9325"))
    out = ccr.work / f"ccr-{step}.out"
    wait_for(lambda: len(numbered(out)) >= 3, 60, "the big step to start")
    env = {**ccr.env, "CCR_DUMP_WATCHDOG": "0.05"}
    proc = ccr.run("create", step, check=False, env=env)
    assert proc.returncode == 6, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "CCR_DUMP_WATCHDOG" in line and "the job is running" in line, line
    assert ccr.step(step)["state"] == "running"
    count = len(numbered(out))
    wait_for(lambda: len(numbered(out)) > count + 3, 30, "the step to go on")
    ccr.run("create", step)  # the default bound is ample


def test_software_under_the_nodes_tmp_stays_reachable(ccr: Ccr, tmp_path: Path) -> None:
    # A checkout and its venv under /tmp (as a CI clone may be): the step's private /tmp
    # must not hide the program it runs, nor what PATH names (they stay the node's).
    tool = Path(f"/tmp/ccr-world-tool-{uuid.uuid4().hex[:8]}")
    (tool / "bin").mkdir(parents=True)
    try:
        script = tool / "bin" / "counter-tool"
        script.write_text("#!/bin/sh\ni=0\nwhile :; do echo $i; i=$((i+1)); sleep 0.05; done\n")
        script.chmod(0o755)
        env = dict(ccr.env, PATH=f"{tool / 'bin'}:{ccr.env.get('PATH', '/usr/bin:/bin')}")
        step = ccr.run(
            "run", "--detach", "--job-id", "9391", "--", "counter-tool", env=env
        ).stdout.strip()
        out = ccr.work / f"ccr-{step}.out"
        wait_for(lambda: len(out_lines(out)) > 3, 30, "output")
        ccr.run("create", step, "--stop")
        wait_for(lambda: ccr.step(step)["state"] == "vacated", 30, "the vacate")
        seen = len(out_lines(out))
        ccr.run("restart", step)
        wait_for(lambda: len(out_lines(out)) > seen + 3, 30, "restored output")
        assert out_lines(out)[seen] == str(int(out_lines(out)[seen - 1]) + 1)
        ccr.run("cancel", step)
    finally:
        shutil.rmtree(tool, ignore_errors=True)
