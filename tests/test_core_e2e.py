"""End-to-end checkpoint/restart of real process trees with real CRIU (no mocks).

Every program below carries state that exists only in its memory (a random nonce drawn at
start, counters, heap contents) and writes it out as it goes.  A restored tree must go on
with the *same* nonce and counters that resume where the checkpoint left them: a tree
restarted from scratch draws a new nonce and counts from 0 again, so it cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Ccr, mounted_tmpfs, wait_for

from ccr.engines.process import ProcessIdentity

PY = sys.executable

# -- programs -------------------------------------------------------------------------------

# One process, in-memory state only: a nonce, a running total, a growing list and a 1 MiB
# heap buffer seeded from the nonce and mutated every step, whose SHA-256 it prints.  The
# test replays the mutations to check that every byte of the heap survived the restore.
SINGLE = """\
import hashlib, os, random, time
nonce = os.urandom(8).hex()
blob = bytearray(random.Random(nonce).randbytes(1 << 20))
history = []
total = 0
i = 0
while True:
    blob[(i * 7919) % len(blob)] = i % 256
    history.append(i)
    total += i
    digest = hashlib.sha256(blob).hexdigest()[:16]
    os.write(1, f"S {nonce} {i} {total} {len(history)} {digest}\\n".encode())
    i += 1
    time.sleep(0.05)
"""

# A parent with two threads, a multiprocessing (fork) child and two os.fork children that
# each run a thread of their own.  Every counter has its own nonce; lines carry the
# writer's PID as seen inside the step's PID namespace (CRIU restores those PIDs).
TREE = """\
import multiprocessing as mp, os, threading, time

def counter(tag, period=0.05):
    nonce = os.urandom(6).hex()
    i = 0
    while True:
        os.write(1, f"{tag} {nonce} {i} {os.getpid()}\\n".encode())
        i += 1
        time.sleep(period)

def forked_child(k):
    threading.Thread(target=counter, args=(f"C{k}T",), daemon=True).start()
    counter(f"C{k}")

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    ctx.Process(target=counter, args=("MP",), daemon=True).start()
    for k in range(2):
        if os.fork() == 0:
            forked_child(k)
    for k in range(2):
        threading.Thread(target=counter, args=(f"T{k}",), daemon=True).start()
    counter("P")
"""
TREE_TAGS = {"P", "T0", "T1", "MP", "C0", "C0T", "C1", "C1T"}

# A pipe (a fast writer and a slower reader, so data is in flight inside the pipe at any
# time) and a unix socketpair (a ping-pong: the parent sends n, the child logs and echoes
# it, the parent checks the echo).
IPC = """\
import os, socket, time
nonce = os.urandom(6).hex()

def log(tag, value):
    os.write(1, f"{tag} {nonce} {value}\\n".encode())

r, w = os.pipe()
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
if os.fork() == 0:  # pipe writer
    os.close(r); a.close(); b.close()
    i = 0
    while True:
        os.write(w, f"{i}\\n".encode())
        log("WROTE", i)
        i += 1
        time.sleep(0.02)
if os.fork() == 0:  # pipe reader, slower than the writer
    os.close(w); a.close(); b.close()
    with os.fdopen(r, "rb") as pipe:
        for line in pipe:
            log("PIPE", int(line))
            time.sleep(0.035)
if os.fork() == 0:  # socket echo
    os.close(r); os.close(w); a.close()
    with b.makefile("rb") as sock:
        for line in sock:
            value = int(line)
            log("SOCK", value)
            b.sendall(f"{value}\\n".encode())
os.close(r); os.close(w); b.close()
replies = a.makefile("rb")
i = 0
while True:
    a.sendall(f"{i}\\n".encode())
    echo = int(replies.readline())
    log("ACK" if echo == i else "BAD", echo)
    i += 1
    time.sleep(0.05)
"""

# Appends to a file it opened itself (O_WRONLY|O_APPEND), and keeps it open.
APPENDER = """\
import os, sys, time
nonce = os.urandom(8).hex()
f = open(sys.argv[1], "ab", buffering=0)
i = 0
while True:
    f.write(f"F {nonce} {i}\\n".encode())
    i += 1
    time.sleep(0.05)
"""

# Double fork + setsid: the daemon ends up away from the launched command (reparented to
# the step's init, in a session of its own) and logs to its own file; the launched command
# goes on counting on stdout.
DAEMON = """\
import os, sys, time

def count(tag, out):
    nonce = os.urandom(6).hex()
    i = 0
    while True:
        line = f"{tag} {nonce} {i} {os.getpid()} {os.getppid()} {os.getsid(0)}\\n"
        os.write(out, line.encode())
        i += 1
        time.sleep(0.05)

