"""A step's supervisor: starts or restores its tree, waits, checkpoints on a timer or signal."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr import config, progress
from ccr.controller import checkpoint
from ccr.controller.runtime import Runtime
from ccr.engines import process
from ccr.engines.compression import Codec
from ccr.errors import EXIT_VACATED, CcrError, error_for_code, exit_code_for
from ccr.ids import JobRef, StepId
from ccr.storage import registry as reg

Report = Callable[[dict[str, Any]], None]


@dataclass
class SupervisorSettings:
    """What a supervisor does besides waiting: interval checkpoints and preemption."""

    interval: int = 0  # seconds between checkpoints; 0: none
    keep: int = 2
    preempt_signals: tuple[int, ...] = (signal.SIGTERM,)
    grace: float | None = None  # MaxWait of the preemption checkpoint
    max_wait: float | None = None  # MaxWait of interval checkpoints
    codec: Codec = field(default_factory=checkpoint.default_codec)
    private_tmp: bool = True  # the step's /tmp is a tmpfs of its own (else the node's /tmp)
    # Checkpoint TCP connections to peers outside the step too (--tcp-established).
    tcp_established: bool = field(default_factory=checkpoint.tcp_established_default)
    log: Callable[[str], None] = field(default=lambda msg: print(f"ccr: {msg}", file=sys.stderr))


def exit_code_of(status: int) -> int:
    """A shell-style exit code (128+N for death by signal N) from a waitpid status."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """Owns one step's tree: the tree's init is this process's child."""

    def __init__(self, rt: Runtime, step: StepId, settings: SupervisorSettings) -> None:
        self.rt = rt
        self.step = step
        self.settings = settings
        self.init: process.ProcessIdentity | None = None
        self._signals: list[int] = []
        process.become_subreaper()

    # starting -------------------------------------------------------------------------
    def start_fresh(self, argv: list[str], cwd: Path, env: dict[str, str], output: Path) -> int:
        pid = process.spawn_step(
            argv,
            cwd=cwd,
            env=env,
            output=output,
            init=config.init_binary(),
            private_tmp=self.settings.private_tmp,
        )
        self._adopt(pid)
        with self.rt.registry() as db:
            db.put_step(
                reg.StepRecord(
                    job_id=self.step.job_id,
                    step_id=self.step.step_id,
                    argv=argv,
                    cwd=str(cwd),
                    output=str(output),
                    state=reg.RUNNING,
                    init_pid=pid,
                    init_start=self.init.start_time if self.init else None,
                    supervisor_pid=os.getpid(),
                    started=time.time(),
                    next_checkpoint=self._first_due(),
                )
            )
        return pid

    def start_restored(self, pid: int, record: reg.StepRecord) -> None:
        """Take over a tree that was just restored as our child."""
        self._adopt(pid)
        record.state = reg.RUNNING
        record.init_pid = pid
        record.init_start = self.init.start_time if self.init else None
        record.supervisor_pid = os.getpid()
        record.ended = None
        record.exit_code = None
        record.next_checkpoint = self._first_due()
        with self.rt.registry() as db:
            db.put_step(record)

    def _adopt(self, pid: int) -> None:
        self.init = process.ProcessIdentity.of(pid) or process.ProcessIdentity(pid, -1)

    def _first_due(self) -> float | None:
        # As in Slurm, no checkpoint before start + interval (so a restart is not re-dumped).
        return time.time() + self.settings.interval if self.settings.interval > 0 else None

    # waiting --------------------------------------------------------------------------
    def wait(self) -> int:
        """Supervise until the tree exits; return this supervisor's exit code."""
        assert self.init is not None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handled: set[int] = {signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGTERM}
        handled.update(self.settings.preempt_signals)
        old = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            return self._loop(wake_r)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _loop(self, wake_r: int) -> int:
        assert self.init is not None
        interval = self.settings.interval
        due = self._first_due()
        preempted: bool | None = None
        recover_check = 0.0
        while True:
            pid, status = os.waitpid(self.init.pid, os.WNOHANG)
            if pid:
                return self._finished(exit_code_of(status), preempted)
            while self._signals:
                sig = self._signals.pop(0)
                if sig in self.settings.preempt_signals and preempted is None:
                    preempted = self._preempt(sig)
                elif sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                    process.signal_process(self.init.pid, sig)
            now = time.time()
            if now >= recover_check and preempted is None:
                recover_check = now + 2.0
                self._recover_if_abandoned()
            if due is not None and now >= due and preempted is None:
                self._interval_checkpoint()
                due = time.time() + interval
                with self.rt.registry() as db:
                    db.update_step_if_owner(self.step, self.init.pid, next_checkpoint=due)
            timeout = 1.0 if due is None else max(0.0, min(1.0, due - time.time()))
            select.select([wake_r], [], [], timeout)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _recover_if_abandoned(self) -> None:
        """A vacate whose ccr was killed leaves our tree stopped: wake it up again."""
        with self.rt.registry() as db:
            state = db.step(self.step).state
        if state == reg.VACATING:
            for step in checkpoint.recover_interrupted(self.rt, self.step.job_id):
                self.settings.log(
                    f"resumed step {step}: the checkpoint that stopped it was abandoned"
                )

    def _interval_checkpoint(self) -> None:
        opts = checkpoint.CheckpointOptions(
            max_wait=self.settings.max_wait,
            keep=self.settings.keep,
            codec=self.settings.codec,
            tcp_established=self.settings.tcp_established,
        )
        try:
            result = checkpoint.create(self.rt, JobRef(self.step.job_id, self.step.step_id), opts)
            self.settings.log(
                f"checkpoint {result.path} (frozen {result.frozen_time:.2f}s, "
                f"total {result.total_time:.2f}s)"
            )
        except CcrError as exc:
            # Recorded as the job's last error by create(); the job goes on.
            self.settings.log(f"interval checkpoint of {self.step} failed: {exc}")

    def _preempt(self, sig: int) -> bool:
        """Checkpoint and terminate the tree; True when a checkpoint to resume from exists."""
        assert self.init is not None
        name = signal.Signals(sig).name
        self.settings.log(f"{name}: checkpointing step {self.step} before it is terminated")
        opts = checkpoint.CheckpointOptions(
            max_wait=self.settings.grace,
            stop=True,
            keep=self.settings.keep,
            codec=self.settings.codec,
            tcp_established=self.settings.tcp_established,
        )
        try:
            result = checkpoint.create(self.rt, JobRef(self.step.job_id, self.step.step_id), opts)
            self.settings.log(f"checkpoint {result.path}; step {self.step} vacated")
            return True
        except CcrError as exc:
            self.settings.log(f"checkpoint on {name} failed: {exc}; terminating step {self.step}")
            process.terminate(self.init, grace=5.0)
            return self._has_checkpoint()

    def _has_checkpoint(self) -> bool:
        with self.rt.registry() as db:
            return any(
                c.step_id in (None, self.step.step_id) for c in db.checkpoints(self.step.job_id)
            )

    def _finished(self, code: int, preempted: bool | None) -> int:
        assert self.init is not None
        with self.rt.registry() as db:
            record = db.step(self.step)
            if (record.init_pid, record.init_start) != (self.init.pid, self.init.start_time):
                # The step was restored meanwhile under another supervisor: its record is
                # no longer ours to close.
                return EXIT_VACATED if record.state == reg.RUNNING else code
            if record.state in (reg.VACATING, reg.VACATED) or preempted:
                state = reg.VACATED
            elif record.state == reg.CANCELLED:
                state = reg.CANCELLED
            else:
                state = reg.COMPLETED if code == 0 else reg.FAILED
            db.update_step(
                self.step, state=state, exit_code=code, ended=time.time(), next_checkpoint=None
            )
        if state == reg.VACATED:
            return EXIT_VACATED
        return code


