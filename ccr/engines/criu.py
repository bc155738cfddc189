"""CRIU through its RPC protocol (pycriu's protobufs over `criu swrk`): dump, restore, check."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ccr import identity
from ccr.deadline import NO_DEADLINE, Deadline
from ccr.engines import criu_wire, process
from ccr.errors import NO_SPACE, CcrError, CriuError, JobStateError, StorageError
from ccr.locking import exclusive_lock

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


# Called on each CRIU notification (e.g. "pre-dump", "post-dump", "post-restore") with the
# notification name and the PID CRIU reports; raising aborts the CRIU action.
NotifyHook = Callable[[str, int], None]


@dataclass
class DumpStats:
    """What a dump cost: wall time and CRIU's own counters (podman's field names)."""

    wall_time: float = 0.0
    freezing_time: float = 0.0
    frozen_time: float = 0.0
    memdump_time: float = 0.0
    memwrite_time: float = 0.0
    pages_scanned: int = 0
    pages_written: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # Dumps tried: more than 1 when CRIU refused a transient state first (TRANSIENT_DUMP).
    attempts: int = 1


@dataclass
class RestoreResult:
    """A finished restore: the root's host PID and how long it took."""

    pid: int
    wall_time: float


# The largest deleted-but-open file ("ghost") a dump copies into the image; CRIU's default
# is 1 MiB.  MPI transports (UCX, Open MPI's vader) create their shared memory segments in
# the step's /dev/shm and unlink them at once: several MiB each, in the step's own tmpfs,
# so part of its state that must be saved.
GHOST_LIMIT = 1 << 30
# CRIU's refusals of a state that passes by itself within moments, as its log words them;
# a dump refused so is tried again (the one place they are matched: transient_reason).
# A process whose main thread has exited while its others still run (a worker exiting:
# exit_group reaches its threads one by one) is a zombie with threads until the last ends.
TRANSIENT_DUMP = (
    "Zombies with threads are not supported",
    "Zombie thread not supported",
)
# Pauses between tries of a transiently refused dump: some 6 s in all, within the limit.
DUMP_RETRY_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 2.0)


