"""Files a job writes roll back with it (real CRIU, real process trees).

Each job below writes a file it holds open without O_APPEND (a log opened with "w", `tee`,
SQLite in WAL mode, a large file).  It is checkpointed while running, runs on (so the file
grows past what the checkpoint saw), is killed and restarted.  CRIU alone refuses such a
restore (`File ... has bad size`); with ccr the file is put back as it was at the
checkpoint and the job's final files equal those of the same program run uninterrupted,
compared as text.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Ccr, wait_for

PY = sys.executable

# Each program pauses between steps (so the test can checkpoint and kill it mid-way) until
# a file `fast` appears in its cwd: then it finishes at once, and the test need not wait.
PAUSE = """\
import os, sys, time
def pause(seconds):
    if not os.path.exists("fast"):
        time.sleep(seconds)
"""

# A log opened with "w" (O_WRONLY|O_CREAT|O_TRUNC, no O_APPEND), a line per step.
LOG_W = (
    PAUSE
    + """\
steps, seconds = int(sys.argv[2]), float(sys.argv[3])
log = open(sys.argv[1], "w", buffering=1)
held = open("input.txt") if os.path.exists("input.txt") else None  # only read
for i in range(steps):
    log.write(f"step {i} of {steps}\\n")
    pause(seconds)
log.close()
"""
)

# A counter on stdout, to be piped through tee.
COUNTER = (
    PAUSE
    + """\
steps, seconds = int(sys.argv[1]), float(sys.argv[2])
for i in range(steps):
    print(f"count {i} {i * i}")
    pause(seconds)
"""
)

# SQLite in WAL mode: one transaction per step bumps a counter and logs its new value under
# a primary key, so a database that did not roll back with the process fails the INSERT.
SQLITE = (
    PAUSE
    + """\
