"""What ccr puts right before CRIU restores a dumped tree, for states CRIU's restore gets
wrong or cannot set up alone: periodic timerfds it would restore disarmed, and the missing
directories of bound Unix sockets it would fail to bind.

Never applied to a stored checkpoint: corrected images are written into the restore's
scratch copy, or into an overlay of the checkpoint (links to its files, corrected copies
of the few that change), so that the checkpoint itself stays as it was signed.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccr.engines import criu_wire

# The image files that may hold timerfds: files.img (CRIU >= 3.15 keeps every file there)
# and timerfd.img (older CRIU).  Likewise for Unix sockets.
TIMERFD_IMAGES = ("files.img", "timerfd.img")
UNIXSK_IMAGES = ("files.img", "unixsk.img")
NSEC = 1_000_000_000


# files.img's file_entry.type values (CRIU's images/fdinfo.proto) that a fix looks at.
_FD_UNIXSK = 5
_FD_TIMERFD = 17


def may_need_fixes(image_dir: Path) -> bool:
    """Whether the images hold anything the socket or timerfd fixes look at: restores of
    trees without Unix sockets or timerfds (most) skip decoding images with pycriu, whose
    import and decode took 60-100 ms of a 64 MiB restart here."""
    if any((image_dir / name).exists() for name in ("timerfd.img", "unixsk.img")):
        return True
    kinds = criu_wire.fd_types(image_dir / "files.img")
    return kinds is None or bool(kinds & {_FD_UNIXSK, _FD_TIMERFD})


def _load(path: Path) -> dict[str, Any] | None:
    """An image decoded by pycriu; None if absent or undecodable (then nothing in it is
    corrected: CRIU restores it as it is, and says so if it cannot)."""
    if not path.is_file():
        return None
    from pycriu import images

    try:
        with path.open("rb") as fh:
            return dict(images.load(fh))
    except Exception:  # noqa: BLE001 - a correction never stops a restore CRIU could do
        return None


def _dumps(image: dict[str, Any]) -> bytes:
    from pycriu import images

    buf = io.BytesIO()
    images.dump(image, buf)
    return buf.getvalue()


@dataclass
class TimerFix:
    """A periodic timerfd re-armed in the image: its id and the interval it waits first."""

    image: str
    fd_id: int
    interval_ns: int

    def describe(self) -> str:
        return (
            f"{self.image}: timerfd id {self.fd_id} re-armed "
            f"(it_value 0 -> its interval, {self.interval_ns / 1e6:g} ms)"
        )


def _timerfd_entries(image_name: str, image: dict[str, Any]) -> list[dict[str, Any]]:
    if image_name == "files.img":
        return [e["tfd"] for e in image["entries"] if e.get("type") == "TIMERFD" and "tfd" in e]
    return list(image["entries"])


def corrected_timerfds(image_dir: Path) -> tuple[dict[str, bytes], list[TimerFix]]:
    """Image files whose periodic timerfds CRIU would restore disarmed, corrected.

    A periodic timer that expired and whose expiry was not read yet (ticks > 0) is not
    re-armed by the kernel until that read, so /proc's fdinfo, which CRIU dumps, shows it
    with it_value 0.  CRIU restores such a timer with timerfd_settime(it_value 0): disarmed,
    and a loop waiting for its next tick waits forever.  Its next expiry was due within
    one interval, so the interval is what it waits first after the restore; its unread
    ticks are restored by CRIU as they were.  A timer with ticks 0 and it_value 0 was
    really disarmed (timerfd_settime clears the ticks) and is left so.

    Returns {file name: corrected content} and what was corrected.
    """
    out: dict[str, bytes] = {}
    fixes: list[TimerFix] = []
    for name in TIMERFD_IMAGES:
        image = _load(image_dir / name)
        if image is None:
            continue
        changed = False
        for tfd in _timerfd_entries(name, image):
            interval = int(tfd.get("isec", 0)) * NSEC + int(tfd.get("insec", 0))
            value = int(tfd.get("vsec", 0)) * NSEC + int(tfd.get("vnsec", 0))
            if interval > 0 and value == 0 and int(tfd.get("ticks", 0)) > 0:
                tfd["vsec"], tfd["vnsec"] = int(tfd.get("isec", 0)), int(tfd.get("insec", 0))
                fixes.append(TimerFix(name, int(tfd.get("id", 0)), interval))
                changed = True
        if changed:
            out[name] = _dumps(image)
    return out, fixes


# inventory.img's network_lock_method values (CRIU's images/inventory.proto).
NETWORK_LOCK_SKIP = 3


def lifted_network_lock(image_dir: Path) -> dict[str, bytes]:
    """inventory.img with its network lock marked as already lifted (skip).

    CRIU's restore unlocks with the lock method its dump recorded in the inventory,
    whatever the restore asks for.  A dump that left the tree running lifted its lock at
    once, so that second unlock finds no nftables table and fails the whole restore
    ("Could not process rule: No such file or directory": the 2-node MPI job here).
    Only for such a dump (the caller's to know); a vacate's lock is still there to lift.
    """
    image = _load(image_dir / "inventory.img")
    if image is None:
        return {}
    entry = image["entries"][0]
    if entry.get("network_lock_method") in (None, NETWORK_LOCK_SKIP):
        return {}
    entry["network_lock_method"] = NETWORK_LOCK_SKIP
    return {"inventory.img": _dumps(image)}


def write_overlay(image_dir: Path, overlay: Path, replaced: dict[str, bytes]) -> None:
    """Fill the empty directory overlay with image_dir as CRIU should read it: a symlink to
    each of its files, except those in replaced, written there with their new content."""
    for entry in image_dir.iterdir():
        if entry.name not in replaced and entry.is_file():
            (overlay / entry.name).symlink_to(entry.resolve())
    for name, data in replaced.items():
        _write_private(overlay / name, data)


def replace_in_place(image_dir: Path, replaced: dict[str, bytes]) -> None:
    """Write the corrected files into image_dir (a scratch copy that ccr owns)."""
    for name, data in replaced.items():
        tmp = image_dir / f".{name}.ccr-new"
        _write_private(tmp, data)
        os.replace(tmp, image_dir / name)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# -- bound Unix sockets -------------------------------------------------------------------


def _mounts(image_dir: Path) -> dict[int, dict[str, Any]]:
    mounts: dict[int, dict[str, Any]] = {}
    for path in sorted(image_dir.glob("mountpoints-*.img")):
        image = _load(path)
        for entry in image["entries"] if image else []:
            mounts[int(entry["mnt_id"])] = entry
    return mounts


def _restored_by_criu(mount: dict[str, Any] | None) -> bool:
    """Whether a mount of the step is one CRIU recreates with its content (the step's own
    tmpfs at /tmp or /dev/shm), not a node mount it binds from the node (external) or the
    node's root."""
    if mount is None:
        return False
    external = bool(mount.get("ext_key") or mount.get("ext_mount"))
    return not external and mount.get("mountpoint") not in ("/", "./", "")


def _socket_name(usk: dict[str, Any]) -> bytes:
    from pycriu.images import pb2dict

    raw = usk.get("name", "")
    name = pb2dict.decode_unix(raw.encode()) if isinstance(raw, str) else bytes(raw)
    return name.rstrip(b"\0")


def bound_socket_paths(image_dir: Path) -> list[Path]:
    """The node paths that bound Unix sockets of the dumped tree are bound to.

    Abstract names have no path; sockets on a mount CRIU restores with its content (the
    step's private /tmp) are left to CRIU.  A relative name is taken against the directory
    CRIU recorded for it.
    """
    mounts = _mounts(image_dir)
    found: set[Path] = set()
    for name in UNIXSK_IMAGES:
        image = _load(image_dir / name)
        if image is None:
            continue
        if name == "files.img":
            entries = [e["usk"] for e in image["entries"] if e.get("type") == "UNIXSK"]
        else:
            entries = list(image["entries"])
        for usk in entries:
            sock = _socket_name(usk)
            if not sock or sock.startswith(b"\0"):
                continue
            if not sock.startswith(b"/"):
                base = usk.get("name_dir", "")
                if not base.startswith("/"):
                    continue
                sock = base.encode() + b"/" + sock
            if "mnt_id" in usk and _restored_by_criu(mounts.get(int(usk["mnt_id"]))):
                continue
            found.add(Path(os.fsdecode(sock)))
    return sorted(found)


def _may_create_in(parent: os.stat_result, uid: int, gid: int) -> bool:
    """Whether uid:gid could create an entry in a directory with these stats (write and
    search permission by its mode bits; root can anywhere)."""
    if uid == 0:
        return True
    mode = parent.st_mode
    if parent.st_uid == uid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif parent.st_gid == gid:
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return mode & need == need


def make_socket_dirs(sockets: list[Path], uid: int, gid: int) -> list[Path]:
    """Create the missing parent directories of sockets (mode 0700, owned by uid:gid) that
    the job's user could have created; return those created, parents first.

    A directory the user could not have made (its nearest existing parent is not theirs to
    write) is not made for them: CRIU's restore then says which socket it cannot bind.
    """
    created: list[Path] = []
    as_root = os.geteuid() == 0
    for sock in sockets:
        missing: list[Path] = []
        parent = sock.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        if not missing:
            continue
        try:
            if not parent.is_dir() or not _may_create_in(parent.stat(), uid, gid):
                continue
        except OSError:
            continue
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # made by someone else meanwhile: theirs, left as it is
            except OSError:
                break
            created.append(path)
            if as_root and (uid, gid) != (0, 0):
                _give_to(path, uid, gid)
    return created


def _give_to(path: Path, uid: int, gid: int) -> None:
    """chown a directory ccr just made, by handle: never follow a link swapped in for it,
    never take over a directory that is not the one ccr made (root's, mode 0700)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700:
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
