"""The credentials of a dumped tree's tasks, read from CRIU's own images (core-*.img).

CRIU restores each task with the credentials its image names, and the node service runs
CRIU as root for users.  A user's checkpoint must therefore never hold a task with more
than the user has: a setuid helper inside the job (euid 0), a task with a capability, or
a group the user is not in.  The check reads the very images that are then digested and
signed (in ccr's private scratch, which no user can reach), not /proc, so nothing the job
does between a look at /proc and the freeze can slip past it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccr import identity
from ccr.errors import PermissionDeniedError


def _foreign(creds: dict[str, Any], uid: int, gids: set[int]) -> str | None:
    uids = {creds.get(k) for k in ("uid", "euid", "suid", "fsuid")}
    if uids != {uid}:
        return f"uids {sorted(u for u in uids if u is not None)}"
    task_gids = {creds.get(k) for k in ("gid", "egid", "sgid", "fsgid")}
    groups = set(creds.get("groups", []))
    if not (task_gids | groups) <= gids:
        return f"groups {sorted(g for g in (task_gids | groups) - gids if g is not None)}"
    for key in ("cap_inh", "cap_prm", "cap_eff", "cap_amb"):
        if any(creds.get(key, [])):
            return f"capabilities ({key})"
    return None


def refuse_foreign_tasks(images_dir: Path, step: object) -> None:
    """Raise PermissionDeniedError if a task in images_dir has other credentials than the
    service's caller (uid, its gid and groups, no capability).  Nothing to check in-process."""
    caller = identity.current()
    if caller is None or caller.uid == 0:
        return
    from pycriu import images

    gids = {caller.gid, *caller.groups}
    found = False
    for path in sorted(images_dir.glob("core-*.img")):
        with path.open("rb") as fh:
            entries = images.load(fh)["entries"]
        for entry in entries:
            creds = entry.get("thread_core", {}).get("creds")
            if creds is None:
                continue
            found = True
            why = _foreign(creds, caller.uid, gids)
            if why is not None:
                pid = path.stem.removeprefix("core-")
                raise PermissionDeniedError(
                    f"step {step}: task {pid} runs with other credentials than its owner "
                    f"uid {caller.uid} ({why}): a user's checkpoint holds only the user's tasks"
                )
    if not found:
        raise PermissionDeniedError(f"step {step}: no task credentials in CRIU's images")
