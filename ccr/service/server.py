"""`ccr daemon`: the per-node service that runs ccr for users other than root.

Root runs it (systemd's ccr-daemon.service, or in the foreground).  It listens on a Unix
socket (0666 in a 0755 directory: any local user may connect), learns each caller from
the kernel (SO_PEERCRED: uid, gid, pid; supplementary groups from the user database) and
forks one worker per connection, so a slow dump of one job never stalls another's
`status`.  The worker, in the caller's cgroup, with the caller's working directory and
stdio, acts as the caller (ccr.identity: the caller's file credentials for every path,
the registry's owner checks for every job, the step's init dropped to the caller) and runs
the same command line as ccr in-process; the caller's environment is only the job's.
"""

from __future__ import annotations

import io
import os
import pwd
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ccr import identity
from ccr.errors import EXIT_INTERNAL, CriuError, PermissionDeniedError
from ccr.service import client, protocol

REQUEST_TIMEOUT = 30.0  # seconds a connection may take to send its request
# Once its client is gone (scancel's SIGKILL after KillWait, a dead srun), a worker has this
# long to finish what the disconnect's SIGTERM started (a preemption checkpoint: 0.2-3 s
# here for a small tree, a GiB in ~10 s) before it is killed and its steps with it: no
# hung CRIU keeps a cancelled job's processes alive.
ORPHAN_GRACE = 60.0
# Slurm's clients a worker runs for a user run as that user (see _root_children_get).
SLURM_CLIENTS = frozenset({"srun", "sbatch", "scontrol", "scancel", "squeue", "sinfo"})
# ccr's own settings come from the service's environment, never from a caller's.
SERVICE_KEYS = ("CCR_STATE_DIR", "CCR_KEY_FILE", "CCR_CRIU", "CCR_INIT", "CCR_SCRATCH", "CCR_DEBUG")
SERVICE_PREFIX = identity.PRIVATE_SCRATCH_ENV


def _log(message: str) -> None:
    print(f"ccr daemon: {message}", file=sys.stderr, flush=True)


def _containers(state: Path) -> list[Path]:
    """The private scratch containers (tmpfs and disk), root-owned 0711 (see ccr.identity)."""
    from ccr import config

    made = []
    for name, base in (("FAST", config.fast_scratch()), ("DISK", state.parent)):
        try:
            path = Path(tempfile.mkdtemp(prefix=".ccr-service-", dir=base))
        except OSError:
            continue
        path.chmod(0o711)
        os.environ[f"{SERVICE_PREFIX}_{name}"] = str(path)
        made.append(path)
    return made


def serve(path: Path) -> int:
    """Listen on path until SIGTERM or SIGINT; return the exit code."""
    if os.geteuid() != 0:
        _log("must run as root")
        return PermissionDeniedError.exit_code
    from ccr import cli, config

    # Loaded once here, so that each forked worker starts warm (the point of forking).
    for name in (
        "checkpoint",
        "restart",
        "run",
        "jobs",
        "describe",
        "dispatch",
        "coordinator",
        "multinode_restart",
        "supervisor",
    ):
        __import__(f"ccr.controller.{name}")
    __import__("ccr.engines.criu")
    try:
        __import__("pycriu.images")
    except ImportError:
        pass
    state = config.state_dir()
    # Resolved once: the CRIU the service runs as root is never looked up in a caller's PATH.
    try:
        os.environ["CCR_CRIU"] = config.criu_binary()
        os.environ["CCR_INIT"] = config.init_binary()
    except Exception as exc:  # noqa: BLE001 - reported at once; the service does not start
        _log(str(exc))
        return CriuError.exit_code
    containers = _containers(state)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o666)
    listener.listen(128)
    service_env = dict(os.environ)
    stop = threading.Event()

    def on_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    _log(f"listening on {path} (state {state})")
    workers: set[int] = set()
    try:
        while not stop.is_set():
            _reap(workers, state)
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except InterruptedError:
                continue
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the worker
                code = EXIT_INTERNAL
                try:
                    listener.close()
                    code = _worker(conn, service_env, cli)
                except BaseException:  # noqa: BLE001 - a worker never returns into the loop
                    code = EXIT_INTERNAL
                finally:
                    os._exit(code)
            workers.add(pid)
            conn.close()
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        for container in containers:
            shutil.rmtree(container, ignore_errors=True)
        _log("stopped")
    return 0