def transient_reason(log_file: Path) -> str | None:
    """The transient state (TRANSIENT_DUMP) a failed dump's log reports, or None."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    return next((reason for reason in TRANSIENT_DUMP if reason in text), None)


# How CRIU keeps the peers of checkpointed TCP connections quiet while they are dumped
# (in the order of rpc.proto's criu_network_lock_method, whose values start at 1).
NETWORK_LOCKS = ("iptables", "nftables", "skip")
# What a dumped tree does once its images are written.
FINAL_STATES = ("running", "stopped", "killed")
# CRIU's log level 4: debug.  A failed dump or restore is explained only at this level,
# and the log costs ~1 ms per dump here.
LOG_LEVEL = 4


@dataclass(frozen=True)
class CriuOptions:
    """Everything ccr asks of CRIU for one dump or restore, as one value (runc's CriuOpts).

    Made only by criu_options(); request() fills CRIU's RPC request from it and from
    nothing else, so this value is the whole of what CRIU is told (besides the image and
    work directories, passed as descriptors for each call).

    Each step has its own mount namespace (see process.spawn_step), which CRIU dumps and
    restores with the tree.  The step's own mounts (its /proc and its tmpfs at /dev/shm and
    /tmp, contents included) go into the image; the node's mounts the step sees are
    external (auto_ext_mnt): CRIU records where they are on the node and bind-mounts them
    from there at restore.  The step's root mount is the node's "/" (root).  A tree without
    a mount namespace of its own (an image from an older ccr) ignores all three.
    """

    action: str  # "dump" or "restore"
    pid: int | None = None  # dump: the tree's root
    leave_running: bool = False  # dump: the tree goes on after its images are written
    leave_stopped: bool = False  # dump: ... or stays SIGSTOP'd, for a vacate to kill it
    # The tree's file locks (flock, POSIX) are its state: a job holding one gets it back.
    file_locks: bool = True
    tcp_established: bool = False
    # One of NETWORK_LOCKS; None: CRIU's default (iptables).  Matters only with
    # tcp_established, and must be the same for a dump and its restore.
    network_lock: str | None = None
    auto_ext_mnt: bool = True
    ghost_limit: int | None = None  # dump: see GHOST_LIMIT
    root: str | None = None  # restore: the mount namespace's root on the node
    # restore: the root becomes ccr's child (criu's sibling), so ccr can wait for its
    # exit status.
    rst_sibling: bool = False
    # CRIU's notifications (pre-dump, post-dump, ...) go to the caller's hook.
    notify_scripts: bool = False
    log_file: str = ""
    log_level: int = LOG_LEVEL
    # dump: a user's dump run as that user (node service, root without CAP_SYS_RESOURCE:
    # see identity.criu_child_ids), which CRIU refuses without this option.
    unprivileged: bool = False
    # restore: the tree's private anonymous memory is left out, each task's uffd handed to
    # the listener on the work dir's lazy-pages.socket (engines.page_server.Keeper), which
    # must be listening before the restore starts.
    lazy_pages: bool = False

    def rpc_fields(self, images_fd: int, work_fd: int) -> dict[str, int | bool | str]:
        """The fields of CRIU's criu_opts these options set (rpc.proto names), on
        images_fd and work_fd; CRIU's defaults for every other."""
        fields: dict[str, int | bool | str] = {
            "images_dir_fd": images_fd,
            "work_dir_fd": work_fd,
            "log_file": self.log_file,
            "log_level": self.log_level,
            "notify_scripts": self.notify_scripts,
            "file_locks": self.file_locks,
            "tcp_established": self.tcp_established,
            "auto_ext_mnt": self.auto_ext_mnt,
        }
        if self.network_lock is not None:
            fields["network_lock"] = NETWORK_LOCKS.index(self.network_lock) + 1
        if self.pid is not None:
            fields.update(
                pid=self.pid, leave_running=self.leave_running, leave_stopped=self.leave_stopped
            )
        if self.ghost_limit is not None:
            fields["ghost_limit"] = self.ghost_limit
        if self.root is not None:
            fields["root"] = self.root
        if self.rst_sibling:
            fields["rst_sibling"] = True
        if self.unprivileged:
            fields["unprivileged"] = True
        if self.lazy_pages:
            fields["lazy_pages"] = True
        return fields

    def command_line(self) -> list[str]:
        """These options as `criu restore` flags, for what RPC refuses (`--stream`, see
        engines.imagestream); the image and work directories, the log's directory and
        the notify hook (an --action-script) are the caller's to add.  rst_sibling is
        `--restore-detached --restore-sibling` there: criu exits once the tree runs,
        the tree stays ccr's child."""
        if self.action != "restore":
            raise ValueError(f"no command line for a {self.action}")
        flags = ["-o", self.log_file, f"-v{self.log_level}"]
        if self.file_locks:
            flags.append("--file-locks")
        if self.tcp_established:
            flags.append("--tcp-established")
        if self.network_lock is not None:
            flags += ["--network-lock", self.network_lock]
        if self.auto_ext_mnt:
            flags += ["--ext-mount-map", "auto"]
        if self.root is not None:
            flags += ["--root", self.root]
        if self.rst_sibling:
            flags += ["--restore-detached", "--restore-sibling"]
        return flags

    def request(self, images_fd: int, work_fd: int) -> bytes:
        """CRIU's RPC request (a serialized criu_req) for these options."""
        kind = criu_wire.DUMP if self.action == "dump" else criu_wire.RESTORE
        return criu_wire.encode_req(
            kind, criu_wire.encode_opts(self.rpc_fields(images_fd, work_fd))
        )


