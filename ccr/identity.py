"""On whose behalf ccr acts: the process's own user, or a caller the node service serves.

In-process (root, or any user running ccr directly) nothing here changes anything.  In a
service worker (ccr/service/server.py) the caller is a user: the worker then does every file
access with the user's filesystem credentials (setfsuid/setfsgid and the user's groups), so
the kernel's own permission checks apply to every path a user names and what ccr creates
belongs to the user.  A fsuid other than 0 drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
CAP_FOWNER and CAP_CHOWN from the effective set (capabilities(7)); privileged() takes them
back, only for the service's own state (registry, key, logs) and CRIU.  Other capabilities
(CAP_SYS_ADMIN for the step's namespaces, CAP_SYS_PTRACE) stay: CRIU and the step's set-up
need them, and neither is a file access.  setfsuid is per thread: threads started while the
user's credentials are in force keep them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Caller:
    """A user the service acts for: from SO_PEERCRED, groups from the user database."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int = 0


_caller: Caller | None = None
_depth = threading.local()


def current() -> Caller | None:
    """The service's caller, or None in-process (the process's own identity)."""
    return _caller


def caller_uid() -> int:
    return os.geteuid() if _caller is None else _caller.uid


def caller_gid() -> int:
    return os.getegid() if _caller is None else _caller.gid


def served_user() -> bool:
    """True in a service worker acting for a user other than root."""
    return _caller is not None and _caller.uid != 0


def _set_fs(uid: int, gid: int) -> None:
    # setfsgid first: with fsuid already the user's, changing fsgid would need CAP_SETGID
    # only, which stays; the order matters for readability, not for the kernel.
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:  # -1 fails: returns current
        raise OSError(f"setfsuid({uid})/setfsgid({gid}) did not take effect")


def become(caller: Caller) -> None:
    """From now on this process (its current thread and threads it starts) acts as caller."""
    global _caller
    _caller = caller
    if caller.uid == 0:
        return
    os.setgroups(list(caller.groups))  # glibc applies it to every thread
    _set_fs(caller.uid, caller.gid)


@contextmanager
def privileged() -> Iterator[None]:
    """Root's filesystem credentials, for the service's own files and CRIU; nests."""
    if not served_user():
        yield
        return
    depth = getattr(_depth, "n", 0)
    _depth.n = depth + 1
    if depth == 0:
        _set_fs(0, 0)
    try:
        yield
    finally:
        _depth.n = depth
        if depth == 0:
            assert _caller is not None
            _set_fs(_caller.uid, _caller.gid)


@contextmanager
def as_caller() -> Iterator[None]:
    """The caller's filesystem credentials again, inside privileged() (CRIU's hooks)."""
    if not served_user() or getattr(_depth, "n", 0) == 0:
        yield
        return
    assert _caller is not None
    saved = _depth.n
    _depth.n = 0
    _set_fs(_caller.uid, _caller.gid)
    try:
        yield
    finally:
        _depth.n = saved
        _set_fs(0, 0)


def give_to_caller(directory: Path) -> None:
    """chown directory and what is directly in it (CRIU's images, written as root) to the
    caller, never following a link.  Only for ccr's private scratch (see private_dir)."""
    if not served_user():
        return
    assert _caller is not None
    with privileged():
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name in os.listdir(fd):
                os.chown(name, _caller.uid, _caller.gid, dir_fd=fd, follow_symlinks=False)
            os.fchown(fd, _caller.uid, _caller.gid)
        finally:
            os.close(fd)


# Where a service worker puts the raw images of a user's dump or restore: a directory the
# user owns (so the worker, with the user's credentials, reads and writes it) inside a
# root-owned container of mode 0711 (the service makes it, see server.py), under a name with
# 128 random bits that the container does not list.  No process of the user can reach it,
# so nothing can swap an image between ccr's checks and CRIU, and CRIU (root) never writes
# into a directory a user can write to.
PRIVATE_SCRATCH_ENV = "CCR_SERVICE_SCRATCH"


def private_container(fast: bool) -> Path | None:
    """The service's scratch container (tmpfs or disk), or None in-process."""
    if not served_user():
        return None
    value = os.environ.get(PRIVATE_SCRATCH_ENV + ("_FAST" if fast else "_DISK"))
    return Path(value) if value else None


def make_private_dir(path: Path) -> None:
    """mkdir path (in a service container) as root, then give it to the caller, 0700."""
    assert _caller is not None
    with privileged():
        os.mkdir(path, 0o700)
        os.chown(path, _caller.uid, _caller.gid, follow_symlinks=False)


CAP_SYS_RESOURCE = 24


def lacks_sys_resource() -> bool:
    """True where root has no CAP_SYS_RESOURCE (some sandboxes drop it from the bounding
    set; this project's CI VM does)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return not int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1
    except OSError:
        pass
    return False


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CAP_V3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2


def criu_as_caller(dump: bool, lacking: bool) -> bool:
    """Whether a CRIU run is the special one of criu_child_ids (a user's dump where root
    lacks CAP_SYS_RESOURCE); CRIU then needs its `unprivileged` option."""
    return dump and lacking and served_user()


def criu_child_ids(dump: bool, lacking: bool) -> None:  # pragma: no cover - CRIU's child
    """For a user's CRIU dump where root lacks CAP_SYS_RESOURCE: CRIU runs with the user's
    uid, gid and groups, and root's capabilities (ambient, so they survive the exec).

    Without CAP_SYS_RESOURCE the kernel lets CRIU read a task's rlimits only when CRIU's
    real ids are the task's (`Can't get rlimit 0: Operation not permitted`), and CRIU
    (libnftables) refuses a real uid other than its effective one, so both are the user's.
    The user cannot ptrace it or read its /proc files (its capabilities are no subset of
    theirs); they may signal it, which only fails their own dump (rolled back).  CRIU is
    given its `unprivileged` option (it refuses a non-zero euid otherwise) and keeps every
    capability, so it dumps as it does as root.
    """
    if not criu_as_caller(dump, lacking):
        return
    assert _caller is not None
    _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups(list(_caller.groups))
    os.setresgid(_caller.gid, _caller.gid, _caller.gid)
    os.setresuid(_caller.uid, _caller.uid, _caller.uid)  # permitted kept, effective cleared
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for half in data:
        half.effective = half.inheritable = half.permitted
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    permitted = data[0].permitted | data[1].permitted << 32
    for cap in range(64):
        if permitted >> cap & 1:
            _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)


def drop_to_caller() -> None:  # pragma: no cover - runs in the step's init before exec
    """In a step's init, just before exec: become exactly the caller, no capability left.

    setgroups, then setgid and setuid (real, effective, saved and fs ids): a setuid from 0
    to another uid clears the permitted, effective and ambient capability sets.
    no_new_privs: no setuid binary or file capability gives the job more afterwards.
    """
    if not served_user():
        return
    assert _caller is not None
    os.setgroups(list(_caller.groups))
    os.setresgid(_caller.gid, _caller.gid, _caller.gid)
    os.setresuid(_caller.uid, _caller.uid, _caller.uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
