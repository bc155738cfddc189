"""Checkpoint the GPU state of a step's CUDA processes through the CUDA driver, around CRIU."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from ccr.deadline import NO_DEADLINE, Deadline
from ccr.errors import GpuError

PROC = Path("/proc")

# Device nodes of the NVIDIA kernel driver that a CUDA process holds open and mapped:
# /dev/nvidia0.., /dev/nvidiactl, /dev/nvidia-uvm(-tools), /dev/nvidia-caps/* (MIG).
# /dev/nvidia-modeset belongs to display clients, not to CUDA.
_DEVICE = re.compile(r"^/dev/nvidia(\d+|ctl|-uvm|-uvm-tools|-caps/.*)$")

INSTALL_HINT = "install ccr[gpu] (pip install 'ccr[gpu]', i.e. cuda-bindings) on a node with "
INSTALL_HINT += "an NVIDIA driver >= 570"

# The driver's checkpoint API appeared in CUDA 12.8 (driver r570).
MIN_DRIVER_VERSION = 12080


class CudaCallError(GpuError):
    """One driver call returned something other than CUDA_SUCCESS."""

    def __init__(self, call: str, pid: int, result: str) -> None:
        super().__init__(f"{call}(pid {pid}) failed: {result}")
        self.call = call
        self.pid = pid
        self.result = result


# --- which processes use the GPU ---------------------------------------------------------


def is_cuda_device(path: str) -> bool:
    """Whether path names one of the NVIDIA device nodes a CUDA process uses."""
    return bool(_DEVICE.match(path.strip()))


def _holds_device_fd(pid: int, proc_root: Path) -> bool:
    try:
        names = os.listdir(proc_root / str(pid) / "fd")
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(proc_root / str(pid) / "fd" / name)
        except OSError:
            continue
        if is_cuda_device(target):
            return True
    return False


def _maps_device(pid: int, proc_root: Path) -> bool:
    try:
        with open(proc_root / str(pid) / "maps", errors="replace") as fh:
            for line in fh:
                # address perms offset dev inode [path]: the path is the sixth field.
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and is_cuda_device(fields[5]):
                    return True
    except OSError:
        return False
    return False


def cuda_pids(pids: Iterable[int], proc_root: Path = PROC) -> list[int]:
    """The pids (in the order given, once each) that hold or map an NVIDIA device node.

    Gone or unreadable processes are left out.  proc_root stands in for /proc in tests.
    """
    found: list[int] = []
    for pid in pids:
        if pid in found:
            continue
        if _holds_device_fd(pid, proc_root) or _maps_device(pid, proc_root):
            found.append(pid)
    return found


def ns_pid(pid: int, proc_root: Path = PROC) -> int | None:
    """The innermost-namespace PID of a host PID (last field of `NSpid:`), None if gone."""
    try:
        text = (proc_root / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def _is_stopped(pid: int, proc_root: Path) -> bool:
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :][:1] in ("T", "t")


# --- the driver ---------------------------------------------------------------------------


class GpuCheckpointer(Protocol):
    """What ccr needs of the CUDA driver's process checkpoint API (one call per method)."""

    name: str

    def available(self) -> bool:
        """Whether the API can be called here (bindings installed, driver recent enough)."""
        ...

    def unavailable_reason(self) -> str:
        """Why available() is False (empty when it is True)."""
        ...

    def lock(self, pid: int, timeout_ms: int) -> None:
        """running -> locked; timeout_ms 0 waits for ever; the process stays running on error."""
        ...

    def checkpoint(self, pid: int) -> None:
        """locked -> checkpointed: device memory copied to host memory, the GPU released."""
        ...

    def restore(self, pid: int) -> None:
        """checkpointed -> locked: device memory and GPU handles re-created."""
        ...

    def unlock(self, pid: int) -> None:
        """locked -> running."""
        ...

    def state(self, pid: int) -> str:
        """'running', 'locked', 'checkpointed', 'failed', 'checkpointing' or 'restoring'."""
        ...


_STATE_NAMES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}