def criu_options(
    action: str,
    *,
    pid: int | None = None,
    final_state: str = "running",
    tcp_established: bool = False,
    network_lock: str | None = None,
    notify: bool = False,
    lazy_pages: bool = False,
) -> CriuOptions:
    """The one place ccr's settings become CRIU options, for a dump or a restore.

    final_state (dump): what the tree does after a successful dump, one of FINAL_STATES:
    "running" (go on), "stopped" (SIGSTOP'd, for a caller that kills it only once the
    image is safe) or "killed".  notify: CRIU's notifications go to a hook.  lazy_pages
    (restore): see CriuOptions.
    """
    if action not in ("dump", "restore"):
        raise ValueError(action)
    if network_lock is not None and network_lock not in NETWORK_LOCKS:
        raise ValueError(network_lock)
    if action == "restore":
        return CriuOptions(
            action,
            tcp_established=tcp_established,
            network_lock=network_lock,
            root="/",
            rst_sibling=True,
            notify_scripts=notify,
            log_file="restore.log",
            lazy_pages=lazy_pages,
        )
    if final_state not in FINAL_STATES or pid is None:
        raise ValueError(f"dump of pid {pid} to {final_state}")
    return CriuOptions(
        action,
        pid=pid,
        leave_running=final_state == "running",
        leave_stopped=final_state == "stopped",
        tcp_established=tcp_established,
        network_lock=network_lock,
        ghost_limit=GHOST_LIMIT,
        notify_scripts=notify,
        log_file="dump.log",
        unprivileged=identity.criu_as_caller(True, identity.lacks_sys_resource()),
    )


F = TypeVar("F", bound=Callable[..., Any])