def spawn_background(name: str, target: Callable[[Report], int]) -> dict[str, Any]:
    """Run target in a detached supervisor process; return the first report it sends.

    The supervisor is double-forked into its own session with its output in the state
    directory's logs, so the caller can exit (or keep running) without owning it.
    """
    log_path = config.logs_dir() / f"supervisor-{name}.log"
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach_stdio(log_path, write_fd)
            pipe = _ReportPipe(write_fd)
            # Progress until the report (e.g. decompressing a restart's images) goes to the
            # caller, whose terminal draws it; the caller's own bar is not ours to draw.
            progress.set_listener(pipe.progress)
            os._exit(_run_reporting(target, pipe))
        except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
            os._exit(70)
    os.close(write_fd)
    forward = progress.relay()
    message: dict[str, Any] | None = None
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            item = json.loads(line)
            if "progress" in item:
                forward(*item["progress"])
            elif message is None:
                message = item
    os.close(read_fd)
    os.waitpid(child, 0)
    if message is None:
        raise CcrError(f"supervisor died before reporting (see {log_path})")
    if not message.get("ok"):
        raise error_for_code(int(message.get("code", 1)), str(message.get("error")))
    return message


def _detach_stdio(log_path: Path, keep_fd: int) -> None:  # pragma: no cover - child only
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in range(3, 1024):
        if fd != keep_fd:
            try:
                os.close(fd)
            except OSError:
                pass
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


class _ReportPipe:
    """The pipe to spawn_background's caller: progress lines, then the one report."""

    # Progress lines at most this often per task (the bar redraws ~10 times a second).
    _INTERVAL = 0.1

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reported = False
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}

    def progress(self, task_id: int, description: str, done: int, total: int) -> None:
        now = time.monotonic()
        if 0 < done < total and now - self._last.get(task_id, 0.0) < self._INTERVAL:
            return
        self._last[task_id] = now
        self._send({"progress": [task_id, description, done, total]}, last=False)

    def report(self, message: dict[str, Any]) -> None:
        self._send(message, last=True)

    def _send(self, message: dict[str, Any], last: bool) -> None:
        with self._lock:
            if self.reported:
                return
            try:
                os.write(self.fd, json.dumps(message).encode() + b"\n")
            except OSError:
                pass  # the caller is gone: the step runs on regardless
            if last:
                self.reported = True
                os.close(self.fd)
                progress.set_listener(None)


def _run_reporting(target: Callable[[Report], int], pipe: _ReportPipe) -> int:  # pragma: no cover
    report = pipe.report
    try:
        return target(report)
    except CcrError as exc:
        report({"ok": False, "error": str(exc), "code": exit_code_for(exc)})
        print(f"ccr: supervisor: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except BaseException as exc:  # noqa: BLE001 - a supervisor must always report
        traceback.print_exc()
        report({"ok": False, "error": f"supervisor failed: {exc}", "code": 1})
        return 1
    finally:
        if not pipe.reported:
            report({"ok": False, "error": "supervisor ended without starting the step", "code": 1})
