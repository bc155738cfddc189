"""Launch step process trees in their own PID namespace, and look at or signal live ones."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ccr.errors import CcrError

CLONE_NEWPID = 0x20000000
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class ProcessIdentity:
    """A PID plus its kernel start time, so a reused PID is never mistaken for ours."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        start = start_time(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start_time


def start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live, non-zombie PID, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def become_subreaper() -> None:
    """Make orphans of our descendants (restored roots, step inits) our own children."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise CcrError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def spawn_step(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    output: Path,
    init: str,
    error: Path | None = None,
) -> int:
    """Start argv as a step and return the host PID of the step's init.

    The init (PID 1 of a fresh PID namespace, session leader, stdin /dev/null, stdout and
    stderr appended to `output`, or stderr to `error` when given) runs `argv` under `init`
    (dumb-init), which reaps orphans and forwards signals.  A PID namespace per step means
    the whole tree, daemons included, hangs under one root for CRIU, and restores never
    collide with PIDs in use.  The init ends up a child of the caller, which must be a
    subreaper (see become_subreaper).
    """
    out_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    err_fd = (
        out_fd
        if error is None
        else os.open(error, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    )
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        _intermediate(argv, cwd, env, init, (out_fd, err_fd), null_fd, report_w)
    os.close(report_w)
    os.close(out_fd)
    if err_fd != out_fd:
        os.close(err_fd)
    os.close(null_fd)
    data = b""
    while chunk := os.read(report_r, 65536):
        data += chunk
    os.close(report_r)
    os.waitpid(child, 0)
    if len(data) < 8:
        raise CcrError(f"could not start step: {data.decode(errors='replace') or 'unknown error'}")
    (init_pid,) = struct.unpack("q", data[:8])
    if data[8:]:
        raise CcrError(f"could not start step: {data[8:].decode(errors='replace')}")
    return int(init_pid)


def _intermediate(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    init: str,
    out_fds: tuple[int, int],
    null_fd: int,
    w: int,
) -> None:  # pragma: no cover - runs in the forked child
    try:
        if _libc.unshare(CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            os.write(
                w, struct.pack("q", -1) + f"unshare(CLONE_NEWPID): {os.strerror(err)}".encode()
            )
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            _exec_init(argv, cwd, env, init, out_fds, null_fd, w)
        os.write(w, struct.pack("q", pid))
    finally:
        os._exit(0)


def _exec_init(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    init: str,
    out_fds: tuple[int, int],
    null_fd: int,
    w: int,
) -> None:  # pragma: no cover - runs in the forked child
    try:
        os.setsid()
        os.dup2(null_fd, 0)
        os.dup2(out_fds[0], 1)
        os.dup2(out_fds[1], 2)
        os.closerange(3, w)
        os.closerange(w + 1, 65536)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(cwd)
        os.execve(init, [init, *argv], env)
    except OSError as exc:
        os.write(w, f"{argv[0]}: {exc.strerror}".encode())
    finally:
        os._exit(127)


def tree_pids(root: int) -> list[int]:
    """The root and every descendant, root first."""
    try:
        proc = psutil.Process(root)
        return [root] + [p.pid for p in proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(root: int) -> int:
    """Resident memory of the whole tree, in bytes: what a dump will write, roughly."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total


def signal_process(pid: int, sig: int) -> bool:
    """Send sig; False when the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(identity: ProcessIdentity, timeout: float) -> bool:
    """Wait until the process has exited (or is a zombie); True if it did within timeout."""
    deadline = time.monotonic() + timeout
    while identity.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def terminate(identity: ProcessIdentity, grace: float = 5.0) -> None:
    """SIGTERM a step's init (it forwards the signal), then SIGKILL it after `grace` seconds.

    Killing the init of a PID namespace kills every process in it.
    """
    if not identity.alive():
        return
    signal_process(identity.pid, signal.SIGTERM)
    if not wait_gone(identity, grace):
        signal_process(identity.pid, signal.SIGKILL)
        wait_gone(identity, 10.0)


def stopped_pids(root: int) -> list[int]:
    """PIDs of the tree that are stopped (T) or stopped under a tracer (t)."""
    stopped = []
    for pid in tree_pids(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "tT":
            stopped.append(pid)
    return stopped


def resume_tree(root: int, timeout: float = 5.0) -> list[int]:
    """SIGCONT every task of the tree until none is stopped; return those still stopped."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in tree_pids(root):
            signal_process(pid, signal.SIGCONT)
        stuck = stopped_pids(root)
        if not stuck or time.monotonic() >= deadline:
            return stuck
        time.sleep(0.05)


def restore_leftovers(since: int, helper_exe: str) -> list[int]:
    """Our children started at or after `since` (clock ticks) by an abandoned restore.

    These are PID-namespace inits (half-restored roots) and helper_exe processes (CRIU's own
    forks, orphaned when CRIU was killed and reparented to us, the subreaper).
    """
    found = []
    helper = os.path.realpath(helper_exe)
    for child in psutil.Process().children():
        start = start_time(child.pid)
        if start is None or start < since:
            continue
        try:
            exe = os.path.realpath(f"/proc/{child.pid}/exe")
        except OSError:
            exe = ""
        if exe == helper or (ns_pid(child.pid) or 0) != child.pid:
            found.append(child.pid)
    return found


def now_ticks() -> int:
    """The current time in the clock ticks /proc uses for start times."""
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def ns_pid(pid: int) -> int | None:
    """The innermost-namespace PID of a host PID (the `NSpid` line's last field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None