def _privileged(func: F) -> F:
    """Run func with root's file credentials in a service worker (see ccr.identity): CRIU's
    facts and work dirs are the service's own; the images are in ccr's private scratch."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with identity.privileged():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class NodeFacts:
    """What one CRIU binary says of itself on this node (version, `criu check`, features),
    kept in a small JSON file so that each call of ccr does not run CRIU again to ask.

    `criu --version` and `criu check` cost 10-60 ms each (more on a busy node) and do not
    change unless the binary or the kernel does: the facts are keyed by the binary's path,
    mtime, size and the kernel release, and dropped when any of them changes.
    """

    def __init__(self, path: Path | None, binary: str) -> None:
        self.path = path
        self.key = self._key(binary)
        self._facts: dict[str, Any] | None = None

    @staticmethod
    def _key(binary: str) -> dict[str, Any] | None:
        try:
            st = os.stat(binary)
        except OSError:
            return None
        return {
            "binary": binary,
            "mtime_ns": st.st_mtime_ns,
            "size": st.st_size,
            "kernel": os.uname().release,
        }

    @_privileged
    def _load(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = {}
            if self.path is not None and self.key is not None:
                try:
                    data = json.loads(self.path.read_text())
                    if isinstance(data, dict) and data.get("key") == self.key:
                        self._facts = dict(data.get("facts", {}))
                except (OSError, ValueError):
                    pass
        return self._facts

    def get(self, name: str) -> Any:
        return self._load().get(name)

    @_privileged
    def put(self, name: str, value: Any) -> None:
        facts = self._load()
        facts[name] = value
        if self.path is None or self.key is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"key": self.key, "facts": facts}))
            tmp.replace(self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # unwritable: the next call only asks CRIU again


class Criu:
    """One CRIU binary, driven over RPC; every call runs a fresh `criu swrk`."""

    def __init__(self, binary: str, facts_file: Path | None = None) -> None:
        self.binary = binary
        self.facts = NodeFacts(facts_file, binary)

    def version(self) -> str:
        """CRIU's version string, e.g. '4.2.1' (learned once per binary on this node)."""
        cached = self.facts.get("version")
        if isinstance(cached, str):
            return cached
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CcrError(f"cannot run CRIU at {self.binary}: {exc}") from None
        for line in out.splitlines():
            if line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
                self.facts.put("version", version)
                return version
        raise CcrError(f"cannot read CRIU's version from {self.binary} --version")

    def check(self, feature: str | None = None) -> tuple[bool, str]:
        """`criu check [--feature F]`: (works, what it said).

        A feature's answer is learned once per binary and kernel; the whole check only
        when it passes (a failure may be the node's state of the moment, so it is asked again).
        """
        key = f"check:{feature or ''}"
        cached = self.facts.get(key)
        if isinstance(cached, list) and len(cached) == 2:
            return bool(cached[0]), str(cached[1])
        cmd = [self.binary, "check"] + (["--feature", feature] if feature else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "RLIMIT_NOFILE" not in ln]
        answer = (proc.returncode == 0, (lines[-1] if lines else ""))
        if answer[0] or feature:
            self.facts.put(key, list(answer))
        return answer

    def outside_network_lock(self) -> str:
        """The network lock for connections to outside peers: nftables (CRIU's library, no
        command needed) where this CRIU has it, else iptables."""
        ok, _ = self.check("network_lock_nftables")
        return "nftables" if ok else "iptables"

    @_privileged
    def dump(
        self,
        options: CriuOptions,
        images_dir: Path,
        work_dir: Path,
        *,
        deadline: Deadline = NO_DEADLINE,
        hook: NotifyHook | None = None,
    ) -> DumpStats:
        """Dump the tree options name (criu_options("dump", ...)) into images_dir (which
        must exist), within deadline.

        A failed dump always leaves the tree running.  CRIU's log (dump.log) and
        statistics (stats-dump) go to work_dir; CRIU's notifications to hook.

        A dump CRIU refuses for a transient state of the tree (TRANSIENT_DUMP) is tried
        again after a short pause (DUMP_RETRY_BACKOFF) while the deadline leaves time for
        it; the tree runs on between tries, and each refused try's log is kept beside
        dump.log as dump-try-N.log.
        """
        if options.action != "dump" or options.pid is None:
            raise ValueError(options)
        pid = options.pid
        # Node mounts unmounted since the step started: CRIU cannot find them on the node.
        process.drop_gone_mounts(pid)
        started = time.monotonic()
        before = set(os.listdir(images_dir))
        attempts = 1
        while True:
            try:
                with parasite_scratch(pid, deadline):
                    self._call(options, images_dir, work_dir, deadline, hook)
                break
            except CriuError as exc:
                pause = _retry_pause(exc, attempts, deadline)
                if pause is None:
                    reason = transient_reason(Path(exc.log_path)) if exc.log_path else None
                    if reason is None or attempts == 1:
                        raise
                    raise CriuError(
                        f"CRIU dump failed {attempts} times in {time.monotonic() - started:.1f}s:"
                        f" {reason} (a transient state of the tree that did not pass)",
                        exc.log_path,
                    ) from None
                os.replace(work_dir / "dump.log", work_dir / f"dump-try-{attempts}.log")
                # What the refused try left in images_dir goes: the next writes afresh.
                for name in set(os.listdir(images_dir)) - before:
                    (images_dir / name).unlink(missing_ok=True)
                time.sleep(pause)
                attempts += 1
        stats = read_dump_stats(work_dir / "stats-dump")
        stats.wall_time = time.monotonic() - started
        stats.attempts = attempts
        return stats

    @_privileged
    def restore(
        self,
        options: CriuOptions,
        images_dir: Path,
        work_dir: Path,
        *,
        deadline: Deadline = NO_DEADLINE,
    ) -> RestoreResult:
        """Restore the tree in images_dir (with criu_options("restore", ...)) as a child of
        the calling process, within deadline; return its root.

        CRIU's log (restore.log) goes to work_dir.
        """
        if options.action != "restore" or not options.rst_sibling:
            raise ValueError(options)
        process.drop_time_wait(tcp_listen_ports(images_dir))
        view = without_gone_mounts(images_dir)
        started = time.monotonic()
        since = process.now_ticks()
        try:
            resp = self._call(options, view, work_dir, deadline, None)
        except BaseException:
            # Roll back: no half-restored tree may outlive a failed or abandoned restore.
            for pid in process.restore_leftovers(since, self.binary):
                process.signal_process(pid, signal.SIGKILL)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            raise
        finally:
            drop_view(view, images_dir)
        return RestoreResult(pid=resp.restore_pid, wall_time=time.monotonic() - started)

    def _call(
        self,
        options: CriuOptions,
        images_dir: Path,
        work_dir: Path,
        deadline: Deadline,
        hook: NotifyHook | None,
    ) -> criu_wire.Response:
        what = options.action
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file = work_dir / options.log_file
        try:
            images_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise CcrError(f"cannot open image directory {images_dir}: {exc.strerror}") from None
        work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
        req = options.request(images_fd, work_fd)
        lacking = identity.lacks_sys_resource()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [self.binary, "swrk", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), images_fd, work_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=functools.partial(_criu_child_setup, what == "dump", lacking),
                # Its own process group, so _kill reaches the helpers criu forks too.
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            os.close(images_fd)
            os.close(work_fd)
            raise CcrError(f"cannot run CRIU at {self.binary}: {exc.strerror}") from None
        finally:
            theirs.close()
        # CRIU opens images_dir_fd and work_dir_fd through /proc/<our pid>/fd: keep them open.
        try:
            try:
                ours.send(req)
            except OSError:
                pass  # criu died at once: the receive below reports it from its log
            while True:
                resp = self._receive(ours, deadline, proc, what, log_file)
                if resp.type == criu_wire.NOTIFY:
                    ok = True
                    try:
                        if hook is not None:
                            with identity.as_caller():  # ccr's own work, as the caller
                                hook(resp.notify_script, resp.notify_pid)
                    except Exception:
                        ok = False
                        raise
                    finally:
                        ack = criu_wire.encode_req(criu_wire.NOTIFY, notify_success=ok)
                        try:
                            ours.send(ack)
                        except OSError:
                            pass
                    continue
                break
        except BaseException:
            _kill(proc)
            raise
        finally:
            ours.close()
            os.close(images_fd)
            os.close(work_fd)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill(proc)
        if not resp.success:
            detail = resp.cr_errmsg or (os.strerror(resp.cr_errno) if resp.cr_errno else "")
            reason = log_reason(log_file) or detail or "unknown error"
            raise failure(what, reason, log_file, resp.cr_errno)
        return resp

    def _receive(
        self,
        sock: socket.socket,
        deadline: Deadline,
        proc: subprocess.Popen[bytes],
        what: str,
        log_file: Path,
    ) -> criu_wire.Response:
        if deadline.bounded:
            deadline.check(f"CRIU {what}")
            sock.settimeout(deadline.timeout())
        try:
            buf = sock.recv(1 << 20)
        except TimeoutError:
            raise deadline.exceeded(f"CRIU {what}") from None
        except OSError:
            buf = b""  # criu died mid-answer (connection reset): its log says why
        if not buf:
            proc.wait()
            reason = log_reason(log_file) or f"criu exited with status {proc.returncode}"
            raise failure(what, reason, log_file, 0)
        try:
            return criu_wire.decode_resp(buf)
        except ValueError as exc:
            raise CriuError(f"CRIU {what}: undecodable answer ({exc})", str(log_file)) from None


