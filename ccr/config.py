"""Where ccr keeps its state and finds its helper binaries, from the environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ccr.errors import CcrError, StorageError


def node_name() -> str:
    """This node's name: SLURMD_NODENAME (inside Slurm), else `hostname -s`."""
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]


def state_dir() -> Path:
    """`CCR_STATE_DIR` (`%n` = this node's name), else /var/lib/ccr for root, else ~/.local."""
    env = os.environ.get("CCR_STATE_DIR")
    if env:
        path = Path(env.replace("%n", node_name()))
    elif os.geteuid() == 0:
        path = Path("/var/lib/ccr")
    else:
        path = Path.home() / ".local" / "state" / "ccr"
    try:
        if not path.is_dir():  # private only if ccr creates it: an existing dir is the user's
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.chmod(0o700)
    except OSError as exc:
        raise StorageError(f"cannot use state directory {path}: {exc.strerror}") from None
    return path


def key_file(state: Path) -> Path:
    """The manifest HMAC key: `CCR_KEY_FILE` (one key shared by every node), else state dir's."""
    env = os.environ.get("CCR_KEY_FILE")
    return Path(env) if env else state / "manifest.key"


def logs_dir() -> Path:
    """Where CRIU's logs and supervisors' logs go (inside the state directory)."""
    path = state_dir() / "logs"
    path.mkdir(exist_ok=True, mode=0o700)
    return path


def criu_binary() -> str:
    """`CCR_CRIU`, else /usr/local/sbin/criu (what scripts/install-criu.sh installs), else PATH."""
    env = os.environ.get("CCR_CRIU")
    if env:
        return env
    local = Path("/usr/local/sbin/criu")
    if local.exists():
        return str(local)
    found = shutil.which("criu")
    if not found:
        raise CcrError("CRIU not found (set CCR_CRIU, or see `ccr doctor`)")
    return found


def init_binary() -> str:
    """The minimal init run as PID 1 of each step: dumb-init beside this Python, else PATH."""
    env = os.environ.get("CCR_INIT")
    if env:
        return env
    beside = Path(sys.executable).parent / "dumb-init"
    if beside.exists():
        return str(beside)
    found = shutil.which("dumb-init") or shutil.which("tini")
    if not found:
        raise CcrError("dumb-init not found: install ccr's dependencies (pip install dumb-init)")
    return found


def tcp_established_default() -> bool:
    """`CCR_TCP_ESTABLISHED=1`: checkpoint connections to outside the step by default."""
    return os.environ.get("CCR_TCP_ESTABLISHED", "") not in ("", "0", "no", "false")