import sqlite3
steps, seconds = int(sys.argv[2]), float(sys.argv[3])
db = sqlite3.connect(sys.argv[1], isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE counter (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
db.execute("CREATE TABLE log (n INTEGER PRIMARY KEY, square INTEGER NOT NULL)")
db.execute("INSERT INTO counter VALUES (0, 0)")
while True:
    db.execute("BEGIN IMMEDIATE")
    (n,) = db.execute("SELECT n + 1 FROM counter WHERE k = 0").fetchone()
    db.execute("UPDATE counter SET n = ? WHERE k = 0", (n,))
    db.execute("INSERT INTO log VALUES (?, ?)", (n, n * n))
    db.execute("COMMIT")
    print(n, flush=True)
    if n >= steps:
        break
    pause(seconds)
db.close()
"""
)

# A file that only grows: 64 KiB first, then a 1 KiB record per step, written with "wb" (no
# O_APPEND) at its end; and a second one whose header (offset 0) is rewritten each step.
GROWING = (
    PAUSE
    + """\
path, steps, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
f = open(path, "wb", buffering=0)
f.write(b"H" * 16 + bytes(range(256)) * 256)
for i in range(steps):
    if mode == "rewrite":
        f.seek(0)
        f.write(f"{i:016d}".encode())
        f.seek(0, 2)
    f.write(f"{i:08d}".encode() * 128)
    pause(seconds)
f.close()
"""
)


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def reference(tmp: Path, argv: list[str], cwd: Path) -> None:
    """The uninterrupted run: the same program, no ccr, no pauses."""
    subprocess.run(argv, cwd=cwd, check=True, timeout=120, stdin=subprocess.DEVNULL)


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_size(path: Path, size: int, what: str) -> None:
    wait_for(lambda: path.exists() and path.stat().st_size >= size, what=what)


def checkpoint_run_on_kill(
    ccr: Ccr, step: str, grows: Any, more: int, *options: str
) -> dict[str, Any]:
    """Checkpoint step (leave running), wait until grows() is `more` past its value at the
    checkpoint, then kill the tree (cancel); return create's JSON."""
    result = json_out(ccr.run("create", step, "--json", *options))
    at = grows()
    wait_for(lambda: grows() >= at + more, what="the job to run on after the checkpoint")
    ccr.run("cancel", step)
    wait_for(lambda: ccr.step(step)["state"] == "cancelled", what="the kill")
    return result


def wait_completed(ccr: Ccr, step: str, timeout: float = 60) -> None:
    wait_for(
        lambda: ccr.step(step)["state"] in ("completed", "failed"),
        timeout=timeout,
        what=f"{step} to finish",
    )
    info = ccr.step(step)
    assert (info["state"], info["exit_code"]) == ("completed", 0), info


def check_json(ccr: Ccr, step: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = ccr.run("restart", step, "--check", "--json", check=False, env=env or ccr.env)
    assert proc.returncode in (0, 4), proc.stderr
    return dict(json_out(proc))


def file_checks(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-file checks of restart --check's JSON, by path."""
    return {c["path"]: c for c in data["checks"] if c.get("path")}


def test_log_opened_with_w_rolls_back(ccr: Ccr) -> None:
    prog = ccr.program("logw.py", LOG_W)
    steps = 2000
    ref_dir = ccr.work / "ref"
    ref_dir.mkdir()
    reference(ref_dir, [PY, str(prog), "steps.log", str(steps), "0"], ref_dir)
    log = ccr.work / "steps.log"
    held = ccr.work / "input.txt"
    held.write_text("read only\n")
    step = ccr.detach(PY, str(prog), str(log), str(steps), "0.02", options=("--job-id", "9400"))
    wait_for(lambda: line_count(log) >= 20, what="20 lines in the log")
    log.chmod(0o640)  # a mode of the user's own, which the put-back file must keep
    result = checkpoint_run_on_kill(ccr, step, lambda: line_count(log), 15)
    at_kill = log.read_text()
    gen = result["generation"]

    check = file_checks(check_json(ccr, step))
    assert check[str(log)]["action"] == "restore", check
    assert check[str(log)]["ok"] is True

    # A restore that CRIU then refuses (a file the job only reads changed size) leaves
    # every file as it found it: the log is put back, then brought back again.
    held.write_text("read only, and then some\n")
    failed = ccr.run("restart", step, check=False)
    assert failed.returncode == 5 and "input.txt has bad size" in failed.stderr, failed.stderr
    assert log.read_text() == at_kill
    assert not list(ccr.work.glob("steps.log.ccr-*")) and not list(ccr.work.glob(".steps*"))
    held.write_text("read only\n")

    ccr.run("restart", step)
    (ccr.work / "fast").touch()
    wait_completed(ccr, step)
    expected = (ref_dir / "steps.log").read_text()
    assert log.read_text() == expected
    assert log.stat().st_mode & 0o777 == 0o640
    kept = Path(f"{log}.ccr-{gen}")
    assert kept.read_text() == at_kill, "the version at the restart is kept beside the log"
    assert expected.startswith(at_kill)


def test_tee_pipeline_rolls_back(ccr: Ccr) -> None:
    prog = ccr.program("counter.py", COUNTER)
    steps = 2000
    ref_dir = ccr.work / "ref"
    ref_dir.mkdir()
    script = f"python3 -u {prog} {steps} $PAUSE | tee steps.log > /dev/null"
    reference(ref_dir, ["bash", "-c", script.replace("$PAUSE", "0")], ref_dir)
    log = ccr.work / "steps.log"
    step = ccr.detach("bash", "-c", script.replace("$PAUSE", "0.02"), options=("--job-id", "9401"))
    wait_for(lambda: line_count(log) >= 20, what="20 lines from tee")
    # Uncompressed this time: the saved copy lies in the checkpoint as it is.
    result = checkpoint_run_on_kill(ccr, step, lambda: line_count(log), 15, "--compress", "none")
    [saved] = Path(result["path"]).glob("ccr-file-*")
    assert saved.read_text() == (ref_dir / "steps.log").read_text()[: len(saved.read_text())]
    assert saved.stat().st_mode & 0o777 == 0o600
    at_kill = log.read_text()
    ccr.run("restart", step)
    (ccr.work / "fast").touch()
    wait_completed(ccr, step)
    assert log.read_text() == (ref_dir / "steps.log").read_text()
    assert Path(f"{log}.ccr-{result['generation']}").read_text() == at_kill


def test_sqlite_wal_rolls_back_and_continues(ccr: Ccr) -> None:
    prog = ccr.program("db.py", SQLITE)
    steps = 600
    ref_dir = ccr.work / "ref"
    ref_dir.mkdir()
    reference(ref_dir, [PY, str(prog), "run.db", str(steps), "0"], ref_dir)
    db_path = ccr.work / "run.db"
    step = ccr.detach(PY, str(prog), str(db_path), str(steps), "0.02", options=("--job-id", "9402"))
    out = ccr.work / f"ccr-{step}.out"

    def printed() -> list[int]:
        return [int(x) for x in out.read_text().split("\n")[:-1] if x.strip().isdigit()]

    wait_for(lambda: len(printed()) >= 20, what="20 transactions")
    checkpoint_run_on_kill(ccr, step, lambda: len(printed()), 15)
    before = printed()
    check = file_checks(check_json(ccr, step))
    assert {Path(p).name for p, c in check.items() if c["action"] == "restore"} >= {
        "run.db-wal",
        "run.db-shm",
    }, check
    ccr.run("restart", step)
    (ccr.work / "fast").touch()
    wait_completed(ccr, step)
    after = printed()[len(before) :]
    # It continues from the count at the checkpoint (not from 0, not from the kill): the
    # transactions after the checkpoint are rolled back with the process and done again.
    assert after and 20 <= after[0] <= before[-1], (before[-1], after[:3])
    assert after == list(range(after[0], steps + 1))

    def dump(path: Path) -> str:
        con = sqlite3.connect(path)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            return "\n".join(con.iterdump())
        finally:
            con.close()

    assert dump(db_path) == dump(ref_dir / "run.db")


def big_file_env(ccr: Ccr) -> dict[str, str]:
    env = dict(ccr.env)
    env["CCR_SAVE_FILE_MAX"] = "32K"  # the 64 KiB file is not saved
    return env


def test_large_file_only_appended_is_truncated(ccr: Ccr) -> None:
    prog = ccr.program("grow.py", GROWING)
    logw = ccr.program("logw.py", LOG_W)
    steps = 600
    ref_dir = ccr.work / "ref"
    ref_dir.mkdir()
    reference(ref_dir, [PY, str(prog), "big.bin", str(steps), "0", "append"], ref_dir)
    big = ccr.work / "big.bin"
    small = ccr.work / "small.log"
    script = f"{PY} {logw} {small} {steps} 0.025 & {PY} {prog} {big} {steps} 0.025 append; wait"
    env = big_file_env(ccr)
    step = ccr.run(
        "run", "--detach", "--job-id", "9403", "--", "bash", "-c", script, env=env
    ).stdout.strip()
    wait_size(big, 65552 + 20 * 1024, "20 records in the big file")
    result = json_out(ccr.run("create", step, "--json", env=env))
    at = big.stat().st_size
    wait_size(big, at + 15 * 1024, "the big file to grow after the checkpoint")
    ccr.run("cancel", step)
    wait_for(lambda: ccr.step(step)["state"] == "cancelled", what="the kill")
    at_kill = big.read_bytes()

    data = check_json(ccr, step)
    assert data["ok"] is True, data
    check = file_checks(data)
    assert check[str(big)]["action"] == "truncate", check
    assert check[str(small)]["action"] == "restore", check
    text = ccr.run("restart", step, "--check").stdout
    assert f"{big}: truncate" in text and f"{small}: restore" in text, text

    ccr.run("restart", step)
    (ccr.work / "fast").touch()
    wait_completed(ccr, step)
    assert big.read_bytes() == (ref_dir / "big.bin").read_bytes()
    # What the truncation cut off is kept beside it.
    tail = Path(f"{big}.ccr-{result['generation']}.tail").read_bytes()
    cut = int(check[str(big)]["size"])
    assert at_kill[cut:] == tail and cut >= 65552 + 20 * 1024


def test_large_file_rewritten_refuses_restart(ccr: Ccr) -> None:
    prog = ccr.program("grow.py", GROWING)
    big = ccr.work / "big.bin"
    env = big_file_env(ccr)
    step = ccr.run(
        "run", "--detach", "--job-id", "9404", "--",
        PY, str(prog), str(big), "2000", "0.02", "rewrite",
        env=env,
    ).stdout.strip()  # fmt: skip
    wait_size(big, 65552 + 10 * 1024, "10 records in the big file")
    ccr.run("create", step, env=env)
    at = big.stat().st_size
    wait_size(big, at + 5 * 1024, "the big file to change after the checkpoint")
    ccr.run("cancel", step)
    wait_for(lambda: ccr.step(step)["state"] == "cancelled", what="the kill")
    at_kill = big.read_bytes()

    data = check_json(ccr, step)
    assert data["ok"] is False
    check = file_checks(data)
    assert check[str(big)]["action"] == "refuse", check
    assert "CCR_SAVE_FILE_MAX" in check[str(big)]["detail"]

    proc = ccr.run("restart", step, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccr: error: "), proc.stderr
    assert str(big) in err[0] and "CCR_SAVE_FILE_MAX" in err[0], err[0]
    assert "Traceback" not in proc.stderr
    assert big.read_bytes() == at_kill, "a refused restart changes no file"
    time.sleep(0.2)
    assert ccr.step(step)["state"] == "cancelled"
    assert not any(p.name.startswith("big.bin.ccr-") for p in ccr.work.iterdir())