# CRIU's parasite, dumping the root of a PID namespace that sees the node's /proc, mounts a
# private procfs on a directory it creates as `proc.crtools` in the root task's working
# directory (which was "/" for every step of older ccr versions).  Two such dumps at once
# in one directory collide (EEXIST), and a leftover directory breaks every later dump.
# Steps ccr starts now have a procfs of their own (process.spawn_step), which the parasite
# uses as it is: their dumps need no scratch directory and take no lock, so one hung dump
# never holds up another step's.
SCRATCH_NAME = "proc.crtools"
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")


def scratch_lock(cwd: str) -> Path:
    """The node-wide lock serializing dumps of roots without their own /proc in cwd."""
    return LOCK_DIR / f"ccr-criu-{hashlib.sha256(cwd.encode()).hexdigest()[:16]}.lock"


@contextmanager
def parasite_scratch(pid: int, deadline: Deadline) -> Iterator[None]:
    """Serialize dumps of roots sharing a working directory; clear a stale scratch dir.

    Only for a root without a procfs of its own (a tree restored from an older image).
    """
    if process.has_own_proc(pid):
        yield
        return
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        yield  # the dump itself will say what is wrong with pid
        return
    busy = f"another CRIU dump in {cwd} is still running"
    with exclusive_lock(scratch_lock(cwd), deadline, busy):
        scratch = Path(cwd) / SCRATCH_NAME
        if scratch.is_dir():
            # Left by a CRIU killed mid-dump.  Only an empty, unmounted directory is removed:
            # a CRIU that is not ccr's (no lock) may be using a mounted one right now.
            try:
                scratch.rmdir()
            except OSError:
                pass
        yield