if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    count("D", log)
os.wait()
count("M", 1)
"""

# A plain counter with a nonce, tagged by its first argument.
COUNT = """\
import os, sys, time
nonce = os.urandom(8).hex()
i = 0
while True:
    os.write(1, f"{sys.argv[1]} {nonce} {i}\\n".encode())
    i += 1
    time.sleep(0.05)
"""


# -- helpers --------------------------------------------------------------------------------


def lines(path: Path) -> list[list[str]]:
    """The complete lines of a file, split into fields."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [ln.split() for ln in text.split("\n")[:-1] if ln.strip()]


def tagged(path: Path, tag: str) -> list[list[str]]:
    return [f for f in lines(path) if f[0] == tag]


def values(path: Path, tag: str) -> list[int]:
    return [int(f[2]) for f in tagged(path, tag)]


def nonces(path: Path, tag: str) -> set[str]:
    return {f[1] for f in tagged(path, tag)}


def assert_contiguous(seq: list[int], what: str) -> None:
    """0, 1, 2, ... with no gap (lost state) and no repeat (a restart from an old point)."""
    assert seq, f"no values for {what}"
    assert seq == list(range(len(seq))), f"{what} is not 0..n-1: {_describe_gaps(seq)}"


def _describe_gaps(seq: list[int]) -> str:
    bad = [(a, b) for a, b in zip(seq, seq[1:], strict=False) if b != a + 1]
    return f"first={seq[0]} len={len(seq)} breaks={bad[:5]}"


def out_file(ccr: Ccr, step: str) -> Path:
    return ccr.work / f"ccr-{step}.out"


def wait_lines(path: Path, count: int, tag: str | None = None, timeout: float = 30.0) -> None:
    def enough() -> bool:
        got = tagged(path, tag) if tag else lines(path)
        return len(got) >= count

    wait_for(enough, timeout=timeout, what=f"{count} lines{' of ' + tag if tag else ''} in {path}")


def proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def ns_pid(pid: int) -> int:
    return int(proc_field(pid, "NSpid").split()[-1])


def tree_shape(ccr: Ccr, step: str) -> dict[int, int]:
    """{PID inside the step's namespace: thread count} of every process of a running step."""
    info = ccr.step(step)
    assert info["state"] == "running", info
    return {ns_pid(p): int(proc_field(p, "Threads")) for p in info["pids"]}


def identities(pids: list[int]) -> list[ProcessIdentity]:
    found = [ProcessIdentity.of(p) for p in pids]
    return [i for i in found if i is not None]


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def vacate(ccr: Ccr, ref: str) -> dict[str, Any]:
    """`ccr create REF --stop`, then wait until every stopped step's exit is recorded."""
    job = ref.split(".")[0]
    before = ccr.status(job)
    result = json_out(ccr.run("create", ref, "--stop", "--json"))
    steps = [s for s in before["steps"] if ref == job or s["step"] == ref]
    gone = identities([p for s in steps for p in s["pids"]])
    for step in steps:
        wait_for(
            lambda step=step: (
                ccr.step(step["step"])["state"] == "vacated"
                and ccr.step(step["step"])["exit_code"] is not None
            ),
            what=f"step {step['step']} recorded as vacated",
        )
    wait_for(lambda: not any(i.alive() for i in gone), what="the vacated tree to be gone")
    return result


def restart(ccr: Ccr, ref: str) -> list[dict[str, Any]]:
    results = json_out(ccr.run("restart", ref, "--json"))["steps"]
    assert isinstance(results, list) and results
    for res in results:
        assert 0 <= res["unpack_time"] <= res["restore_time"]
    return results