class DriverCheckpointer:
    """GpuCheckpointer on `cuda.bindings.driver` (optional dependency: ccr[gpu]), loaded lazily."""

    name = "cuda-driver"

    def __init__(self) -> None:
        self._driver: Any = None
        self._reason: str | None = None
        self.driver_version: int | None = None

    def _load(self) -> Any:
        if self._driver is not None:
            return self._driver
        if self._reason is not None:
            raise GpuError(f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}")
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            self._reason = f"cuda-bindings is not installed: {exc}"
            raise GpuError(
                f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}"
            ) from None
        if not hasattr(driver, "cuCheckpointProcessLock"):
            self._reason = "this cuda-bindings has no cuCheckpointProcess* functions"
            raise GpuError(f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}")
        try:
            err, version = driver.cuDriverGetVersion()
        except Exception as exc:  # noqa: BLE001 - no libcuda: the bindings raise their own types
            self._reason = f"no NVIDIA driver: {_one_line(exc)}"
            raise GpuError(
                f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}"
            ) from None
        if err != driver.CUresult.CUDA_SUCCESS:
            self._reason = f"cuDriverGetVersion failed: {_result_name(err)}"
            raise GpuError(f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}")
        self.driver_version = int(version)
        if self.driver_version < MIN_DRIVER_VERSION:
            self._reason = f"the driver supports CUDA {_cuda_version(self.driver_version)} only"
            raise GpuError(f"CUDA checkpoint API unavailable ({self._reason}): {INSTALL_HINT}")
        self._driver = driver
        return driver

    def available(self) -> bool:
        try:
            self._load()
        except GpuError:
            return False
        return True

    def unavailable_reason(self) -> str:
        return "" if self.available() else (self._reason or "unknown")

    def _call(self, name: str, pid: int, *args: Any) -> tuple[Any, ...]:
        driver = self._load()
        try:
            result = getattr(driver, name)(pid, *args)
        except Exception as exc:  # noqa: BLE001 - reported as the call's failure, in one line
            raise CudaCallError(name, pid, _one_line(exc)) from None
        err = result[0]
        if err != driver.CUresult.CUDA_SUCCESS:
            raise CudaCallError(name, pid, _result_name(err))
        return tuple(result[1:])

    def lock(self, pid: int, timeout_ms: int) -> None:
        driver = self._load()
        args = driver.CUcheckpointLockArgs()
        args.timeoutMs = max(0, min(int(timeout_ms), 2**32 - 1))
        self._call("cuCheckpointProcessLock", pid, args)

    def checkpoint(self, pid: int) -> None:
        self._call("cuCheckpointProcessCheckpoint", pid, None)

    def restore(self, pid: int) -> None:
        self._call("cuCheckpointProcessRestore", pid, None)

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", pid, None)

    def state(self, pid: int) -> str:
        (value,) = self._call("cuCheckpointProcessGetState", pid)
        name = getattr(value, "name", None)
        if isinstance(name, str) and name.startswith("CU_PROCESS_STATE_"):
            return name[len("CU_PROCESS_STATE_") :].lower()
        return _STATE_NAMES.get(int(value), f"unknown({int(value)})")


def _result_name(err: Any) -> str:
    name = getattr(err, "name", None)
    return name if isinstance(name, str) else f"CUresult {err}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def default_backend() -> GpuCheckpointer:
    """The real driver backend (one per process: it caches the loaded bindings)."""
    global _default
    if _default is None:
        _default = DriverCheckpointer()
    return _default


_default: DriverCheckpointer | None = None


# --- the sequence around a CRIU dump ------------------------------------------------------


def _warn(message: str) -> None:
    print(f"ccr: warning: {message}", file=sys.stderr)


