"""Stand-ins for Slurm's `srun` and `scontrol`, so a multi-node checkpoint runs on one machine.

The coordinator (`ccr create J`) and its node participants (`ccr _node-checkpoint`) are the
real ones, dumping real process trees with real CRIU; only Slurm's clients are faked:

- `scontrol show job -o J` answers from a JSON file (FAKE_SLURM_JOBS: {"J": {fields}}),
  `scontrol show hostnames a,b` splits the list;
- `srun --nodelist=a,b ... CMD` runs CMD once per node as a child with SLURMD_NODENAME set
  (so `CCR_STATE_DIR=.../state-%n` gives each "node" its own registry), copies every line
  of its stdin to every child (srun --input=all) and their stdout/stderr lines to its own.

`install(bin_dir)` writes the two commands into bin_dir; put bin_dir first on PATH.
`CCR_TEST_NODE_WRAPPER`, when set, is put in front of a child's `python -m ccr` (a test's
launcher that fakes the GPU driver inside the node participant, say).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve()


def install(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE} {name} "$@"\n')
        script.chmod(0o755)
    return bin_dir


def _jobs() -> dict[str, dict[str, str]]:
    path = os.environ.get("FAKE_SLURM_JOBS", "")
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except FileNotFoundError:
        return {}


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(n for n in args[2].split(",") if n))
        return 0
    if args[:3] == ["show", "job", "-o"]:
        job = _jobs().get(args[3])
        if job is None:
            print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
            return 1
        print(" ".join([f"JobId={args[3]}", *(f"{k}={v}" for k, v in job.items())]))
        return 0
    print(f"fake scontrol: unsupported: {args}", file=sys.stderr)
    return 1


_WITH_VALUE = {"-N", "-n", "-J", "-w"}


def srun(args: list[str]) -> int:
    nodes: list[str] = []
    job = ""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        if arg.startswith("--nodelist="):
            nodes = arg.split("=", 1)[1].split(",")
        elif arg.startswith("--jobid="):
            job = arg.split("=", 1)[1]
        i += 2 if arg in _WITH_VALUE else 1
    cmd = args[i:]
    wrapper = os.environ.get("CCR_TEST_NODE_WRAPPER")
    if wrapper and cmd[1:3] == ["-m", "ccr"]:
        cmd = [cmd[0], wrapper, *cmd[3:]]
    out_lock = threading.Lock()
    children = []
    for rank, node in enumerate(nodes):
        env = dict(os.environ, SLURMD_NODENAME=node, SLURM_JOB_ID=job, SLURM_PROCID=str(rank))
        children.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        )

    def copy(stream, sink) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            with out_lock:
                sink.write(line)
                sink.flush()

    threads = [
        threading.Thread(target=copy, args=(c.stdout, sys.stdout), daemon=True) for c in children
    ] + [threading.Thread(target=copy, args=(c.stderr, sys.stderr), daemon=True) for c in children]
    for t in threads:
        t.start()

    def broadcast() -> None:
        for line in sys.stdin:
            for c in children:
                try:
                    assert c.stdin is not None
                    c.stdin.write(line)
                    c.stdin.flush()
                except OSError:
                    pass
        for c in children:
            try:
                assert c.stdin is not None
                c.stdin.close()
            except OSError:
                pass

    threading.Thread(target=broadcast, daemon=True).start()
    codes = [c.wait() for c in children]
    for t in threads:
        t.join(timeout=5)
    return max(codes, default=0)


if __name__ == "__main__":
    tool, rest = sys.argv[1], sys.argv[2:]
    sys.exit(scontrol(rest) if tool == "scontrol" else srun(rest))
