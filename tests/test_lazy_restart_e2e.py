"""`ccr restart --lazy`: the tree runs before its memory is in; ccr's page server brings it in.

Every program here keeps a private buffer of seeded random bytes and checks its digest
again and again: a page served wrong, or a zero page where data was, prints BAD.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import Ccr, wait_for
from test_core_e2e import PY, json_out, lines, out_file, vacate

# A parent with a thread and a forked child.  Private: MIB MiB of seeded bytes (both have
# their copy, COW from the fork), checked by digest.  Shared: an anonymous MAP_SHARED page
# the child writes what it read from the pipe into.  The digests are checked every EVERY
# steps (of 0.05 s): each check reads all of the buffer.  Lines: P <n> (parent), T <n> (thread),
# C <n> (the child's last pipe value, read back through the shared page), CK <n> (a digest
# check passed in the parent), CC <n> (in the child), BAD ... (a check failed).
LAZY_TREE = """\
import hashlib, mmap, os, struct, sys, threading, time
MIB, EVERY = int(sys.argv[1]), int(sys.argv[2])
def say(line):  # one write a line: the thread's lines never cut into the others'
    os.write(1, (line + "\\n").encode())
seed = os.urandom(16)
block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range(2048))
priv = bytearray(block * (MIB * 16))  # 64 KiB blocks
want = hashlib.sha256(priv).hexdigest()
shm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    n = 0
    while True:
        data = os.read(r, 4)
        if len(data) < 4:
            os._exit(0)
        (value,) = struct.unpack("i", data)
        shm[0:4] = data
        n += 1
        if n % EVERY == 0:
            ok = hashlib.sha256(priv).hexdigest() == want
            say(f"CC {n}" if ok else f"BAD child {n}")
os.close(r)
def ticker():
    k = 0
    while True:
        say(f"T {k}")
        k += 1
        time.sleep(0.05)
threading.Thread(target=ticker, daemon=True).start()
i = 0
while True:
    os.write(w, struct.pack("i", i))
    time.sleep(0.05)
    say(f"P {i}")
    say(f"C {struct.unpack('i', shm[0:4])[0]}")
    if i % EVERY == 0:
        ok = hashlib.sha256(priv).hexdigest() == want
        say(f"CK {i}" if ok else f"BAD parent {i}")
    i += 1
