"""Launch step process trees in their own PID namespace, and look at or signal live ones."""

from __future__ import annotations

import ctypes
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ccr import identity
from ccr.errors import CcrError, JobStateError

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
PR_SET_CHILD_SUBREAPER = 36
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

# The directory a step gets its own tmpfs at when its /tmp is private (--private-tmp).
TMP = "/tmp"
SHM = "/dev/shm"


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
    private_tmp: bool = True,
    error: Path | None = None,
) -> int:
    """Start argv as a step and return the host PID of the step's init.

    The init (PID 1 of a fresh PID namespace, session leader, stdin /dev/null, stdout and
    stderr appended to `output`, or stderr to `error` when given) runs `argv` under `init`
    (dumb-init), which reaps orphans and forwards signals.  A PID namespace per step means
    the whole tree, daemons included, hangs under one root for CRIU, and restores never
    collide with PIDs in use.  The init ends up a child of the caller, which must be a
    subreaper (see become_subreaper).

    The step is a small world of its own (see _build_world): its own mount namespace with
    its own procfs, a private tmpfs at /dev/shm and (private_tmp) at /tmp, and its own IPC
    namespace.  CRIU dumps and restores all of these with the tree.
    """
    # Created (and checked) here; the step opens them again inside its mount namespace, as
    # CRIU finds a file only through a mount of the dumped tree's namespace.
    for path in (output, error):
        if path is not None:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644))
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        spec = _StepSpec(argv, cwd, env, init, private_tmp, output, error)
        _intermediate(spec, report_w)
    os.close(report_w)
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