def assert_cli_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """A failure is exactly one line `ccr: error: ...`, no traceback, the given exit code."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    line = err[0]
    assert line.startswith("ccr: error: "), line
    assert proc.stdout.strip() == "", proc.stdout
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}: {line}"
    return line


def assert_stays_dead(path: Path, settle: float = 0.6) -> int:
    """The output of a vacated/cancelled tree does not grow any more; return its line count."""
    count = len(lines(path))
    time.sleep(settle)
    assert len(lines(path)) == count, f"{path} still grows: the tree is not dead"
    return count


# -- (a) a single process with in-memory state ------------------------------------------------


def test_single_process_memory_state_continues(ccr: Ccr) -> None:
    prog = ccr.program("single.py", SINGLE)
    step = ccr.detach(PY, str(prog))
    out = out_file(ccr, step)
    wait_lines(out, 15)
    before = ccr.step(step)
    shape = tree_shape(ccr, step)
    assert len(shape) == 2  # dumb-init and python

    result = vacate(ccr, step)
    link = Path(result["link"])
    assert link.is_symlink() and link.name == f"{step}.ckpt"
    assert result["image_bytes"] > 1 << 20  # the 1 MiB heap buffer at least
    at_checkpoint = assert_stays_dead(out)
    last = values(out, "S")[-1]

    [res] = restart(ccr, step)
    assert res["step"] == step
    assert Path(res["checkpoint"]) == link.resolve()
    assert res["unpack_time"] > 0  # compressed by default: decompressed before CRIU ran
    wait_lines(out, at_checkpoint + 15)

    info = ccr.step(step)
    assert info["state"] == "running"
    assert info["init_pid"] == res["pid"] != before["init_pid"]
    assert tree_shape(ccr, step) == shape  # same processes (namespace PIDs), same threads

    rows = tagged(out, "S")
    assert {r[1] for r in rows} == {rows[0][1]}, "a new nonce: the program started over"
    seq = [int(r[2]) for r in rows]
    assert_contiguous(seq, "the counter")
    assert seq[-1] > last + 10
    # Replay the heap mutations: every byte of the 1 MiB buffer came back.
    nonce = rows[0][1]
    blob = bytearray(random.Random(nonce).randbytes(1 << 20))
    for row in rows:
        i = int(row[2])
        blob[(i * 7919) % len(blob)] = i % 256
        assert int(row[3]) == i * (i + 1) // 2, row
        assert int(row[4]) == i + 1, row
        assert row[5] == hashlib.sha256(blob).hexdigest()[:16], f"heap differs at {i}"


# -- (b) a parent with threads and child processes ------------------------------------------


def test_tree_with_threads_and_children_continues(ccr: Ccr) -> None:
    prog = ccr.program("tree.py", TREE)
    step = ccr.detach(PY, str(prog))
    out = out_file(ccr, step)
    for tag in TREE_TAGS:
        wait_lines(out, 10, tag)
    shape = tree_shape(ccr, step)
    # init, parent (3 threads), multiprocessing child, two forked children (2 threads each)
    assert len(shape) >= 5, shape
    assert sorted(shape.values())[-3:] == [2, 2, 3], shape
    pids_by_tag = {tag: {f[3] for f in tagged(out, tag)} for tag in TREE_TAGS}
    assert all(len(p) == 1 for p in pids_by_tag.values()), pids_by_tag
    assert len({next(iter(p)) for p in pids_by_tag.values()}) == 4  # P, MP, C0, C1
    old_pids = ccr.step(step)["pids"]

    vacate(ccr, step)
    at_checkpoint = assert_stays_dead(out)
    last = {tag: values(out, tag)[-1] for tag in TREE_TAGS}

    restart(ccr, step)
    wait_lines(out, at_checkpoint + 10 * len(TREE_TAGS))
    for tag in TREE_TAGS:
        wait_for(lambda tag=tag: values(out, tag)[-1] >= last[tag] + 10, what=f"{tag} to go on")

    assert tree_shape(ccr, step) == shape
    assert not set(ccr.step(step)["pids"]) & set(old_pids)  # really new host processes
    for tag in TREE_TAGS:
        assert len(nonces(out, tag)) == 1, f"{tag} started over with a new nonce"
        assert_contiguous(values(out, tag), tag)
        assert {f[3] for f in tagged(out, tag)} == pids_by_tag[tag], f"{tag} changed its PID"


# -- (c) a pipe and a unix socketpair inside the tree -----------------------------------------


def test_pipe_and_socketpair_keep_flowing(ccr: Ccr) -> None:
    prog = ccr.program("ipc.py", IPC)
    step = ccr.detach(PY, str(prog))
    out = out_file(ccr, step)
    for tag in ("PIPE", "SOCK", "ACK"):
        wait_lines(out, 10, tag)
    # The writer is ahead of the reader: data sits in the pipe.
    wait_for(
        lambda: values(out, "WROTE")[-1] - values(out, "PIPE")[-1] >= 15,
        what="data in flight in the pipe",
    )
    shape = tree_shape(ccr, step)

    vacate(ccr, step)
    at_checkpoint = assert_stays_dead(out)
    wrote, read = values(out, "WROTE")[-1], values(out, "PIPE")[-1]
    acked = values(out, "ACK")[-1]
    assert wrote > read

    [res] = restart(ccr, step)
    wait_lines(out, at_checkpoint + 20)
    # What was in the pipe at checkpoint time is delivered after the restore, in order.
    wait_for(
        lambda: values(out, "PIPE")[-1] > wrote + 5, what="the reader to pass the writer's mark"
    )
    wait_for(lambda: values(out, "ACK")[-1] > acked + 10, what="the socket ping-pong to go on")

    assert tree_shape(ccr, step) == shape
    assert not tagged(out, "BAD"), "the socket echo returned a wrong value"
    assert len({f[1] for f in lines(out)}) == 1, "a new nonce: the program started over"
    for tag in ("WROTE", "PIPE", "SOCK", "ACK"):
        assert_contiguous(values(out, tag), tag)
    # The restored reader and writer share one pipe again.
    pipes: dict[str, int] = {}
    for pid in ccr.step(step)["pids"]:
        fd_dir = Path(f"/proc/{pid}/fd")
        for link in {os.readlink(p) for p in fd_dir.iterdir() if p.is_symlink()}:
            if link.startswith("pipe:"):
                pipes[link] = pipes.get(link, 0) + 1
    assert any(n >= 2 for n in pipes.values()), pipes
    assert res["pid"] == ccr.step(step)["init_pid"]


# -- (d) a process appending to a file it opened ----------------------------------------------


def test_appending_to_own_open_file(ccr: Ccr) -> None:
    prog = ccr.program("append.py", APPENDER)
    data = ccr.work / "data.log"
    step = ccr.detach(PY, str(prog), str(data))
    wait_lines(data, 10)
    low = values(data, "F")[-1]
    # Leave-running checkpoint: the tree goes on after it.
    result = json_out(ccr.run("create", step, "--json"))
    high = values(data, "F")[-1]
    assert Path(result["link"]).resolve() == Path(result["path"])
    wait_for(lambda: values(data, "F")[-1] >= high + 10, what="the tree to go on after create")
    assert ccr.step(step)["state"] == "running"

    assert ccr.run("cancel", step).stdout.strip() == f"{step} cancelled"
    wait_for(lambda: ccr.step(step)["state"] == "cancelled", what="the cancel")
    at_cancel = assert_stays_dead(data)
    last = values(data, "F")[-1]
    assert last >= high + 10

    [res] = restart(ccr, step)
    wait_lines(data, at_cancel + 15)
    rows = tagged(data, "F")
    assert {r[1] for r in rows} == {rows[0][1]}, "a new nonce: the program started over"
    resumed = [int(r[2]) for r in rows[at_cancel:]]
    # It goes on from the checkpoint's counter (taken between `low` and `high`), not from 0
    # and not from where it was cancelled, and appends (nothing before was overwritten).
    assert low <= resumed[0] <= high + 1, (low, resumed[0], high)
    assert resumed[0] < last
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert [int(r[2]) for r in rows[:at_cancel]] == list(range(at_cancel))
    # The restored process still holds the file open.
    pids = ccr.step(step)["pids"]
    assert res["pid"] in pids
    opened = {os.readlink(p) for pid in pids for p in Path(f"/proc/{pid}/fd").iterdir()}
    assert str(data) in opened, opened


# -- (e) a whole job of two steps -------------------------------------------------------------


def test_whole_job_checkpoint_and_restart(ccr: Ccr) -> None:
    prog = ccr.program("count.py", COUNT)
    steps = [
        ccr.detach(PY, str(prog), f"S{n}", options=("--job-id", "7", "--step-id", str(n)))
        for n in (0, 1)
    ]
    assert steps == ["7.0", "7.1"]
    outs = {s: out_file(ccr, s) for s in steps}
    for s in steps:
        wait_lines(outs[s], 10)
    old = {s: ccr.step(s)["init_pid"] for s in steps}

    result = vacate(ccr, "7")
    link = ccr.work / "7.ckpt"
    assert Path(result["link"]) == link and link.is_symlink()
    gen = link.resolve()
    assert gen.name == "7.ckpt.1" and gen == Path(result["path"])
    assert sorted(result["steps"]) == [0, 1]
    assert (gen / "job.json").is_file()
    for n in (0, 1):
        assert (gen / str(n) / "manifest.json").is_file()
        assert any(p.suffix == ".img" for p in (gen / str(n)).iterdir())
        manifest = json.loads((gen / str(n) / "manifest.json").read_text())
        assert (manifest["job_id"], manifest["step_id"]) == (7, n)
    assert not (ccr.work / "7.0.ckpt").exists() and not (ccr.work / "7.1.ckpt").exists()
    counts = {s: assert_stays_dead(outs[s]) for s in steps}
    last = {s: values(outs[s], f"S{s[-1]}")[-1] for s in steps}

    results = restart(ccr, "7")
    assert sorted(r["step"] for r in results) == steps
    for s in steps:
        wait_lines(outs[s], counts[s] + 15)
    for r in results:
        s = r["step"]
        info = ccr.step(s)
        assert info["state"] == "running"
        assert info["init_pid"] == r["pid"] != old[s]
        assert Path(r["checkpoint"]) == gen / s.split(".")[1]
        tag = f"S{s[-1]}"
        assert len(nonces(outs[s], tag)) == 1, f"{s} started over"
        seq = values(outs[s], tag)
        assert_contiguous(seq, s)
        assert seq[-1] > last[s] + 10
    assert ccr.status(7)["restart_count"] >= 1


# -- (f) a single step ------------------------------------------------------------------------


def test_single_step_checkpoint_and_restart(ccr: Ccr) -> None:
    prog = ccr.program("count.py", COUNT)
    s0 = ccr.detach(PY, str(prog), "S0", options=("--job-id", "9"))
    s1 = ccr.detach(PY, str(prog), "S1", options=("--job-id", "9"))
    assert (s0, s1) == ("9.0", "9.1")
    out0, out1 = out_file(ccr, s0), out_file(ccr, s1)
    wait_lines(out0, 5)
    wait_lines(out1, 10)
    step0 = ccr.step(s0)

    first = json_out(ccr.run("create", s1, "--json"))  # leave running
    link = ccr.work / "9.1.ckpt"
    assert Path(first["link"]) == link and link.resolve().name == "9.1.ckpt.1"
    manifest = json.loads((link / "manifest.json").read_text())
    assert (manifest["job_id"], manifest["step_id"]) == (9, 1)
    assert any(p.suffix == ".img" for p in link.iterdir())
    assert not (link / "job.json").exists()
    assert not (ccr.work / "9.ckpt").exists() and not (ccr.work / "9.0.ckpt").exists()
    assert ccr.step(s1)["state"] == "running"

    second = vacate(ccr, s1)
    assert Path(second["path"]).name == "9.1.ckpt.2" and link.resolve().name == "9.1.ckpt.2"
    at_checkpoint = assert_stays_dead(out1)
    last = values(out1, "S1")[-1]
    # Step 0 was not touched.
    assert ccr.step(s0)["state"] == "running"
    assert ccr.step(s0)["init_pid"] == step0["init_pid"]

    [res] = restart(ccr, s1)
    assert res["step"] == s1 and Path(res["checkpoint"]).name == "9.1.ckpt.2"
    wait_lines(out1, at_checkpoint + 15)
    assert len(nonces(out1, "S1")) == 1, "step 9.1 started over"
    seq = values(out1, "S1")
    assert_contiguous(seq, "9.1")  # from the newest checkpoint: no repeat, no gap
    assert seq[-1] > last + 10
    assert ccr.step(s0)["init_pid"] == step0["init_pid"]
    assert len(nonces(out0, "S0")) == 1
    assert_contiguous(values(out0, "S0"), "9.0")


# -- (g) a daemon that left the launched command ----------------------------------------------


def test_daemonized_process_is_part_of_the_step(ccr: Ccr) -> None:
    prog = ccr.program("daemon.py", DAEMON)
    log = ccr.work / "daemon.log"
    step = ccr.detach(PY, str(prog), str(log))
    out = out_file(ccr, step)
    wait_lines(log, 10, "D")
    wait_lines(out, 10, "M")
    d_pid, d_ppid, d_sid = (int(x) for x in tagged(log, "D")[-1][3:6])
    m_pid, _, m_sid = (int(x) for x in tagged(out, "M")[-1][3:6])
    # Daemonized: reparented to the step's init (PID 1 of its namespace), another session.
    assert d_ppid == 1 and d_sid != m_sid and d_pid != m_pid
    shape = tree_shape(ccr, step)
    assert d_pid in shape and m_pid in shape

    vacate(ccr, step)
    logged = assert_stays_dead(log)
    printed = assert_stays_dead(out, settle=0.1)
    last_d, last_m = values(log, "D")[-1], values(out, "M")[-1]

    restart(ccr, step)
    wait_lines(log, logged + 15)
    wait_lines(out, printed + 15)
    assert tree_shape(ccr, step) == shape
    assert len(nonces(log, "D")) == 1, "the daemon started over"
    assert len(nonces(out, "M")) == 1, "the launched command started over"
    assert_contiguous(values(log, "D"), "the daemon's counter")
    assert_contiguous(values(out, "M"), "the command's counter")
    assert values(log, "D")[-1] > last_d + 10 and values(out, "M")[-1] > last_m + 10
    assert {tuple(r[3:6]) for r in tagged(log, "D")} == {(str(d_pid), "1", str(d_sid))}


# -- (h) restart refuses while the step runs --------------------------------------------------


def _assert_refused_while_running(ccr: Ccr, step: str) -> None:
    info = ccr.step(step)
    out = out_file(ccr, step)
    for ref in (step, step.split(".")[0]):
        proc = ccr.run("restart", ref, check=False)
        assert_cli_error(proc, 4, "still running", step)
    time.sleep(0.5)
    after = ccr.step(step)
    assert after["state"] == "running"
    assert (after["init_pid"], after["supervisor_pid"]) == (
        info["init_pid"],
        info["supervisor_pid"],
    )
    assert sorted(after["pids"]) == sorted(info["pids"])
    # No second copy of the tree writes into the output.
    seq = values(out, "C")
    assert seq == sorted(set(seq)), "counter values repeat: a second tree was restored"


def test_restart_refused_while_running(ccr: Ccr) -> None:
    prog = ccr.program("count.py", COUNT)
    step = ccr.detach(PY, str(prog), "C")
    wait_lines(out_file(ccr, step), 5)
    ccr.run("create", step)
    _assert_refused_while_running(ccr, step)
    # Also once restored: the restored step is running too.
    vacate(ccr, step)
    restart(ccr, step)
    wait_lines(out_file(ccr, step), len(lines(out_file(ccr, step))) + 5)
    _assert_refused_while_running(ccr, step)


# -- (i) error cases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("status", "4242"), ("create", "4242"), ("create", "4242.0"), ("cancel", "4242"),
     ("cancel", "4242.1"), ("restart", "4242"), ("restart", "4242.0"),
     ("checkpoint", "able", "4242")],
)  # fmt: skip
def test_unknown_job_is_one_line_error(ccr: Ccr, args: tuple[str, ...]) -> None:
    proc = ccr.run(*args, check=False)
    line = assert_cli_error(proc, 3, "4242")
    assert any(w in line for w in ("unknown job", "unknown step", "no complete checkpoint")), line


@pytest.mark.parametrize("bad", ["abc", "1.x", "1.2.3", "-1", "1."])
@pytest.mark.parametrize("verb", ["status", "create", "restart", "cancel"])
def test_malformed_id_is_one_line_error(ccr: Ccr, verb: str, bad: str) -> None:
    proc = (
        ccr.run(verb, "--", bad, check=False)
        if bad.startswith("-")
        else ccr.run(verb, bad, check=False)
    )
    assert_cli_error(proc, 2, "malformed", repr(bad))


def test_malformed_id_in_an_existing_job_context(ccr: Ccr) -> None:
    # A real job exists: a malformed id still must not reach it (or crash on it).
    prog = ccr.program("count.py", COUNT)
    step = ccr.detach(PY, str(prog), "C")
    wait_lines(out_file(ccr, step), 3)
    for bad in ("1.x", "1.0.0", "1x"):
        assert_cli_error(ccr.run("create", bad, check=False), 2, "malformed")
    assert ccr.step(step)["state"] == "running"
    assert not list(ccr.work.glob("*.ckpt*"))


def _image_dir_cases(ccr: Ccr, ro: Path) -> list[tuple[Path, str]]:
    afile = ccr.work / "not-a-dir"
    afile.write_text("x")
    return [
        (afile, "not-a-dir"),
        (afile / "sub", "not-a-dir"),
        (ro, str(ro)),
        (ro / "sub", str(ro)),
    ]


@pytest.fixture
def readonly_dir(ccr: Ccr) -> Any:
    """A directory on a read-only file system (root ignores permission bits)."""
    with mounted_tmpfs(ccr.work.parent / "ro", "1m", read_only=True) as path:
        yield path


def test_bad_image_dir_for_create_is_one_line_error(ccr: Ccr, readonly_dir: Path) -> None:
    prog = ccr.program("count.py", COUNT)
    step = ccr.detach(PY, str(prog), "C")
    out = out_file(ccr, step)
    wait_lines(out, 5)
    info = ccr.step(step)
    for image_dir, needle in _image_dir_cases(ccr, readonly_dir):
        for ref, stop in ((step, False), (step, True), (step.split(".")[0], True)):
            args = ["create", ref, "--image-dir", str(image_dir)] + (["--stop"] if stop else [])
            assert_cli_error(ccr.run(*args, check=False), 8, needle)
            # Nothing published, the tree keeps running (also after a failed --stop).
            after = ccr.step(step)
            assert after["state"] == "running", after
            assert after["init_pid"] == info["init_pid"]
    n = len(lines(out))
    wait_lines(out, n + 5)
    assert not list(ccr.work.glob("*.ckpt*"))
    # The failure is recorded as the job's last checkpoint error.
    assert "read-only" in (ccr.status(step.split(".")[0])["last_error"] or "")


def test_bad_image_dir_for_restart_and_run_is_one_line_error(ccr: Ccr, readonly_dir: Path) -> None:
    afile = ccr.work / "not-a-dir"
    afile.write_text("x")
    missing = ccr.work / "missing"
    assert_cli_error(
        ccr.run("restart", "5", "--image-dir", str(missing), check=False), 8, "does not exist"
    )
    assert_cli_error(
        ccr.run("restart", "5.0", "--image-dir", str(afile), check=False), 8, "not a directory"
    )
    for bad, needle in ((afile, "not a directory"), (readonly_dir, "writable")):
        proc = ccr.run("run", "--checkpoint-dir", str(bad), "--", "true", check=False)
        assert_cli_error(proc, 8, str(bad), needle)
    proc = ccr.run(
        "run", "--detach", "--checkpoint-dir", str(afile / "x"), "--", "true", check=False
    )
    assert_cli_error(proc, 8, "not-a-dir")
    assert json.loads(ccr.run("list", "--json").stdout) == {"jobs": []}


@pytest.mark.parametrize("cmd", ["no-such-command-ccr-test", "./missing.sh", "/nonexistent/bin/x"])
@pytest.mark.parametrize("detach", [True, False])
def test_command_not_found_is_one_line_error(ccr: Ccr, cmd: str, detach: bool) -> None:
    args = ["run", *(["--detach"] if detach else []), "--", cmd, "arg"]
    proc = ccr.run(*args, check=False)
    assert_cli_error(proc, 2, "command not found", cmd)
    assert json.loads(ccr.run("list", "--json").stdout) == {"jobs": []}


def test_not_executable_is_one_line_error(ccr: Ccr) -> None:
    script = ccr.work / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    proc = ccr.run("run", "--detach", "--", "./script.sh", check=False)
    assert_cli_error(proc, 2, "./script.sh")


# -- (j) cancel, status, exit codes -----------------------------------------------------------


def test_cancel_ends_a_restored_tree(ccr: Ccr) -> None:
    prog = ccr.program("tree.py", TREE)
    step = ccr.detach(PY, str(prog))
    out = out_file(ccr, step)
    wait_lines(out, 10, "C1T")
    vacate(ccr, step)
    before = len(lines(out))
    [res] = restart(ccr, step)
    wait_lines(out, before + 20)
    info = ccr.step(step)
    assert info["state"] == "running" and info["init_pid"] == res["pid"]
    tree = identities(info["pids"])
    assert len(tree) >= 5
    supervisor = ProcessIdentity.of(res["supervisor_pid"])
    assert supervisor is not None and info["supervisor_pid"] == res["supervisor_pid"]

    proc = ccr.run("cancel", step)
    assert proc.stdout.strip() == f"{step} cancelled"
    wait_for(lambda: not any(i.alive() for i in tree), what="the restored tree to end")
    wait_for(lambda: not supervisor.alive(), what="the restored step's supervisor to exit")
    wait_for(lambda: ccr.step(step)["exit_code"] is not None, what="the exit code")
    info = ccr.step(step)
    assert info["state"] == "cancelled" and info["pids"] == []
    assert info["exit_code"] in (128 + signal.SIGTERM, 128 + signal.SIGKILL), info
    assert info["ended"] is not None
    assert_stays_dead(out)
    text = ccr.run("status", step.split(".")[0]).stdout
    assert f"{step}" in text and "cancelled" in text
    listed = json.loads(ccr.run("list", "--json").stdout)
    job_id, step_id = (int(x) for x in step.split("."))
    assert listed["jobs"][0]["steps"][0] == {
        "step": step,
        "job_id": job_id,
        "step_id": step_id,
        "state": "cancelled",
        "command": [PY, str(prog)],
    }
    # Nothing left to cancel, nothing to restart over (the checkpoint stays restorable).
    assert_cli_error(ccr.run("cancel", step, check=False), 4, step)


@pytest.mark.parametrize(
    ("script", "code", "state"),
    [
        ("exit 3", 3, "failed"),
        ("exit 0", 0, "completed"),
        ("sleep 0.3; exit 42", 42, "failed"),
        ("kill -KILL $$", 128 + 9, "failed"),
    ],
)
def test_supervisor_records_exit_code(ccr: Ccr, script: str, code: int, state: str) -> None:
    step = ccr.detach("sh", "-c", script)
    wait_for(lambda: ccr.step(step)["exit_code"] is not None, what="the step's exit")
    info = ccr.step(step)
    assert (info["state"], info["exit_code"]) == (state, code), info
    assert info["pids"] == [] and info["ended"] is not None
    text = ccr.run("status", step.split(".")[0]).stdout
    assert state in text and f"exit {code}" in text
    # Nothing to checkpoint any more.
    assert_cli_error(ccr.run("create", step, check=False), 4, step)


FINITE = """\
import os, sys, time
nonce = os.urandom(8).hex()
for i in range(int(sys.argv[1])):
    os.write(1, f"N {nonce} {i}\\n".encode())
    time.sleep(0.05)
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize(("code", "state"), [(7, "failed"), (0, "completed")])
def test_restored_step_exit_code_is_recorded(ccr: Ccr, code: int, state: str) -> None:
    prog = ccr.program("finite.py", FINITE)
    step = ccr.detach(PY, str(prog), "80", str(code))
    out = out_file(ccr, step)
    wait_lines(out, 10)
    vacate(ccr, step)
    assert ccr.step(step)["exit_code"] == 128 + signal.SIGKILL
    assert values(out, "N")[-1] < 60
    [res] = restart(ccr, step)
    supervisor = ProcessIdentity.of(res["supervisor_pid"])
    assert supervisor is not None
    wait_for(lambda: ccr.step(step)["state"] != "running", what="the restored step to finish")
    wait_for(lambda: not supervisor.alive(), what="the restored step's supervisor to exit")
    info = ccr.step(step)
    assert (info["state"], info["exit_code"]) == (state, code), info
    assert len(nonces(out, "N")) == 1, "the program started over"
    assert values(out, "N") == list(range(80))