def _reap(workers: set[int], state: Path) -> None:
    for pid in list(workers):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            workers.discard(pid)
            if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 70:
                _end_orphans(state, pid)


def _end_orphans(state: Path, worker: int) -> None:
    """A worker that was killed (ORPHAN_GRACE, OOM, a crash) leaves the steps it supervised
    (a foreground `ccr run`) with nobody to end them, and under proctrack/linuxproc Slurm
    does not see them (they descend from the service, not from slurmstepd): kill them."""
    from ccr.engines import process
    from ccr.storage import registry as reg

    try:
        with reg.Registry.open(state) as db:
            rows = db.db.execute(
                "SELECT job_id, step_id, init_pid, init_start FROM steps "
                "WHERE supervisor_pid = ? AND state IN (?, ?)",
                (worker, reg.RUNNING, reg.VACATING),
            ).fetchall()
            for job_id, step_id, init_pid, init_start in rows:
                if init_pid and process.start_time(init_pid) == init_start:
                    # SIGKILL of a PID namespace's init kills every process in it.
                    process.signal_process(init_pid, signal.SIGKILL)
                    _log(f"worker {worker} died: killed step {job_id}.{step_id} (pid {init_pid})")
                db.db.execute(
                    "UPDATE steps SET state = ?, ended = ? WHERE job_id = ? AND step_id = ?",
                    (reg.FAILED, time.time(), job_id, step_id),
                )
    except Exception as exc:  # noqa: BLE001 - the service serves on whatever this met
        _log(f"cannot end the steps of worker {worker}: {exc}")


def caller_of(pid: int, uid: int, gid: int) -> identity.Caller:
    """The caller's supplementary groups from the user database (as login gives them)."""
    try:
        name = pwd.getpwuid(uid).pw_name
        groups = tuple(sorted(set(os.getgrouplist(name, gid))))
    except KeyError:
        groups = (gid,)
    return identity.Caller(uid=uid, gid=gid, groups=groups, pid=pid)