@dataclass(frozen=True)
class _StepSpec:
    """What spawn_step's forked children need to build the step's world and exec its init."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    init: str
    private_tmp: bool
    output: Path
    error: Path | None


def _intermediate(spec: _StepSpec, w: int) -> None:  # pragma: no cover - forked child
    try:
        try:
            _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC), "unshare")
            # Nothing the step mounts propagates back to the node, nor the node's later
            # mounts in: CRIU then dumps a mount tree with no peers or masters outside it.
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
        except OSError as exc:
            os.write(w, struct.pack("q", -1) + str(exc).encode())
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            _exec_init(spec, w)
        os.write(w, struct.pack("q", pid))
    finally:
        os._exit(0)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def unescape_mount_field(field: str) -> str:
    """A path from /proc/*/mountinfo: space, tab, newline and backslash are octal-escaped."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mountpoints_at(top: str) -> list[str]:
    """Mount points at or below top in our mount namespace, shallowest first."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            point = unescape_mount_field(line.split()[4])
            if point == top or point.startswith(top.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len)


# Mounts of these file systems cannot be dumped by CRIU ("doesn't have a proper root mount"):
# `ip netns add` leaves an nsfs bind mount per network namespace under /run/netns on many
# nodes (Slurm's own test cluster here has three), and any one of them in the step's mount
# namespace made every dump of every step fail.  The step has no use for them.
UNDUMPABLE_FSTYPES = ("nsfs",)


def _mounts_of_type(fstypes: tuple[str, ...]) -> list[str]:
    """Mount points in our mount namespace whose file system type is one of fstypes."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            # After the optional fields, " - " then the file system type.
            fstype = fields[fields.index("-") + 1] if "-" in fields else ""
            if fstype in fstypes:
                found.append(unescape_mount_field(fields[4]))
    return sorted(found, key=len, reverse=True)


def _detach_all(top: str) -> None:
    """Lazily unmount everything at or below top (stacked mounts too), in our namespace only."""
    for _ in range(64):  # bounded: a mount we may not detach must not loop forever
        points = _mountpoints_at(top)
        if not points:
            return
        for point in points:
            _libc.umount2(point.encode(), MNT_DETACH)


def _under(path: Path, top: str) -> bool:
    return path == Path(top) or Path(top) in path.parents


# Environment variables whose entries name software a step loads (programs, Python
# packages, shared libraries): under a private /tmp they must stay the node's.
SOFTWARE_PATH_VARS = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX")


def node_tmp_paths(
    cwd: Path, outputs: list[Path], argv: list[str], env: dict[str, str], init: str
) -> list[Path]:
    """The node's paths under /tmp that a step with a private /tmp must still see.

    Its working directory and the directories of its output files, as they are; and the
    software it runs: the init, the command (and any argument naming an existing path under
    /tmp, `python3 /tmp/x/train.py`), and what PATH, PYTHONPATH, LD_LIBRARY_PATH,
    VIRTUAL_ENV and CONDA_PREFIX name.  A program or library comes with its neighbours (a
    venv's interpreter needs its lib/, a checkout its packages), so for those the whole
    top-level entry of /tmp holding it is kept (`/tmp/ci-clone` for
    `/tmp/ci-clone/.venv/bin/python`).  Measured: a checkout and venv under /tmp made every
    step fail to start (`could not start step: ...: No such file or directory`).
    Returns the smallest set: no path inside another one kept.
    """
    top = Path(TMP)
    exact = {cwd, *(out.parent for out in outputs)}
    software: set[Path] = set()
    candidates = [init, *argv]
    command = argv[0] if argv else ""
    if command and "/" not in command:
        found = shutil.which(command, path=env.get("PATH", os.defpath))
        candidates.append(found or "")
    for var in SOFTWARE_PATH_VARS:
        candidates += env.get(var, "").split(":")
    for text in candidates:
        if not text or (not text.startswith("/") and not text.startswith(".")):
            continue
        path = Path(os.path.normpath(cwd / text))
        for where in {path, Path(os.path.realpath(path))}:
            if _under(where, TMP) and where != top and os.path.lexists(where):
                software.add(top / where.relative_to(top).parts[0])
    wanted = {p for p in exact if _under(p, TMP) and p != top} | software
    kept: list[Path] = []
    for path in sorted(wanted, key=lambda p: len(p.parts)):
        if not any(_under(path, str(k)) for k in kept):
            kept.append(path)
    return kept


def _build_world(
    cwd: Path, outputs: list[Path], private_tmp: bool, node_tmp: list[Path]
) -> None:  # pragma: no cover
    """Give the step, PID 1 of its PID namespace, its own /proc, /dev/shm, /tmp (and IPC).

    Runs in the step's fresh mount namespace, before exec.  The node's mounts under /proc,
    /dev/shm and (private_tmp) /tmp are detached in this namespace only, so that CRIU sees no
    hidden mounts beneath the step's own.  The step's working directory and the directory of
    its output files stay reachable at their paths when they lie under a private /tmp: they
    are bind-mounted from the node (not private, not in the checkpoint), as the step's
    stdout and cwd must be reachable by path for CRIU.
    """
    keep: list[tuple[Path, int]] = []
    if private_tmp:
        for path in node_tmp:  # see node_tmp_paths
            try:
                keep.append((path, os.open(path, os.O_PATH)))
            except OSError:
                continue  # gone since: nothing to keep
    for point in _mounts_of_type(UNDUMPABLE_FSTYPES):
        _libc.umount2(point.encode(), MNT_DETACH)
    _detach_all(SHM)
    if private_tmp:
        _detach_all(TMP)
    # /proc last: _mountpoints_at reads it.  Its submounts go with it (lazy unmount is
    # recursive).
    while _libc.umount2(b"/proc", MNT_DETACH) == 0:
        pass
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("tmpfs", SHM, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if private_tmp:
        _mount("tmpfs", TMP, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for path, fd in keep:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                path.mkdir(parents=True, exist_ok=True)
            else:  # a file (a script under /tmp): bound onto an empty file
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            _mount(f"/proc/self/fd/{fd}", str(path), None, MS_BIND)
            os.close(fd)


def _exec_init(spec: _StepSpec, w: int) -> None:  # pragma: no cover - forked child
    argv, cwd, env, init = spec.argv, spec.cwd, spec.env, spec.init
    output, error = spec.output, spec.error
    try:
        os.setsid()
        try:
            outputs = [output] + ([error] if error else [])
            node_tmp = node_tmp_paths(
                cwd.resolve(), [o.resolve() for o in outputs], argv, env, init
            )
            _build_world(cwd, outputs, spec.private_tmp, node_tmp)
        except OSError as exc:
            os.write(w, f"cannot set up the step's mounts: {exc}".encode())
            os._exit(127)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        out_fd = os.open(output, flags, 0o644)
        err_fd = out_fd if error is None else os.open(error, flags, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.closerange(3, w)
        os.closerange(w + 1, 65536)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        identity.drop_to_caller()  # a user's step runs as exactly that user (service)
        os.chdir(cwd)
        os.execve(init, [init, *argv], env)
    except OSError as exc:
        os.write(w, f"{argv[0]}: {exc.strerror}".encode())
    finally:
        os._exit(127)


def reap_exited_children() -> None:
    """Collect every child that has exited, without waiting for one that runs.

    For a subreaper (test harnesses, the benchmark): orphans re-parented to it stay zombies
    holding their PIDs until collected.  Only safe while no subprocess of the caller is
    still to be waited for, or its exit status is taken here.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from each /proc/<pid>/stat's ppid (one pass over /proc).

    Read here rather than through psutil, whose import alone took ~15 ms of each create
    and restart; /proc/<pid>/task/<tid>/children would need every thread of the tree.
    """
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
            # pid (comm) state ppid ...: comm may hold spaces and parentheses
            ppid = int(data[data.rindex(b")") + 2 :].split(None, 2)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    """The root and every descendant, root first."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    kids = children_by_parent()
    found = [root]
    for pid in found:  # grows as it goes: breadth first
        found.extend(sorted(kids.get(pid, [])))
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident memory of the whole tree, in bytes: what a dump will write, roughly."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
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
    """Wait until the process has exited (or is a zombie); True if it did within timeout.

    Woken by the exit itself (a pidfd polls readable once the process has exited, child or
    not): a killed 64 MiB tree is gone ~20 ms sooner than the 20 ms polls noticed it.
    """
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(identity.pid)
    except OSError:
        pidfd = None  # gone already (or no pidfd here): the polls below
    if pidfd is not None:
        try:
            # Opened while the process is still the one meant: the pidfd is its own.
            if identity.alive():
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(max(0, int(timeout * 1000)))
        finally:
            os.close(pidfd)
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
    for child in children_by_parent().get(os.getpid(), []):
        start = start_time(child)
        if start is None or start < since:
            continue
        try:
            exe = os.path.realpath(f"/proc/{child}/exe")
        except OSError:
            exe = ""
        if exe == helper or (ns_pid(child) or 0) != child:
            found.append(child)
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


def _ns(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def step_world(pid: int) -> dict[str, bool]:
    """What of its own a step's root has: mount and IPC namespaces, a private /tmp, /dev/shm.

    A mount at /tmp (or /dev/shm) counts as private when no mount of ours shares its
    filesystem: a tmpfs only the step's namespace holds.
    """
    world = {
        "mount_ns": _ns(pid, "mnt") not in (None, _ns("self", "mnt")),
        "ipc_ns": _ns(pid, "ipc") not in (None, _ns("self", "ipc")),
    }
    ours = {_mount_fields(line)[0] for line in _read_lines("/proc/self/mountinfo")}
    theirs = {}
    for line in _read_lines(f"/proc/{pid}/mountinfo"):
        dev, point = _mount_fields(line)
        theirs[point] = dev  # the last mount at a point is the one on top
    for key, top in (("private_tmp", TMP), ("private_shm", SHM)):
        world[key] = world["mount_ns"] and top in theirs and theirs[top] not in ours
    return world


def has_own_proc(pid: int) -> bool:
    """Whether pid, the root of a PID namespace, sees a procfs of its namespace at /proc.

    Then /proc/1 in its view is pid itself (same start time); with the node's /proc, it is
    the node's init.
    """
    try:
        stat = Path(f"/proc/{pid}/root/proc/1/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return ns_pid(pid) == 1 and int(fields[19]) == start_time(pid)


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _mount_fields(line: str) -> tuple[str, str]:
    """(major:minor, mount point) of a mountinfo line."""
    parts = line.split()
    return parts[2], unescape_mount_field(parts[4])


@dataclass(frozen=True)
class Mount:
    """One line of /proc/*/mountinfo."""

    mnt_id: int
    parent: int
    dev: str  # major:minor
    root: str  # the mount's root within its file system
    point: str
    fstype: str
    source: str

    def describe(self) -> str:
        return f"{self.point} ({self.fstype} {self.source})"


def mounts_of(pid: int | str) -> list[Mount]:
    """The mounts of pid's mount namespace, in mountinfo's order."""
    found = []
    for line in _read_lines(f"/proc/{pid}/mountinfo"):
        f = line.split()
        sep = f.index("-") if "-" in f else len(f)
        fstype = f[sep + 1] if sep + 1 < len(f) else ""
        source = unescape_mount_field(f[sep + 2]) if sep + 2 < len(f) else ""
        root = unescape_mount_field(f[3]).removesuffix("//deleted")
        point = unescape_mount_field(f[4])
        found.append(Mount(int(f[0]), int(f[1]), f[2], root, point, fstype, source))
    return found


# Mounts of these file systems CRIU saves with their content and restores as the step's own
# (as it does the step's /dev/shm and /tmp): one the node has unmounted since the step
# started stays in the step, as it was, and comes back with it.
CONTENT_FSTYPES = ("tmpfs",)


def gone_mounts(pid: int) -> list[Mount]:
    """The mounts of the step rooted at pid that the node no longer has, topmost only.

    The step's mount namespace is a private copy of the node's, made at its start: a node
    mount unmounted since (an NFS automount, a USB stick, /run/user/UID at logout) stays
    in the step.  CRIU finds each node mount the step sees on the node (auto_ext_mnt: a
    node mount of the same file system whose root holds the step mount's root) and binds
    it from there at restore; one it cannot find, it must dump itself, which it cannot for
    most file systems ("FS mnt ... unsupported", "doesn't have a proper root mount").  The
    step's own mounts (/proc, /dev/shm, a private /tmp and what lies below) and those of
    CONTENT_FSTYPES are left out: CRIU saves them.
    """
    ours = mounts_of("self")
    if not ours or _ns(pid, "mnt") in (None, _ns("self", "mnt")):
        return []
    theirs = mounts_of(pid)
    world = step_world(pid)
    own_tops = ["/proc", SHM] + ([TMP] if world.get("private_tmp") else [])
    by_id = {m.mnt_id: m for m in theirs}

    def on_node(m: Mount) -> bool:
        return any(
            n.dev == m.dev and (m.root == n.root or m.root.startswith(n.root.rstrip("/") + "/"))
            for n in ours
        )

    gone = [
        m
        for m in theirs
        if m.point != "/"
        and not any(_under(Path(m.point), top) for top in own_tops)
        and m.fstype not in CONTENT_FSTYPES
        and not on_node(m)
    ]
    ids = {m.mnt_id for m in gone}
    # Topmost only: detaching a mount lazily detaches everything below it too.
    return [m for m in gone if not _has_ancestor(m, ids, by_id)]


def _has_ancestor(m: Mount, ids: set[int], by_id: dict[int, Mount]) -> bool:
    seen = set()
    parent = by_id.get(m.parent)
    while parent is not None and parent.mnt_id not in seen:
        if parent.mnt_id in ids:
            return True
        seen.add(parent.mnt_id)
        parent = by_id.get(parent.parent)
    return False


def _fd_mnt_id(path: str) -> int | None:
    """The mount id in an fdinfo file (`mnt_id:` line)."""
    for line in _read_lines(path):
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


def _path_mnt_id(link: str) -> int | None:
    """The mount id of what a /proc magic link (cwd, root, map_files/...) points at."""
    try:
        fd = os.open(link, O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _fd_mnt_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def used_mount_ids(pids: list[int]) -> set[int]:
    """Mount ids the tree uses: its open files, working and root directories, mapped files."""
    used: set[int] = set()
    for pid in pids:
        for link in ("cwd", "root", "exe"):
            if (mnt := _path_mnt_id(f"/proc/{pid}/{link}")) is not None:
                used.add(mnt)
        for table, mnt_id in (("fdinfo", _fd_mnt_id), ("map_files", _path_mnt_id)):
            try:
                entries = os.listdir(f"/proc/{pid}/{table}")
            except OSError:
                entries = []
            for entry in entries:
                if (mnt := mnt_id(f"/proc/{pid}/{table}/{entry}")) is not None:
                    used.add(mnt)
    return used


def drop_gone_mounts(pid: int) -> list[Mount]:
    """Before a dump: detach, in the step's mount namespace only, the mounts the node no
    longer has (gone_mounts) and the tree does not use; return them.

    One the tree uses (a file open in it, its working directory, its output's directory) is
    refused: CRIU cannot save it, and a restore without it would not be the step's world.
    """
    gone = gone_mounts(pid)
    if not gone:
        return []
    theirs = mounts_of(pid)
    used = used_mount_ids(tree_pids(pid))
    children: dict[int, list[Mount]] = {}
    for m in theirs:
        children.setdefault(m.parent, []).append(m)

    def in_use(m: Mount, depth: int = 0) -> bool:
        return m.mnt_id in used or (
            depth < 64 and any(in_use(c, depth + 1) for c in children.get(m.mnt_id, []))
        )

    busy = [m for m in gone if in_use(m)]
    if busy:
        names = ", ".join(m.describe() for m in busy)
        raise JobStateError(
            f"the step uses {names}, no longer mounted on this node since the step started; "
            "CRIU cannot checkpoint a mount it cannot find on the node"
        )
    _detach_in(pid, [m.point for m in gone])
    left = {m.mnt_id for m in mounts_of(pid)}
    return [m for m in gone if m.mnt_id not in left]


def _detach_in(pid: int, points: list[str]) -> None:
    """Lazily unmount points in pid's mount namespace (a forked child enters it: setns on a
    mount namespace needs a single-threaded caller)."""
    try:
        ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            code = 1
            try:
                if _libc.setns(ns_fd, CLONE_NEWNS) == 0:
                    os.chdir("/")
                    code = 0
                    for point in points:
                        if _libc.umount2(point.encode(), MNT_DETACH) != 0:
                            code = 2
            finally:
                os._exit(code)
        os.waitpid(child, 0)
    finally:
        os.close(ns_fd)


# /proc/net/tcp states (include/net/tcp_states.h) in which a socket has no peer to restore.
_TCP_UNCONNECTED = {"07", "0A"}  # CLOSE, LISTEN


@dataclass(frozen=True)
class TcpConnection:
    """A connected TCP socket of a tree: its endpoints and whether its peer is in the tree."""

    local: str
    remote: str
    inside: bool

    def describe(self) -> str:
        return f"{_endpoint(self.local)} -> {_endpoint(self.remote)}"


def tcp_connections(pids: list[int]) -> list[TcpConnection]:
    """Every connected TCP socket the tree's processes hold (IPv4 and IPv6).

    A connection is inside the tree when the socket at its other end (local and remote
    swapped) is held by the tree too, e.g. a server and its client over 127.0.0.1: CRIU
    restores both ends together.  Any other one has a peer outside that must still exist,
    at the same address, when the tree is restored.
    """
    inodes: set[str] = set()
    netns: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ns = _ns(pid, "net")
        if ns is not None:
            netns.setdefault(ns, pid)
    sockets: dict[tuple[str, str], str] = {}  # (local, remote) -> inode, of the tree's
    for pid in netns.values():
        for table in ("tcp", "tcp6"):
            for line in _read_lines(f"/proc/{pid}/net/{table}")[1:]:
                f = line.split()
                if len(f) > 9 and f[9] in inodes and f[3] not in _TCP_UNCONNECTED:
                    sockets[(f[1], f[2])] = f[9]
    return [
        TcpConnection(local, remote, (remote, local) in sockets)
        for (local, remote) in sorted(sockets)
    ]


def drop_time_wait(ports: set[int]) -> None:
    """Drop the node's TIME_WAIT TCP sockets on these local ports (`ss -K`, SOCK_DESTROY).

    A listener restored by CRIU binds its port again with the program's own SO_REUSEADDR,
    which most MPI launchers and transports (Open MPI's oob and tcp btl) do not set.  When
    the tree was killed on this node (not vacated), the connections it had accepted on
    that port linger in TIME_WAIT for a minute and the bind fails (EADDRINUSE).  Those
    sockets belong to no process; dropping them only gives up their guard against stray
    segments of the dead connections.  Without `ss`, or a kernel without SOCK_DESTROY,
    nothing is done and CRIU reports the bind error.
    """
    ss = shutil.which("ss")
    if not ports or ss is None:
        return
    expr = " or ".join(f"sport = :{port}" for port in sorted(ports))
    try:
        subprocess.run(
            [ss, "-K", "-t", "-n", "state", "time-wait", f"( {expr} )"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def _endpoint(hexaddr: str) -> str:
    """'0100007F:1F90' -> '127.0.0.1:8080' (/proc/net/tcp{,6} print 32-bit host-order words)."""
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    flip = sys.byteorder == "little"
    words = b"".join(raw[i : i + 4][:: -1 if flip else 1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        host = ".".join(str(b) for b in words)
    else:
        host = "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"
    return f"{host}:{int(port, 16)}"