def _retry_pause(exc: CriuError, attempts: int, deadline: Deadline) -> float | None:
    """How long to wait before trying a refused dump again; None: do not try again."""
    if attempts > len(DUMP_RETRY_BACKOFF) or not exc.log_path:
        return None
    if transient_reason(Path(exc.log_path)) is None:
        return None
    pause = DUMP_RETRY_BACKOFF[attempts - 1]
    # Only while the limit leaves room for the pause and a dump after it.
    left = deadline.remaining()
    if left is not None and 2 * pause > left:
        return None
    return pause


def _criu_child_setup(dump: bool = False, lacking: bool = False) -> None:  # pragma: no cover
    identity.criu_child_ids(dump, lacking)  # a user's CRIU dump on a node without
    # CAP_SYS_RESOURCE: see there

    # Signal masks are inherited: criu must start with none blocked.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # If ccr dies (SIGKILL, MaxWait watchdog gone), criu must not carry on alone: a dump
    # killed half-way leaves the tree running, and nothing partial is ever published.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill criu and every helper it forked (its process group), then reap criu.

    A helper stopped mid-handshake (CRIU's vdso probe child raises SIGSTOP for its parent
    to trace) outlives a criu killed at that moment, stopped forever, unless killed too.
    """
    if proc.poll() is None:  # not reaped yet: its pid (and group id) cannot be reused
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a wedged criu in D state
        pass


def failure(what: str, reason: str, log_file: Path, cr_errno: int) -> CcrError:
    """The error for a failed CRIU action, classified by errno where CRIU hit one.

    A full image directory (NO_SPACE: CRIU's errno, else the errno its log reports) is a
    StorageError carrying that errno (exit 8, as any other full disk); the rest CriuError.
    """
    code = cr_errno if cr_errno in NO_SPACE else log_errno(log_file, NO_SPACE)
    message = f"CRIU {what} failed: {reason}"
    if code:
        return StorageError(message, errno=code, log_path=str(log_file))
    return CriuError(message, str(log_file))


def log_errno(log_file: Path, wanted: tuple[int, ...]) -> int:
    """The first of wanted that CRIU's log reports in an error line, else 0.

    CRIU has no other channel for the errno of most failures: it logs strerror(errno)
    ("%m") after the failed call, and os.strerror gives the same text.
    """
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    texts = {code: os.strerror(code) for code in wanted}
    for line in lines:
        if "Error" in line:
            for code, text in texts.items():
                if text in line:
                    return code
    return 0


def log_reason(log_file: Path) -> str:
    """The first real error of a CRIU log: the cause; later ones are its consequences.

    CRIU logs a harmless RLIMIT_NOFILE error on every run here, so that one is skipped.
    """
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    if not errors:
        return ""
    first = errors[0]
    return first.split("): ", 1)[-1].strip() if "): " in first else first.strip()


def _load_image(path: Path) -> dict[str, Any] | None:
    try:
        from pycriu import images

        with path.open("rb") as fh:
            return dict(images.load(fh))
    except Exception:  # noqa: BLE001 - absent or undecodable: CRIU itself will say
        return None


def _node_root_of(path: str, node: list[process.Mount]) -> str | None:
    """What a node path is within its file system: the root, in the node mount holding it
    (the last one mounted at the deepest mount point above it), of that path; None if the
    path does not exist on the node."""
    if not os.path.lexists(path):
        return None
    holder = None
    for m in node:
        if path == m.point or path.startswith(m.point.rstrip("/") + "/"):
            if holder is None or len(m.point) >= len(holder.point):
                holder = m
    if holder is None:
        return None
    rest = path[len(holder.point) :].lstrip("/")
    return holder.root.rstrip("/") + "/" + rest if rest else holder.root


def _no_mount_gone(path: Path) -> bool:
    """Whether every external mount in a mountpoints image (mnt_entry: root 6, source 8,
    ext_key 18, images/mnt.proto) is still on the node, read without pycriu; False when
    one is gone or the image is not understood (the full decode then decides)."""
    entries = criu_wire.image_entries(path)
    if entries is None:
        return False
    node = process.mounts_of("self")
    try:
        for entry in entries:
            if not criu_wire.field_str(entry, 18):
                continue
            source = "/" + criu_wire.field_str(entry, 8).lstrip("/")
            if _node_root_of(source, node) != criu_wire.field_str(entry, 6):
                return False
    except ValueError:
        return False
    return True


def without_gone_mounts(images_dir: Path) -> Path:
    """The image to restore: images_dir itself, or a view of it without the node mounts
    the step saw at its checkpoint and that this node no longer has.

    CRIU binds each of the step's external mounts (auto_ext_mnt) from its path on the node.
    One the node has unmounted since the checkpoint would be bound as whatever lies at
    that path now (the directory beneath, wrongly), or the restore fails when the path is
    gone too.  Unused by the tree, such a mount is left out of the restored namespace:
    the step then sees the node's path as it is now, as if the unmount had reached it.
    Used (a file open in it, the working directory), the restart is refused, naming it.
    The view is a directory of links to images_dir's files, the mount image rewritten;
    the caller removes it (drop_view).
    """
    names = sorted(p.name for p in images_dir.glob("mountpoints-*.img"))
    if len(names) != 1:
        return images_dir  # no mount namespace of its own (or several: left to CRIU)
    if _no_mount_gone(images_dir / names[0]):
        return images_dir  # decided without pycriu (~30-50 ms a restore)
    image = _load_image(images_dir / names[0])
    if image is None:
        return images_dir
    entries = image["entries"]
    node = process.mounts_of("self")
    gone = []
    for entry in entries:
        if not entry.get("ext_key"):
            continue
        source = "/" + str(entry.get("source", "")).lstrip("/")
        if _node_root_of(source, node) != entry.get("root"):
            gone.append(entry)
    if not gone:
        return images_dir
    children: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        children.setdefault(int(entry["parent_mnt_id"]), []).append(entry)
    dropped: set[int] = set()
    stack = [int(e["mnt_id"]) for e in gone]
    while stack:
        mnt = stack.pop()
        if mnt not in dropped:
            dropped.add(mnt)
            stack.extend(int(c["mnt_id"]) for c in children.get(mnt, []))
    files = _load_image(images_dir / "files.img") or {"entries": []}
    used = {
        int(e["reg"]["mnt_id"])
        for e in files["entries"]
        if "reg" in e and e["reg"].get("mnt_id", -1) >= 0
    }
    busy = [e for e in gone if _subtree(int(e["mnt_id"]), children) & used]
    if busy:
        names_ = ", ".join(
            f"{e['mountpoint']} (the node's {'/' + str(e['source']).lstrip('/')})" for e in busy
        )
        raise JobStateError(
            f"the checkpointed step uses {names_}, no longer mounted on this node; "
            "mount it again to restart the step"
        )
    from pycriu import images

    # Hard links (CRIU opens no image through a symbolic link), beside images_dir so they
    # are on its file system; a copy where links cannot be made.
    view = images_dir.parent / f".{images_dir.name}.ccr-view-{os.getpid()}"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(mode=0o700)
    for item in images_dir.iterdir():
        if item.name != names[0] and item.is_file():
            try:
                os.link(item, view / item.name)
            except OSError:
                shutil.copy2(item, view / item.name)
    image["entries"] = [e for e in entries if int(e["mnt_id"]) not in dropped]
    fd = os.open(view / names[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        images.dump(image, fh)
    return view


def drop_view(view: Path, images_dir: Path) -> None:
    """Remove a view made by without_gone_mounts (nothing when it is images_dir)."""
    if view != images_dir:
        shutil.rmtree(view, ignore_errors=True)


def _subtree(mnt: int, children: dict[int, list[dict[str, Any]]]) -> set[int]:
    found, stack = set(), [mnt]
    while stack:
        top = stack.pop()
        if top not in found:
            found.add(top)
            stack.extend(int(c["mnt_id"]) for c in children.get(top, []))
    return found


TCP_LISTEN = 10  # include/net/tcp_states.h


_FD_INETSK = 4  # file_entry.type (CRIU's images/fdinfo.proto)


def tcp_listen_ports(images_dir: Path) -> set[int]:
    """The local ports of the listening TCP sockets in a (raw) image."""
    kinds = criu_wire.fd_types(images_dir / "files.img")
    if kinds is not None and _FD_INETSK not in kinds and not (images_dir / "inetsk.img").exists():
        return set()  # no inet socket at all: no pycriu decode (~30-50 ms a restore)
    try:
        from pycriu import images
    except ImportError:  # pragma: no cover - depends on the installation
        return set()
    ports: set[int] = set()
    for name in ("files.img", "inetsk.img"):  # (inetsk.img: images of CRIU before 3.x)
        try:
            with (images_dir / name).open("rb") as fh:
                entries = images.load(fh)["entries"]
        except Exception:  # noqa: BLE001 - absent or undecodable: CRIU itself will say
            continue
        for entry in entries:
            isk = entry.get("isk") if name == "files.img" else entry
            if isk and isk.get("proto") == socket.IPPROTO_TCP and isk.get("state") == TCP_LISTEN:
                ports.add(int(isk["src_port"]))
    return ports


def read_dump_stats(path: Path) -> DumpStats:
    """Decode CRIU's stats-dump image (times in CRIU's microseconds, returned in seconds).

    The image is one stats_entry after its magics (decoded by criu_wire: pycriu.images
    loads every image's protobufs, 17 ms a dump here).
    """
    stats = DumpStats()
    entries = criu_wire.image_entries(path)
    try:
        if not entries:
            raise ValueError("no stats entry")
        dump = criu_wire.dump_stats(entries[0])
    except ValueError:  # stats are informative: a bad image is not fatal
        return stats
    stats.freezing_time = dump["freezing_time"] / 1e6
    stats.frozen_time = dump["frozen_time"] / 1e6
    stats.memdump_time = dump["memdump_time"] / 1e6
    stats.memwrite_time = dump["memwrite_time"] / 1e6
    stats.pages_scanned = dump["pages_scanned"]
    stats.pages_written = dump["pages_written"]
    return stats