"""


def tagged(path: Path, tag: str) -> list[list[str]]:
    return [f for f in lines(path) if f[0] == tag]


def values(path: Path, tag: str) -> list[int]:
    """The numbers of the complete `TAG <n>` lines (this file's programs' format)."""
    return [int(f[1]) for f in tagged(path, tag) if len(f) > 1 and f[1].isdigit()]


def wait_lines(path: Path, count: int, tag: str, timeout: float = 30.0) -> None:
    wait_for(lambda: len(values(path, tag)) >= count, timeout, f"{count} {tag} lines in {path}")


def digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def start(ccr: Ccr, mib: int, every: int = 4) -> tuple[str, Path]:
    prog = ccr.program("lazy_tree.py", LAZY_TREE)
    step = ccr.detach(PY, str(prog), str(mib), str(every))
    out = out_file(ccr, step)
    for tag in ("P", "T", "C") + (("CK", "CC") if every < 20 else ()):
        wait_lines(out, 2, tag, timeout=60)
    return step, out


def step_dir(ccr: Ccr, step: str) -> Path:
    link = ccr.work / f"{step}.ckpt"
    return link.resolve()


def assert_goes_on(out: Path, marks: dict[str, int]) -> None:
    for tag in ("P", "T", "CK", "CC"):
        wait_for(lambda tag=tag: values(out, tag)[-1] > marks[tag] + 4, what=f"{tag} to go on")
    assert not tagged(out, "BAD"), tagged(out, "BAD")
    for tag in ("P", "T"):
        seen = values(out, tag)
        assert seen == list(range(seen[0], seen[-1] + 1)), (tag, out.read_text()[-3000:])
    # The child got the values the parent wrote after the restart, through the pipe, and
    # the parent read them back through the shared page.
    wait_for(lambda: values(out, "C")[-1] > marks["P"], what="the pipe and shared page")


def marks_of(out: Path) -> dict[str, int]:
    return {tag: values(out, tag)[-1] for tag in ("P", "T", "CK", "CC")}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def server_pids(ccr: Ccr) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "ccr.engines.page_server" in cmd and ccr._is_ours(proc.pid):
            found.append(proc.pid)
    return found


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_lazy_restart_of_threads_children_shm_and_pipe(ccr: Ccr, compress: str) -> None:
    step, out = start(ccr, 48)
    vacate_result = json_out(ccr.run("create", step, "--stop", "--json", "--compress", compress))
    assert vacate_result
    wait_for(lambda: ccr.step(step)["state"] != "running", what="the vacate")
    marks = marks_of(out)
    stored = step_dir(ccr, step)
    before = digests(stored)

    res = json_out(ccr.run("restart", step, "--lazy", "--json"))["steps"][0]
    assert res["lazy"] is True
    assert 0 < res["resume_time"] <= res["fill_time"], res
    assert_goes_on(out, marks)
    # The restart read the stored files; it changed none of them.
    assert digests(stored) == before
    info = ccr.step(step)
    assert info["state"] == "running" and len(info["pids"]) >= 3, info


def test_restart_lazy_setting_makes_it_the_default(ccr: Ccr) -> None:
    step, out = start(ccr, 8)
    vacate(ccr, step)
    marks = marks_of(out)
    env = {**ccr.env, "CCR_RESTART_LAZY": "1"}
    res = json_out(ccr.run("restart", step, "--json", env=env))["steps"][0]
    assert res["lazy"] is True and res["fill_time"] is not None
    assert_goes_on(out, marks)
    vacate(ccr, step)
    eager = json_out(ccr.run("restart", step, "--eager", "--json", env=env))["steps"][0]
    assert eager["lazy"] is False and eager["fill_time"] is None


def test_corrupted_frame_kills_the_job_naming_the_file(ccr: Ccr) -> None:
    from ccr.engines.page_server import frame_index, task_pages

    step, out = start(ccr, 48)
    vacate(ccr, step)
    stored = step_dir(ccr, step)
    pages = max(stored.glob("pages-*.img.zst"), key=lambda p: p.stat().st_size)
    frames = frame_index(pages)
    assert len(frames) >= 4, frames
    # A frame of lazy pages only (none that CRIU restores itself: that would refuse the
    # restart before anything runs, the eager path's behaviour).
    [task] = [t for t in task_pages(stored) if f"{t.pages_file}.zst" == pages.name]
    lazy_only = [
        f
        for f in frames
        if not any(o < f.raw + f.size and o + n > f.raw for o, n in task.eager)
        and any(s.offset < f.raw + f.size and s.offset + s.size > f.raw for s in task.segments)
    ]
    middle = lazy_only[len(lazy_only) // 2]
    with pages.open("r+b") as fh:  # one byte inside a frame's data, not its headers
        fh.seek(middle.at + middle.length // 2)
        byte = fh.read(1)
        fh.seek(middle.at + middle.length // 2)
        fh.write(bytes([byte[0] ^ 0x40]))
    before = len(lines(out))

    proc = ccr.run("restart", step, "--lazy", check=False)
    assert proc.returncode == 7, (proc.stdout, proc.stderr)
    assert str(pages) in proc.stderr and "the job was killed" in proc.stderr, proc.stderr
    assert proc.stderr.count("ccr: error:") == 1 and "Traceback" not in proc.stderr
    wait_for(lambda: ccr.step(step)["state"] != "running", what="the job to be killed")
    # The job's own error output says why it ended, naming the file.
    errors = out.read_text()
    assert f"lazy restore of {step} failed" in errors and str(pages) in errors
    assert not tagged(out, "BAD")
    assert len(lines(out)) >= before


def test_checkpoint_during_the_fill_is_complete(ccr: Ccr) -> None:
    # The buffer is read only every 40 steps (2 s): its pages come by the slow fill.
    step, out = start(ccr, 64, every=40)
    vacate(ccr, step)
    # A slow fill (16 MiB/s: some 4 s), so the checkpoint surely comes while it runs.
    env = {**ccr.env, "CCR_LAZY_FILL_RATE": "16M"}
    restarting = ccr.popen("restart", step, "--lazy", "--json", env=env)
    wait_for(lambda: ccr.step(step)["state"] == "running", what="the lazy restore")
    marker = ccr.state_dir / "lazy" / f"{step}.filling"
    assert marker.exists(), "the fill ended before the checkpoint began"
    began = time.monotonic()
    second = json_out(ccr.run("create", step, "--stop", "--json"))
    waited = time.monotonic() - began
    stdout, stderr = restarting.communicate(timeout=120)
    assert restarting.returncode == 0, stderr
    filled = json.loads(stdout)["steps"][0]
    assert filled["fill_time"] > 1.0, filled  # the checkpoint started inside the fill
    assert waited > 0.5, waited
    assert second
    wait_for(lambda: ccr.step(step)["state"] != "running", what="the second vacate")
    marks = marks_of(out)
    # The new checkpoint holds all of the memory: restored eagerly, every check passes.
    res = json_out(ccr.run("restart", step, "--eager", "--json"))["steps"][0]
    assert res["lazy"] is False
    assert_goes_on(out, marks)


@pytest.mark.parametrize("victim", ["server", "supervisor"])
def test_killed_page_server_never_leaves_a_job_on_zero_pages(ccr: Ccr, victim: str) -> None:
    step, out = start(ccr, 64, every=100)  # (the buffer is read at the start only)
    vacate(ccr, step)
    env = {**ccr.env, "CCR_LAZY_FILL_RATE": "8M"}  # some 8 s of fill
    restarting = ccr.popen("restart", step, "--lazy", "--json", env=env)
    wait_for(lambda: ccr.step(step)["state"] == "running", what="the lazy restore")
    info = ccr.step(step)
    [server] = wait_for(lambda: server_pids(ccr), what="the page server")
    assert (ccr.state_dir / "lazy" / f"{step}.filling").exists(), "filled before the kill"
    target = server if victim == "server" else int(info["supervisor_pid"])
    os.kill(target, signal.SIGKILL)
    # The job dies with it: it never reads a zero page where its memory was.
    for pid in info["pids"]:
        wait_for(lambda pid=pid: gone(pid), what=f"{pid} to be killed")
    wait_for(lambda: not server_pids(ccr), what="the page server to end")
    time.sleep(0.3)
    assert not tagged(out, "BAD"), tagged(out, "BAD")
    try:
        _, stderr = restarting.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        restarting.kill()
        raise
    assert restarting.returncode != 0
    if victim == "server":
        assert "page server died" in stderr and "the job was killed" in stderr, stderr
