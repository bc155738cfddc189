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

from ccr import config, identity, interrupts, progress
from ccr.controller import checkpoint
from ccr.controller.runtime import Runtime
from ccr.engines import process
from ccr.engines.compression import Codec
from ccr.errors import EXIT_INTERNAL, EXIT_VACATED, CcrError, error_for_code, exit_code_for
from ccr.ids import JobRef, StepId
from ccr.storage import registry as reg

Report = Callable[[dict[str, Any]], None]

CONFIRM_WINDOW = 1.0  # seconds, as srun's "one more within 1 sec"


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
    tcp_established: bool = field(default_factory=config.tcp_established_default)
    # Foreground (`ccr run` on a terminal), as srun: a first Ctrl-C shows the step's state,
    # only a second within CONFIRM_WINDOW seconds is forwarded to it.
    confirm_interrupt: bool = False
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
        self._signals: list[tuple[int, float]] = []  # (signal, monotonic time it came)
        self._sigint_at: float | None = None  # an unconfirmed Ctrl-C, when confirm_interrupt
        # The step's record before start_* wrote ours, for rollback(); None: there was none.
        self._previous: reg.StepRecord | None = None
        self._recorded = False
        process.become_subreaper()

    # starting -------------------------------------------------------------------------
    def start_fresh(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        output: Path,
        error: Path | None = None,
        offsets: tuple[int | None, int | None] = (None, None),
    ) -> int:
        """Start the step; offsets: where a relay of its output files begins (foreground)."""
        pid = process.spawn_step(
            argv,
            cwd=cwd,
            env=env,
            output=output,
            error=error,
            init=config.init_binary(),
            private_tmp=self.settings.private_tmp,
        )
        self.adopt(pid)
        self._record(
            reg.StepRecord(
                job_id=self.step.job_id,
                step_id=self.step.step_id,
                argv=argv,
                cwd=str(cwd),
                output=str(output),
                error=None if error is None else str(error),
                out_offset=offsets[0],
                err_offset=offsets[1],
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
        self.adopt(pid)
        record.state = reg.RUNNING
        record.init_pid = pid
        record.init_start = self.init.start_time if self.init else None
        record.supervisor_pid = os.getpid()
        record.ended = None
        record.exit_code = None
        record.next_checkpoint = self._first_due()
        self._record(record)

    def adopt(self, pid: int) -> None:
        """The tree rooted at pid (our child) is ours: rollback() kills it."""
        self.init = process.ProcessIdentity.of(pid) or process.ProcessIdentity(pid, -1)

    def _record(self, record: reg.StepRecord) -> None:
        with self.rt.registry() as db:
            self._previous = db.find_step(self.step)
            db.put_step(record)
        self._recorded = True

    def rollback(self) -> None:
        """Undo a start nobody may rely on (abandoned, interrupted): no tree, old record."""
        if self.init is not None:
            # SIGKILL of a PID namespace's init kills every process in it.
            process.signal_process(self.init.pid, signal.SIGKILL)
            try:
                os.waitpid(self.init.pid, 0)
            except ChildProcessError:
                pass
            self.init = None
        if self._recorded:
            with self.rt.registry() as db:
                if self._previous is not None:
                    db.put_step(self._previous)
                else:
                    db.delete_step(self.step)
            self._recorded = False

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
        deferred = interrupts.take_deferred()  # came while the step was being started
        if deferred is not None:
            self._signals.append((deferred, time.monotonic()))
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
            self._signals.append((signum, time.monotonic()))

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
                sig, at = self._signals.pop(0)
                if sig in self.settings.preempt_signals and preempted is None:
                    preempted = self._preempt(sig)
                elif sig == signal.SIGINT and self.settings.confirm_interrupt:
                    self._interrupt(at)
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

    def _interrupt(self, at: float) -> None:
        """Ctrl-C in the foreground: the first shows the state, a second soon after is sent on."""
        assert self.init is not None
        if self._sigint_at is not None and at - self._sigint_at <= CONFIRM_WINDOW:
            self._sigint_at = None
            self.settings.log(f"sending SIGINT to step {self.step} (pid {self.init.pid})")
            process.signal_process(self.init.pid, signal.SIGINT)
            return
        self._sigint_at = at
        self.settings.log(
            f"{self.describe()}; press Ctrl-C again within {CONFIRM_WINDOW:g} s to interrupt it"
        )

    def describe(self) -> str:
        """One line on the step: pid, processes, last and next checkpoint."""
        assert self.init is not None
        with self.rt.registry() as db:
            record = db.find_step(self.step)
            ours = [
                c
                for c in db.checkpoints(self.step.job_id)
                if c.step_id in (None, self.step.step_id)
            ]
        procs = len(process.tree_pids(self.init.pid))
        text = f"step {self.step} running, pid {self.init.pid}, {procs} process(es)"
        if ours:
            last = ours[-1]
            when = time.strftime("%H:%M:%S", time.localtime(last.created))
            text += f", last checkpoint {last.path} at {when}"
        else:
            text += ", no checkpoint yet"
        due = record.next_checkpoint if record is not None else None
        if due is not None:
            text += f", next in {max(0, round(due - time.time()))} s"
        return text

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

    Interrupted before the report (Ctrl-C, SIGTERM), the caller tells the supervisor to
    abandon through a second pipe: one that has not reported yet rolls back what it started
    (see _ReportPipe.abandon) and says so; one that already reported keeps its step.  The
    caller then raises Interrupted, its `started` the report when the step runs after all.
    """
    log_path = config.logs_dir() / f"supervisor-{name}.log"
    read_fd, write_fd = os.pipe()
    control_r, control_w = os.pipe()
    # No Ctrl-C between the fork and the moment the caller can send abandon.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_fd)
            os.close(control_w)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach_stdio(log_path, (write_fd, control_r))
            pipe = _ReportPipe(write_fd)
            pipe.watch(control_r)
            # Progress until the report (e.g. decompressing a restart's images) goes to the
            # caller, whose terminal draws it; the caller's own bar is not ours to draw.
            progress.set_listener(pipe.progress)
            os._exit(_run_reporting(target, pipe))
        except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
            os._exit(EXIT_INTERNAL)
    os.close(write_fd)
    os.close(control_r)
    # A thread reads the pipe, so an interrupt of this (main) thread never loses a line.
    reader = _ReportReader(read_fd, progress.relay())
    try:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            reader.start()
            reader.wait()
        except KeyboardInterrupt as exc:
            try:
                os.write(control_w, b"abandon\n")
            except OSError:
                pass  # the supervisor is gone already: its report (if any) is in the pipe
            reader.relay_progress = False
            reader.wait(uninterruptible=True)  # the rollback's outcome is worth waiting for
            message = reader.message
            interrupted = interrupts.Interrupted(interrupts.signum_of(exc))
            interrupted.started = message if message is not None and message.get("ok") else None
            raise interrupted from None
    finally:
        reader.wait(uninterruptible=True)
        os.close(read_fd)
        os.close(control_w)
        _reap(child)
    message = reader.message
    if message is None:
        raise CcrError(f"supervisor died before reporting (see {log_path})")
    if not message.get("ok"):
        raise error_for_code(int(message.get("code", 1)), str(message.get("error")))
    return message


class _ReportReader(threading.Thread):
    """Reads a supervisor's report pipe to EOF: progress goes on, the first report is kept."""

    def __init__(self, fd: int, forward: Callable[[int, str, int, int], None]) -> None:
        super().__init__(name="ccr-report", daemon=True)
        self.fd = fd
        self.forward = forward
        self.relay_progress = True
        self.message: dict[str, Any] | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            pending = b""
            while chunk := os.read(self.fd, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    item = json.loads(line)
                    if "progress" not in item:
                        if self.message is None:
                            self.message = item
                    elif self.relay_progress:
                        self.forward(*item["progress"])
        finally:
            self._done.set()

    def wait(self, uninterruptible: bool = False) -> None:
        """Until EOF.  (An Event, not join(): a join that Ctrl-C interrupts may return early.)"""
        if self.ident is None:
            return  # never started
        while not self._done.is_set():
            try:
                self._done.wait(0.2)
            except KeyboardInterrupt:
                if not uninterruptible:
                    raise


def _reap(child: int) -> None:
    while True:
        try:
            os.waitpid(child, 0)
            return
        except ChildProcessError:
            return
        except KeyboardInterrupt:
            continue  # the intermediate child exits at once


def _detach_stdio(log_path: Path, keep: tuple[int, ...]) -> None:  # pragma: no cover - child only
    null = os.open(os.devnull, os.O_RDONLY)
    with identity.privileged():  # the service's logs dir
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in range(3, 1024):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


class Abandoned(KeyboardInterrupt):
    """The caller of spawn_background gave up before the report: roll back, report that."""


class _ReportPipe:
    """The pipe to spawn_background's caller: progress lines, then the one report.

    An abandon request from the caller (watch) that comes before the report interrupts the
    main thread once (SIGINT aimed at it, so a blocking CRIU call wakes up too); report()
    of a success after that raises Abandoned instead of sending, so the step is rolled back.
    Whichever of the two takes the lock first decides; the caller learns which.
    """

    # Progress lines at most this often per task (the bar redraws ~10 times a second).
    _INTERVAL = 0.1

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reported = False
        self.abandoned = False
        self._raised = False
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}
        self._main = threading.main_thread().ident

    def watch(self, control_fd: int) -> None:
        """Listen for the caller's abandon request (a thread; SIGINT now means that)."""
        signal.signal(signal.SIGINT, self._on_sigint)

        def listen() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                data = os.read(control_fd, 64)
            except OSError:
                data = b""
            finally:
                os.close(control_fd)
            if data.startswith(b"abandon"):
                self.abandon()

        threading.Thread(target=listen, name="ccr-abandon", daemon=True).start()

    def abandon(self) -> None:
        with self._lock:
            if self.reported:
                return  # too late: the step runs, and the caller has been told so
            self.abandoned = True
        assert self._main is not None
        signal.pthread_kill(self._main, signal.SIGINT)

    def _on_sigint(self, _signum: int, _frame: object) -> None:
        if self.abandoned and not self._raised:
            self._raised = True
            raise Abandoned("the caller was interrupted")

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
            if last and message.get("ok") and self.abandoned:
                self._raised = True  # the SIGINT on its way must not raise a second time
                raise Abandoned("the caller was interrupted")
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
    except KeyboardInterrupt:
        # Abandoned by the caller (or SIGTERM): whatever target started is rolled back.
        print("ccr: supervisor: abandoned before the step was started", file=sys.stderr)
        report(
            {
                "ok": False,
                "abandoned": True,
                "error": "the supervisor was interrupted before the step started",
                "code": 130,
            }
        )
        return 130
    except BaseException as exc:  # noqa: BLE001 - a supervisor must always report
        traceback.print_exc()
        report({"ok": False, "error": f"supervisor failed: {exc}", "code": 1})
        return 1
    finally:
        if not pipe.reported:
            report({"ok": False, "error": "supervisor ended without starting the step", "code": 1})
