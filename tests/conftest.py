"""Shared fixtures: an isolated ccr (own state dir, own work dir) that cleans up by PID."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def criu_works() -> bool:
    from ccr import config
    from ccr.engines.criu import Criu

    try:
        ok, _ = Criu(config.criu_binary()).check()
    except Exception:  # noqa: BLE001
        return False
    return ok


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def numbers(path: Path) -> list[int]:
    """The integers a test program printed, one per line (ignores partial last lines)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split("\n")[:-1] if x.strip().lstrip("-").isdigit()]


def run_ccr(
    args: tuple[str, ...], *, cwd: Path, env: dict[str, str], check: bool, timeout: float, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run `python -m ccr ARGS`; with check, a non-zero exit fails the test with its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "ccr", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ccr {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


@dataclass
class Ccr:
    """Runs the ccr CLI against a private state dir and work dir."""

    state_dir: Path
    work: Path
    env: dict[str, str]
    popens: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(
        self, *args: str, check: bool = True, timeout: float = 180, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        cwd = kw.pop("cwd", self.work)
        env = kw.pop("env", self.env)
        return run_ccr(args, cwd=cwd, env=env, check=check, timeout=timeout, **kw)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        """Start a foreground `ccr ...` (a supervisor) that the fixture kills at teardown."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccr", *args],
            cwd=kw.pop("cwd", self.work),
            env=kw.pop("env", self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )
        self.popens.append(proc)
        return proc

    def detach(self, *cmd: str, options: tuple[str, ...] = ()) -> str:
        """`ccr run --detach [options] -- cmd`; return the step id it printed."""
        return self.run("run", "--detach", *options, "--", *cmd).stdout.strip()

    def status(self, job_id: int | str) -> dict[str, Any]:
        return json.loads(self.run("status", str(job_id), "--json").stdout)

    def step(self, step: str) -> dict[str, Any]:
        job = self.status(step.split(".")[0])
        return next(s for s in job["steps"] if s["step"] == step)

    def program(self, name: str, source: str) -> Path:
        path = self.work / name
        path.write_text(source)
        return path

    # cleanup ---------------------------------------------------------------------------
    def our_pids(self) -> list[int]:
        """Every PID the registry names (inits first, then supervisors) that is still ours."""
        db_path = self.state_dir / "registry.db"
        if not db_path.exists():
            return []
        db = sqlite3.connect(db_path, timeout=30)
        try:
            rows = db.execute("SELECT init_pid, supervisor_pid FROM steps").fetchall()
        finally:
            db.close()
        pids = [r[0] for r in rows if r[0]] + [r[1] for r in rows if r[1]]
        return [p for p in pids if self._is_ours(p)]

    def marked_pids(self) -> list[int]:
        """Every process with this test's state dir in its environment: all that ccr started
        for it, CRIU and the helpers CRIU forks included, whatever the registry says."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                if self._is_ours(int(entry.name)):
                    found.append(int(entry.name))
        return found

    def _is_ours(self, pid: int) -> bool:
        # Only a process started with this test's state dir in its environment is ours: a PID
        # from the registry may have been reused by an unrelated process since.  A lazily
        # restored tree whose page server is gone shows an empty environ (its pages were
        # never filled), so a process whose cwd or open files lie in this test's own
        # directories is ours too (seen: such trees outlived two loaded test runs).
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        if f"CCR_STATE_DIR={self.state_dir}".encode() in environ.split(b"\0"):
            return True
        return any(self._in_our_dirs(link) for link in _proc_links(pid))

    def _in_our_dirs(self, target: str) -> bool:
        return any(target.startswith(f"{d}/") for d in (self.state_dir, self.work))

    def cleanup(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
        for pid in self.our_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.popens:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        while (left := self.marked_pids()) and time.monotonic() < deadline:
            for pid in left:  # strays the registry does not name, e.g. a CRIU helper
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)


def _proc_links(pid: int) -> Iterator[str]:
    """Where pid's cwd and open files point (empty where /proc does not let us look)."""
    try:
        yield os.readlink(f"/proc/{pid}/cwd")
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                yield os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
    except OSError:
        return


@pytest.fixture
def ccr(tmp_path: Path) -> Iterator[Ccr]:
    if os.geteuid() != 0:
        pytest.fail("ccr's end-to-end tests need root (CRIU); run them as root")
    if not criu_works():
        pytest.fail("no working CRIU: run scripts/install-criu.sh")
    state = tmp_path / "state"
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env["CCR_STATE_DIR"] = str(state)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    for var in list(env):
        if var.startswith(("SLURM_", "SBATCH_", "CCR_COMPRESS")):
            del env[var]
    instance = Ccr(state, work, env)
    try:
        yield instance
    finally:
        instance.cleanup()


@contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at path (to fill up, or read-only), unmounted afterwards."""
    path.mkdir(exist_ok=True)
    opts = f"{'ro,' if read_only else ''}size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


COUNTER = """\
import sys, time
i = 0
state = [0] * 1000  # some heap state that must survive
while True:
    state[i % 1000] = i
    print(i, flush=True)
    i += 1
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.05)
"""