def join_cgroup(pid: int) -> None:
    """Move this worker into the cgroup (v2) of the caller's process, so that the steps it
    launches or restores are where Slurm (proctrack/cgroup, task/cgroup) and systemd look."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        if line.startswith("0::"):
            target = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "cgroup.procs"
            try:
                target.write_text(f"{os.getpid()}\n")
            except OSError:
                pass  # not cgroup v2 here, or a domain we may not join: stay where we are
            return


def _refuse(conn: socket.socket, message: str, code: int) -> int:
    try:
        protocol.send(conn, {"op": "error", "message": message, "code": code})
    except OSError:
        pass
    return code


def _request(conn: socket.socket) -> tuple[list[str], dict[str, str], list[int]]:
    message, fds = protocol.recv(conn, max_fds=protocol.MAX_FDS)
    argv, env = message.get("argv"), message.get("env")
    ok = (
        message.get("op") == "cli"
        and isinstance(argv, list)
        and all(isinstance(a, str) for a in argv)
        and isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        and len(fds) == 4
    )
    if not ok:
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError("malformed request (want op cli, argv, env and 4 fds)")
    return list(argv or []), dict(env or {}), fds


def _worker(conn: socket.socket, service_env: dict[str, str], cli: Any) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    pid, uid, gid = protocol.peer_credentials(conn)
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        argv, env, fds = _request(conn)
    except (protocol.ProtocolError, protocol.Disconnected, OSError) as exc:
        return _refuse(conn, f"bad request: {exc}", protocol.ProtocolError.exit_code)
    conn.settimeout(None)
    if argv[:1] == ["daemon"]:
        return _refuse(conn, "`ccr daemon` is not a request", 2)
    caller = caller_of(pid, uid, gid)
    join_cgroup(pid)
    cwd, stdin, stdout, stderr = fds
    # The caller's environment is the job's; ccr's own settings stay the service's.
    os.environ.clear()
    os.environ.update(env)
    for key in SERVICE_KEYS:
        os.environ.pop(key, None)
    os.environ.update(
        {k: v for k, v in service_env.items() if k in SERVICE_KEYS or k.startswith(SERVICE_PREFIX)}
    )
    _root_children_get(service_env, env)
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    sys.stdin = io.TextIOWrapper(os.fdopen(0, "rb", closefd=False))
    sys.stdout = io.TextIOWrapper(
        os.fdopen(1, "wb", closefd=False), line_buffering=os.isatty(1), write_through=False
    )
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
    identity.become(caller)
    try:
        os.fchdir(cwd)  # with the caller's credentials: their own working directory
    except OSError as exc:
        return _refuse(conn, f"cannot enter the working directory: {exc.strerror}", 9)
    finally:
        os.close(cwd)
    threading.Thread(target=_listen, args=(conn,), name="ccr-client", daemon=True).start()
    code = cli.run_in_process(argv)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    _answered.set()  # the client may hang up now: that is no longer a SIGTERM
    try:
        protocol.send(conn, {"op": "exit", "code": code})
    except OSError:
        pass
    return 0


_answered = threading.Event()


def _listen(conn: socket.socket) -> None:
    """Signals the client forwards; its disconnect (killed, say) counts as SIGTERM: what
    was under way is rolled back (create, restart) or checkpointed and ended (run), and
    ORPHAN_GRACE later the worker is killed (the service then kills its steps)."""
    allowed = set(client.FORWARDED)
    while True:
        try:
            message, _ = protocol.recv(conn)
        except (protocol.Disconnected, protocol.ProtocolError, OSError):
            if _answered.is_set():
                return
            os.kill(os.getpid(), signal.SIGTERM)
            if not _answered.wait(ORPHAN_GRACE):
                os.kill(os.getpid(), signal.SIGKILL)
            return
        signum = message.get("signum")
        if message.get("op") == "signal" and signum in allowed:
            os.kill(os.getpid(), int(signum))


def _root_children_get(service_env: dict[str, str], caller_env: dict[str, str]) -> None:
    """Programs this worker starts as root (CRIU, ss) get the service's own environment,
    never the caller's (LD_PRELOAD, PATH): only the step itself, which drops to the caller
    before exec, runs in the caller's.

    Slurm's clients (srun, sbatch, scontrol, ...) run as the caller, in the caller's
    environment less ccr's own settings: Slurm then authorizes every step, requeue and
    update itself (a user's `ccr create J` of another user's job J is Slurm's refusal,
    never a root srun into it), and the tasks an srun starts on the nodes are the
    caller's, whose `ccr` goes to each node's own service as that user."""
    import subprocess

    original = subprocess.Popen.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        argv = args[0] if args else kwargs.get("args")
        first = argv[0] if isinstance(argv, list | tuple) and argv else argv
        caller = identity.current()
        if os.path.basename(str(first)) in SLURM_CLIENTS and identity.served_user():
            assert caller is not None
            kwargs.update(user=caller.uid, group=caller.gid, extra_groups=list(caller.groups))
            env = kwargs.get("env")
            kwargs["env"] = {
                k: v
                for k, v in (caller_env if env is None else env).items()
                if k not in SERVICE_KEYS and not k.startswith(SERVICE_PREFIX)
            }
        elif kwargs.get("env") is None:
            kwargs["env"] = service_env
        original(self, *args, **kwargs)

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


def main(socket_arg: str | None) -> int:
    return serve(Path(socket_arg) if socket_arg else client.socket_path())