class GpuSequence:
    """Lock and checkpoint every CUDA process of a tree around a CRIU dump, and undo it.

        seq = GpuSequence(deadline=deadline)
        seq.checkpoint(tree_pids)          # lock all, then checkpoint all (no-op: no CUDA)
        try:
            criu.dump(..., deadline=deadline)
        except BaseException:
            seq.rollback()                 # the job runs on, GPU state back on the GPU
            raise
        if leave_running:
            seq.resume()                   # restore all, then unlock all
        manifest.gpu = seq.record()

    Only what this sequence did is undone: a process the user had locked (or checkpointed)
    himself is left so.  The deadline (the checkpoint's MaxWait) bounds the lock
    (its remaining time is the driver's lock timeout) and is checked between calls; the
    driver's checkpoint cannot be interrupted.  Undoing (rollback, resume) ignores the
    deadline: the job must run again whatever the time.  A tree left SIGSTOP'd (a vacate's
    dump) gets SIGCONT before its GPU state is restored: the driver needs the process's
    own restore thread to run.
    """

    def __init__(
        self,
        backend: GpuCheckpointer | None = None,
        *,
        deadline: Deadline = NO_DEADLINE,
        proc_root: Path = PROC,
        clock: Callable[[], float] = time.monotonic,
        cont: Callable[[int], None] | None = None,
    ) -> None:
        self.backend = backend if backend is not None else default_backend()
        self.deadline = deadline
        self.proc_root = proc_root
        self.clock = clock
        self.cont = cont if cont is not None else _sigcont
        self.pids: list[int] = []  # the CUDA processes of the tree (host PIDs)
        self.ns_pids: list[int] = []
        self.skipped: dict[int, str] = {}  # device holders the driver does not know as CUDA
        self.initial: dict[int, str] = {}  # driver state before we touched it
        self.locked: list[int] = []  # locked by us, or tried (and not yet unlocked)
        self.checkpointed: list[int] = []  # checkpointed by us, or tried (not yet restored)
        self.timings: dict[str, float] = {}

    # -- time

    def _check_deadline(self, what: str) -> None:
        self.deadline.check(f"GPU checkpoint ({what})")

    # -- dump side

    def checkpoint(self, pids: Iterable[int]) -> list[int]:
        """Lock, then checkpoint, every CUDA process among pids; return those pids.

        On any failure (or KeyboardInterrupt) everything done so far is rolled back and the
        error re-raised: GpuError for the driver, MaxWaitExceeded past the deadline.
        """
        candidates = cuda_pids(pids, self.proc_root)
        if not candidates:
            return []
        if not self.backend.available():
            raise GpuError(
                f"processes {', '.join(map(str, candidates))} use the GPU but the CUDA checkpoint "
                f"API is unavailable ({self.backend.unavailable_reason()}): {INSTALL_HINT}"
            )
        began = self.clock()
        try:
            self._classify(candidates)
            for pid in self.pids:
                if self.initial[pid] != "running":
                    continue
                self._check_deadline(f"before locking pid {pid}")
                remaining = self.deadline.timeout()
                timeout_ms = 0 if remaining is None else max(1, int(remaining * 1000))
                self.locked.append(pid)  # first: undo asks the driver what a failed call did
                try:
                    self.backend.lock(pid, timeout_ms)
                except GpuError as exc:
                    if self.deadline.expired() or _is_timeout(exc):
                        raise self.deadline.exceeded(
                            f"GPU checkpoint (lock of pid {pid}: {exc})"
                        ) from None
                    raise
            self.timings["gpu_lock_s"] = self.clock() - began
            for pid in self.pids:
                if self.initial[pid] not in ("running", "locked"):
                    continue
                self._check_deadline(f"before checkpointing pid {pid}")
                self.checkpointed.append(pid)
                self.backend.checkpoint(pid)
        except BaseException:
            self.rollback()
            raise
        self.timings["gpu_checkpoint_s"] = self.clock() - began
        return list(self.pids)

    def _classify(self, candidates: list[int]) -> None:
        for pid in candidates:
            try:
                state = self.backend.state(pid)
            except GpuError as exc:
                # Holds an NVIDIA device but is no CUDA process the driver knows (nvidia-smi,
                # a forked child that inherited the descriptors): CRIU will say if it cannot
                # dump it; nothing is broken.
                self.skipped[pid] = str(exc)
                continue
            if state not in ("running", "locked", "checkpointed"):
                raise GpuError(f"CUDA process {pid} is in state {state}: cannot checkpoint it")
            self.initial[pid] = state
            self.pids.append(pid)
            self.ns_pids.append(ns_pid(pid, self.proc_root) or pid)

    def resume(self) -> None:
        """After a leave-running dump: restore, then unlock, what we checkpointed and locked.

        Every process is attempted; a GpuError naming all failures is raised at the end.
        """
        began = self.clock()
        errors = self._undo()
        self.timings["gpu_restore_s"] = self.clock() - began
        if errors:
            raise GpuError("GPU state not restored after the dump: " + "; ".join(errors))

    def rollback(self) -> list[str]:
        """Undo whatever this sequence did so the job runs on; never raises.

        Returns the failures (also printed as warnings).
        """
        errors = self._undo()
        for error in errors:
            _warn(f"GPU rollback: {error}")
        return errors

    def _undo(self) -> list[str]:
        errors: list[str] = []
        touched = self.checkpointed + [p for p in self.locked if p not in self.checkpointed]
        for pid in touched:
            if _is_stopped(pid, self.proc_root):
                self.cont(pid)
        lost: set[int] = set()  # GPU memory not back: unlocking would let the process crash
        for pid in touched:
            state = self._state(pid)
            if state is None:  # the driver cannot tell: trust our bookkeeping
                state = "checkpointed" if pid in self.checkpointed else "locked"
            if state == "checkpointed":
                try:
                    self.backend.restore(pid)
                except GpuError as exc:
                    errors.append(str(exc))
                    lost.add(pid)
                    continue
            elif state not in ("locked", "running"):
                errors.append(f"CUDA process {pid} is in state {state}: its GPU state is lost")
                lost.add(pid)
                continue
            if pid in self.checkpointed:
                self.checkpointed.remove(pid)
        for pid in list(self.locked):
            if pid in lost:
                continue
            try:
                if self._state(pid) in ("locked", None):
                    self.backend.unlock(pid)
                self.locked.remove(pid)
            except GpuError as exc:
                errors.append(str(exc))
        return errors

    def _state(self, pid: int) -> str | None:
        """The driver's view (None when it cannot tell): our bookkeeping may be stale after
        a failed call (a checkpoint that failed half-way, a lock that timed out late)."""
        try:
            return self.backend.state(pid)
        except GpuError:
            return None

    def record(self) -> dict[str, Any]:
        """What the manifest's `gpu` field holds: {} for a step without CUDA processes."""
        if not self.pids:
            return {}
        data: dict[str, Any] = {
            "backend": self.backend.name,
            "pids": list(self.pids),
            "ns_pids": list(self.ns_pids),
            "initial_states": {str(p): s for p, s in self.initial.items()},
        }
        version = getattr(self.backend, "driver_version", None)
        if version:
            data["driver_version"] = version
        if self.skipped:
            data["skipped"] = {str(p): why for p, why in self.skipped.items()}
        data.update({k: round(v, 6) for k, v in self.timings.items()})
        return data

    # -- context manager: rollback on any exception

    def __enter__(self) -> GpuSequence:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.rollback()