def test_foreground_run_exits_with_the_step_code(ccr: Ccr) -> None:
    proc = ccr.run(
        "run", "--job-id", "3", "--", "sh", "-c", "echo out; echo err >&2; exit 5", check=False
    )
    assert proc.returncode == 5, proc
    assert ccr.step("3.0")["exit_code"] == 5
    assert (ccr.work / "ccr-3.0.out").read_text().split() == ["out", "err"]


# -- (k) permissions of images ----------------------------------------------------------------


def _assert_private(root: Path) -> int:
    """Every directory under root (root included) is 0700, every file 0600; count the files."""
    files = 0
    assert root.stat().st_mode & 0o7777 == 0o700, root
    for path in root.rglob("*"):
        mode = path.lstat().st_mode & 0o7777
        if path.is_dir():
            assert mode == 0o700, f"{path} is {mode:o}"
        else:
            assert path.is_file() and not path.is_symlink(), path
            assert mode == 0o600, f"{path} is {mode:o}"
            files += 1
    return files


def test_images_are_private(ccr: Ccr) -> None:
    prog = ccr.program("count.py", COUNT)
    open_umask: dict[str, Any] = {"preexec_fn": lambda: os.umask(0)}
    steps = [
        ccr.run(
            "run", "--detach", "--job-id", "11", "--", PY, str(prog), f"S{n}", **open_umask
        ).stdout.strip()
        for n in (0, 1)
    ]
    for s in steps:
        wait_lines(out_file(ccr, s), 5)
    images = ccr.work / "images" / "nested"
    step_ckpt = json_out(
        ccr.run("create", steps[0], "--image-dir", str(images), "--mkdir", "--json", **open_umask)
    )
    job_ckpt = json_out(
        ccr.run("create", "11", "--image-dir", str(images), "--stop", "--json", **open_umask)
    )
    assert images.stat().st_mode & 0o7777 == 0o700
    step_gen, job_gen = Path(step_ckpt["path"]), Path(job_ckpt["path"])
    assert step_gen.parent == images and job_gen.parent == images
    assert _assert_private(step_gen) >= 5
    assert any(p.suffix == ".img" for p in step_gen.iterdir())
    assert _assert_private(job_gen) >= 10
    assert {p.name for p in job_gen.iterdir() if p.is_dir()} == {"0", "1"}
    # No stray (staging) entries are left in the image dir, and nothing there is open to others.
    for entry in images.iterdir():
        if not entry.is_symlink():
            assert entry.stat().st_mode & 0o077 == 0, entry
    # The private images restore.
    for s in steps:
        wait_for(lambda s=s: ccr.step(s)["exit_code"] is not None, what=f"{s} vacated")
    counts = {s: len(lines(out_file(ccr, s))) for s in steps}
    results = json_out(ccr.run("restart", "11", "--image-dir", str(images), "--json"))["steps"]
    assert sorted(r["step"] for r in results) == steps
    for s in steps:
        wait_lines(out_file(ccr, s), counts[s] + 5)
        assert len(nonces(out_file(ccr, s), f"S{s[-1]}")) == 1


