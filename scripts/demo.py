"""ccr's demo: launch a job, checkpoint it, kill it, restart it, and show it carry on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CCR = [sys.executable, "-m", "ccr"]

PROGRAM = """\
import time
# State that lives only in this process's memory: a restart from scratch would lose it.
total = 0
step = 0
while True:
    step += 1
    total += step
    print(f"step {step:4d}  running total {total}", flush=True)
    time.sleep(0.2)
"""


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def ccr(*args: str, env: dict[str, str], cwd: Path, show: bool = True) -> str:
    if show:
        print(f"$ ccr {' '.join(args)}", flush=True)
    proc = subprocess.run(
        [*CCR, *args], env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    out = (proc.stdout + proc.stderr).rstrip()
    if out and show:
        print(out, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: ccr {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def last_lines(path: Path, n: int = 3) -> list[str]:
    return path.read_text().splitlines()[-n:]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="ccr-demo-"))
    work = root / "job"
    work.mkdir()
    env = dict(os.environ, CCR_STATE_DIR=str(root / "state"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    (work / "sum.py").write_text(PROGRAM)
    out = work / "ccr-1.0.out"
    pids: list[int] = []
    try:
        say("Launch a job step: a program whose running total lives only in memory")
        ccr("run", "--detach", "--job-id", "1", "--", "python3", "sum.py", env=env, cwd=work)
        time.sleep(2.5)
        print("\n".join(last_lines(out)))

        say("Checkpoint it (scontrol checkpoint create, back): the job keeps running")
        before_create = last_lines(out, 1)[0]
        ccr("create", "1", env=env, cwd=work)
        after_create = last_lines(out, 1)[0]
        status = json.loads(ccr("status", "1", "--json", env=env, cwd=work, show=False))
        pids = status["steps"][0]["pids"]
        time.sleep(1.0)

        say(f"Kill the whole process tree with SIGKILL (a node failure): pids {pids}")
        os.kill(status["steps"][0]["init_pid"], signal.SIGKILL)
        time.sleep(1.0)
        print(f"last line before the kill: {last_lines(out, 1)[0]}")
        ccr("status", "1", env=env, cwd=work)

        say("Restart it from the checkpoint")
        before = len(out.read_text().splitlines())
        ccr("restart", "1", env=env, cwd=work)
        time.sleep(2.0)
        resumed = out.read_text().splitlines()[before:]
        print(f"checkpoint was taken after: {before_create}")
        print(f"first line after restart:   {resumed[0]}")
        print(f"still running:              {resumed[-1]}")
        first_step = int(resumed[0].split()[1])
        low, high = int(before_create.split()[1]), int(after_create.split()[1])
        if not low < first_step <= high + 1:
            raise SystemExit("demo failed: the restarted job did not continue from its checkpoint")
        say("It carried on from the checkpoint with its in-memory total intact, not from step 1.")
        ccr("status", "1", env=env, cwd=work)
        ccr("cancel", "1", env=env, cwd=work)
    finally:
        # Whatever happened, leave nothing running.
        subprocess.run([*CCR, "cancel", "1"], env=env, cwd=work, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    say("Demo done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