def _is_timeout(exc: GpuError) -> bool:
    result = getattr(exc, "result", "")
    return result in ("CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY")


def _sigcont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# --- the restore side ---------------------------------------------------------------------


def needs_gpu(record: dict[str, Any]) -> bool:
    """Whether a checkpoint (its manifest's `gpu` field) holds GPU state."""
    return bool(record.get("ns_pids") or record.get("pids"))


def check_restorable(record: dict[str, Any], backend: GpuCheckpointer | None = None) -> None:
    """Refuse, before CRIU starts anything, a GPU checkpoint this node cannot restore."""
    if not needs_gpu(record):
        return
    backend = backend if backend is not None else default_backend()
    if not backend.available():
        raise GpuError(
            "the checkpoint holds GPU state but the CUDA checkpoint API is unavailable "
            f"({backend.unavailable_reason()}): {INSTALL_HINT}"
        )


def host_pids_for(
    ns_pids: Iterable[int], tree: Iterable[int], proc_root: Path = PROC
) -> dict[int, int]:
    """Map namespace PIDs (as recorded at dump time) to the host PIDs of the restored tree.

    CRIU restores a step's PID namespace with the PIDs it had inside; seen from the host
    they are new.  Raises GpuError naming any recorded PID not found in the tree.
    """
    by_ns: dict[int, int] = {}
    for host in tree:
        inner = ns_pid(host, proc_root)
        if inner is not None and inner not in by_ns:
            by_ns[inner] = host
    wanted = list(ns_pids)
    missing = [p for p in wanted if p not in by_ns]
    if missing:
        raise GpuError(
            f"CUDA processes {', '.join(map(str, missing))} (PIDs in the step's namespace) "
            "are not in the restored tree"
        )
    return {p: by_ns[p] for p in wanted}


def restore_tree(
    record: dict[str, Any],
    tree: Iterable[int],
    backend: GpuCheckpointer | None = None,
    *,
    deadline: Deadline = NO_DEADLINE,
    proc_root: Path = PROC,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """After a CRIU restore: restore, then unlock, the recorded CUDA processes of tree.

    tree: the host PIDs of the restored tree (process.tree_pids(root)).  Every process ends
    `running`, as CRIU's own CUDA plugin leaves them (one it already resumed is left alone).
    Restores all, then unlocks all.  Raises GpuError (a driver call failed, a process is
    missing) or MaxWaitExceeded (checked before each call); the caller must then kill the
    restored tree: it cannot run without its GPU state.  Returns what was done and its time.
    """
    if not needs_gpu(record):
        return {}
    backend = backend if backend is not None else default_backend()
    check_restorable(record, backend)
    began = clock()
    ns_list = [int(p) for p in record.get("ns_pids") or record.get("pids") or []]
    mapping = host_pids_for(ns_list, tree, proc_root)
    hosts = [mapping[p] for p in ns_list]

    def check(what: str) -> None:
        deadline.check(f"GPU restore ({what})")

    already: list[int] = []
    for pid in hosts:
        check(f"before restoring pid {pid}")
        state = backend.state(pid)
        if state == "checkpointed":
            backend.restore(pid)
        elif state == "running":
            already.append(pid)  # CRIU's CUDA plugin did it
        elif state != "locked":
            raise GpuError(f"restored CUDA process {pid} is in state {state}")
    for pid in hosts:
        if pid in already:
            continue
        check(f"before unlocking pid {pid}")
        backend.unlock(pid)
    result: dict[str, Any] = {
        "pids": hosts,
        "ns_pids": ns_list,
        "gpu_restore_s": round(clock() - began, 6),
    }
    if already:
        result["already_running"] = already
    return result


__all__ = [
    "CudaCallError",
    "DriverCheckpointer",
    "GpuCheckpointer",
    "GpuSequence",
    "check_restorable",
    "cuda_pids",
    "default_backend",
    "host_pids_for",
    "is_cuda_device",
    "needs_gpu",
    "ns_pid",
    "restore_tree",
]
