"""Where ccr keeps its state and finds its helper binaries, from the environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ccr import identity
from ccr.errors import CcrError, StorageError, UsageError


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
        with identity.privileged():
            _make_private(path)
    except OSError as exc:
        raise StorageError(f"cannot use state directory {path}: {exc.strerror}") from None
    return path


def _make_private(path: Path) -> None:
    if not path.is_dir():  # private only if ccr creates it: an existing dir is the user's
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)


def key_file(state: Path) -> Path:
    """The manifest HMAC key: `CCR_KEY_FILE` (one key shared by every node), else state dir's."""
    env = os.environ.get("CCR_KEY_FILE")
    return Path(env) if env else state / "manifest.key"


def logs_dir() -> Path:
    """Where CRIU's logs and supervisors' logs go (inside the state directory)."""
    path = state_dir() / "logs"
    with identity.privileged():
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


# Files the job writes that a checkpoint saves (README "Files the job writes"): each up to
# CCR_SAVE_FILE_MAX, all of one step's together up to CCR_SAVE_FILES_TOTAL.  Saved files
# are copied while the tree is frozen, so these bound what they add to the frozen time.
SAVE_FILE_MAX = 256 << 20
SAVE_FILES_TOTAL = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """Bytes from "4096", "64K", "256M", "1G" (binary units, optional "iB"/"B")."""
    spec = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = spec[-1:] if spec[-1:] in _UNITS and not spec[-1:].isdigit() else ""
    number = spec[: len(spec) - len(unit)].strip()
    if not number.isdigit():
        raise UsageError(f"bad {what} {text!r}: use bytes or a size like 64K, 256M, 1G")
    return int(number) * _UNITS[unit]


def save_limits() -> tuple[int, int]:
    """(CCR_SAVE_FILE_MAX, CCR_SAVE_FILES_TOTAL) in bytes; 0 saves no file."""
    each = os.environ.get("CCR_SAVE_FILE_MAX")
    total = os.environ.get("CCR_SAVE_FILES_TOTAL")
    return (
        parse_size(each, "CCR_SAVE_FILE_MAX") if each else SAVE_FILE_MAX,
        parse_size(total, "CCR_SAVE_FILES_TOTAL") if total else SAVE_FILES_TOTAL,
    )


def compress_spec() -> str:
    """`CCR_COMPRESS` (e.g. "zstd:3", "none"): the default codec of checkpoints; zstd."""
    return os.environ.get("CCR_COMPRESS", "zstd")


def dump_watchdog_s() -> float | None:
    """`CCR_DUMP_WATCHDOG`: the longest a dump without MaxWait may take, in seconds (0: no
    bound); None when unset (then checkpoint.dump_watchdog derives it from the tree's size)."""
    text = os.environ.get("CCR_DUMP_WATCHDOG", "")
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"CCR_DUMP_WATCHDOG={text!r} is not a number of seconds") from None
    if value < 0:
        raise UsageError(f"CCR_DUMP_WATCHDOG={text!r} is negative")
    return value


def fast_scratch() -> Path:
    """`CCR_SCRATCH`: the tmpfs for raw images while they are (de)compressed; /dev/shm."""
    return Path(os.environ.get("CCR_SCRATCH", "/dev/shm"))


def debug() -> bool:
    """`CCR_DEBUG` (any value): an internal error shows its traceback instead of one line."""
    return bool(os.environ.get("CCR_DEBUG"))


def env_str(name: str) -> str:
    """A variable set by Slurm (SLURM_*), "" when unset: the one place they are read."""
    return os.environ.get(name, "")


def env_int(name: str, strict: bool = False) -> int | None:
    """A Slurm variable as a non-negative integer; None when unset (or, unless strict,
    not a number: Slurm's own variables are taken as they come)."""
    value = os.environ.get(name, "")
    if value == "":
        return None
    if not value.isdigit():
        if strict:
            raise UsageError(f"{name}={value!r} is not a non-negative integer")
        return None
    return int(value)


def service_socket() -> str:
    """`CCR_SOCKET`: the node service's socket ("" when unset: the default one)."""
    return os.environ.get("CCR_SOCKET", "")


def restart_lazy_default() -> bool:
    """`CCR_RESTART_LAZY=1`: `ccr restart` restores lazily (as --lazy) unless --eager."""
    return os.environ.get("CCR_RESTART_LAZY", "") not in ("", "0", "no", "false")


def lazy_fill_rate() -> int:
    """`CCR_LAZY_FILL_RATE` (bytes a second, e.g. 200M; unset: as fast as it goes): how fast
    a lazy restart's background fill may copy, to leave the node's I/O and memory bandwidth
    to the restored job.  Faults are always served at once."""
    rate = os.environ.get("CCR_LAZY_FILL_RATE")
    return parse_size(rate, "CCR_LAZY_FILL_RATE") if rate else 0


def restore_streamed() -> bool:
    """Restores stream the images to CRIU (engines.imagestream) unless CCR_RESTORE_STREAM=0,
    which restores from a decoded scratch copy over RPC as ccr did before (kept for
    comparison in scripts/bench.py, and as a way out should a CRIU build lack --stream)."""
    return os.environ.get("CCR_RESTORE_STREAM", "") not in ("0", "no", "false")