# -- a late supervisor must not clobber the restored step -------------------------------------


def test_old_supervisor_reaping_late_keeps_restored_step_running(ccr: Ccr) -> None:
    """The vacated tree's supervisor may record its exit only after the restore took over.

    Its late bookkeeping must not mark the restored (running) step as ended: that would
    hide the live tree from `ccr status` and make it impossible to `ccr cancel`.
    """
    prog = ccr.program("count.py", COUNT)
    step = ccr.detach(PY, str(prog), "C")
    out = out_file(ccr, step)
    wait_lines(out, 5)
    old = ccr.step(step)
    old_supervisor = ProcessIdentity.of(old["supervisor_pid"])
    assert old_supervisor is not None
    os.kill(old_supervisor.pid, signal.SIGSTOP)  # a busy/slow supervisor
    try:
        ccr.run("create", step, "--stop")
        assert ccr.step(step)["state"] == "vacated"
        [res] = restart(ccr, step)
    finally:
        os.kill(old_supervisor.pid, signal.SIGCONT)
    wait_for(lambda: not old_supervisor.alive(), what="the old supervisor to finish")
    n = len(lines(out))
    wait_lines(out, n + 10)
    info = ccr.step(step)
    assert info["init_pid"] == res["pid"]
    assert info["state"] == "running", info
    assert info["exit_code"] is None and info["ended"] is None, info
    assert res["pid"] in info["pids"]
    assert len(nonces(out, "C")) == 1
    assert_contiguous(values(out, "C"), "the counter")
    assert ccr.run("cancel", step).stdout.strip() == f"{step} cancelled"
    wait_for(lambda: ccr.step(step)["state"] == "cancelled", what="the cancel")
