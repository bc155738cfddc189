"""GPU checkpoint orchestration without a GPU: detection, ordering, rollback, deadlines."""

from __future__ import annotations

import enum
import json
import os
import sys
import types
from pathlib import Path

import pytest

from ccr.deadline import Deadline
from ccr.engines import gpu
from ccr.engines.gpu import CudaCallError, DriverCheckpointer, GpuSequence
from ccr.errors import GpuError, MaxWaitExceeded, exit_code_for
from ccr.storage.manifest import StepManifest

# --- a fake /proc -------------------------------------------------------------------------


def make_proc(
    root: Path,
    pid: int,
    *,
    fds: dict[str, str] | None = None,
    maps: list[str] | None = None,
    nspid: list[int] | None = None,
    state: str = "S",
) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    for num, target in (fds or {}).items():
        (d / "fd" / num).symlink_to(target)
    (d / "maps").write_text("".join(line + "\n" for line in maps or []))
    ns = " ".join(map(str, nspid or [pid]))
    (d / "status").write_text(f"Name:\tpython\nPid:\t{pid}\nNSpid:\t{ns}\n")
    (d / "stat").write_text(f"{pid} (python (x)) {state} 1 1 1 0 -1\n")


DEV_MAP = "7f0000000000-7f0000200000 rw-s 00000000 00:05 1234                       /dev/nvidia0"
CTL_MAP = "7f0000400000-7f0000401000 rw-s 00000000 00:05 1235                       /dev/nvidiactl"
LIB_MAP = "7f0000600000-7f0000700000 r-xp 00000000 08:01 42   /usr/lib/x86_64-linux-gnu/libc.so.6"
ANON_MAP = "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/dev/nvidia0", True),
        ("/dev/nvidia7", True),
        ("/dev/nvidiactl", True),
        ("/dev/nvidia-uvm", True),
        ("/dev/nvidia-uvm-tools", True),
        ("/dev/nvidia-caps/nvidia-cap1", True),
        ("/dev/nvidia-modeset", False),
        ("/dev/null", False),
        ("/dev/nvidia0x", False),
        ("/home/u/dev/nvidia0", False),
        ("socket:[1234]", False),
    ],
)
def test_is_cuda_device(path: str, expected: bool) -> None:
    assert gpu.is_cuda_device(path) is expected


def test_cuda_pids_from_fds_and_maps(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, fds={"0": "/dev/null", "5": "/dev/nvidia0"}, maps=[LIB_MAP])
    make_proc(tmp_path, 11, fds={"0": "/dev/null"}, maps=[LIB_MAP, CTL_MAP, ANON_MAP])
    make_proc(tmp_path, 12, fds={"0": "/dev/null", "1": "pipe:[99]"}, maps=[LIB_MAP, ANON_MAP])
    make_proc(tmp_path, 13, fds={"3": "/dev/nvidia-modeset"})
    make_proc(tmp_path, 14, fds={"7": "/dev/nvidia-uvm"})
    # 15 is gone (no directory): left out, no error
    assert gpu.cuda_pids([12, 14, 10, 15, 11, 13, 10], tmp_path) == [14, 10, 11]


def test_cuda_pids_unreadable_fd_dir_falls_back_to_maps(tmp_path: Path) -> None:
    make_proc(tmp_path, 20, maps=[DEV_MAP])
    (tmp_path / "20" / "fd").rmdir()
    make_proc(tmp_path, 21)
    (tmp_path / "21" / "maps").unlink()
    assert gpu.cuda_pids([20, 21], tmp_path) == [20]


def test_cuda_pids_on_the_real_proc() -> None:
    assert gpu.cuda_pids([os.getpid()]) in ([], [os.getpid()])
    assert gpu.cuda_pids([2**22 + 12345]) == []


def test_ns_pid(tmp_path: Path) -> None:
    make_proc(tmp_path, 4321, nspid=[4321, 7])
    make_proc(tmp_path, 99)
    assert gpu.ns_pid(4321, tmp_path) == 7
    assert gpu.ns_pid(99, tmp_path) == 99
    assert gpu.ns_pid(5, tmp_path) is None


# --- a fake driver ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """The driver's state machine, per pid, with injectable failures and costs in time."""

    name = "fake"

    _CALLS = {
        "lock": "cuCheckpointProcessLock",
        "checkpoint": "cuCheckpointProcessCheckpoint",
        "restore": "cuCheckpointProcessRestore",
        "unlock": "cuCheckpointProcessUnlock",
        "state": "cuCheckpointProcessGetState",
    }
    _RULES = {
        "lock": ("running", "locked"),
        "checkpoint": ("locked", "checkpointed"),
        "restore": ("checkpointed", "locked"),
        "unlock": ("locked", "running"),
    }

    def __init__(
        self,
        states: dict[int, str],
        *,
        clock: FakeClock | None = None,
        cost: float = 0.0,
        available: bool = True,
    ) -> None:
        self.states = dict(states)
        self.calls: list[tuple[str, int]] = []
        self.lock_timeouts: dict[int, int] = {}
        self.failures: dict[tuple[str, int], BaseException] = {}
        self.after_failure: dict[tuple[str, int], str] = {}  # state a failed call leaves
        self.clock = clock
        self.cost = cost
        self._available = available

    def available(self) -> bool:
        return self._available

    def unavailable_reason(self) -> str:
        return "" if self._available else "cuda-bindings is not installed"

    def _do(self, op: str, pid: int) -> None:
        self.calls.append((op, pid))
        if self.clock is not None:
            self.clock.now += self.cost
        if (op, pid) in self.failures:
            if (op, pid) in self.after_failure:
                self.states[pid] = self.after_failure[(op, pid)]
            raise self.failures[(op, pid)]
        if pid not in self.states:
            raise CudaCallError(self._CALLS[op], pid, "CUDA_ERROR_INVALID_VALUE")
        if op == "state":
            return
        before, after = self._RULES[op]
        if self.states[pid] != before:
            raise CudaCallError(self._CALLS[op], pid, "CUDA_ERROR_ILLEGAL_STATE")
        self.states[pid] = after

    def lock(self, pid: int, timeout_ms: int) -> None:
        self.lock_timeouts[pid] = timeout_ms
        self._do("lock", pid)

    def checkpoint(self, pid: int) -> None:
        self._do("checkpoint", pid)

    def restore(self, pid: int) -> None:
        self._do("restore", pid)

    def unlock(self, pid: int) -> None:
        self._do("unlock", pid)

    def state(self, pid: int) -> str:
        self._do("state", pid)
        return self.states[pid]

    def ops(self) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[0] != "state"]

    def fail(self, op: str, pid: int, result: str = "CUDA_ERROR_UNKNOWN", leaves: str = "") -> None:
        self.failures[(op, pid)] = CudaCallError(self._CALLS[op], pid, result)
        if leaves:
            self.after_failure[(op, pid)] = leaves


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Host pids 100 (init, no GPU), 101 and 103 (CUDA), 102 (no GPU); ns pids 1..4."""
    make_proc(tmp_path, 100, nspid=[100, 1], fds={"0": "/dev/null"})
    make_proc(tmp_path, 101, nspid=[101, 2], fds={"4": "/dev/nvidiactl", "5": "/dev/nvidia0"})
    make_proc(tmp_path, 102, nspid=[102, 3], maps=[LIB_MAP])
    make_proc(tmp_path, 103, nspid=[103, 4], maps=[DEV_MAP])
    return tmp_path


PIDS = [100, 101, 102, 103]


def seq_for(backend: FakeBackend, proc: Path, **kw: object) -> GpuSequence:
    return GpuSequence(backend, proc_root=proc, **kw)  # type: ignore[arg-type]


def test_sequence_order_leave_running(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    seq = seq_for(backend, tree)
    assert seq.checkpoint(PIDS) == [101, 103]
    assert backend.ops() == [
        ("lock", 101),
        ("lock", 103),
        ("checkpoint", 101),
        ("checkpoint", 103),
    ]
    assert backend.states == {101: "checkpointed", 103: "checkpointed"}
    assert backend.lock_timeouts == {101: 0, 103: 0}  # no MaxWait: the driver waits
    seq.resume()
    assert backend.ops()[4:] == [
        ("restore", 101),
        ("restore", 103),
        ("unlock", 101),
        ("unlock", 103),
    ]
    assert backend.states == {101: "running", 103: "running"}
    seq.rollback()  # nothing left to undo: no call that changes anything
    assert len(backend.ops()) == 8


def test_no_cuda_process_touches_no_driver(tmp_path: Path) -> None:
    make_proc(tmp_path, 1, maps=[LIB_MAP])
    backend = FakeBackend({}, available=False)
    seq = seq_for(backend, tmp_path)
    assert seq.checkpoint([1]) == []
    seq.resume()
    assert backend.calls == []
    assert seq.record() == {}


def test_cuda_process_without_bindings_is_a_clear_error(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"}, available=False)
    with pytest.raises(GpuError, match=r"101, 103 use the GPU.*install ccr\[gpu\]") as info:
        seq_for(backend, tree).checkpoint(PIDS)
    assert "\n" not in str(info.value)
    assert exit_code_for(info.value) == 10
    assert backend.calls == []


FAILURE_POINTS = [("lock", 101), ("lock", 103), ("checkpoint", 101), ("checkpoint", 103)]


@pytest.mark.parametrize(("op", "pid"), FAILURE_POINTS)
def test_failure_at_each_step_rolls_back(tree: Path, op: str, pid: int) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    backend.fail(op, pid, "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(GpuError, match=rf"pid {pid}\) failed: CUDA_ERROR_OUT_OF_MEMORY"):
        seq_for(backend, tree).checkpoint(PIDS)
    assert backend.states == {101: "running", 103: "running"}
    ops = backend.ops()
    undo = ops[ops.index((op, pid)) + 1 :]
    # nothing went on after the failure but the undoing: restores first, then unlocks
    assert all(o[0] in ("restore", "unlock") for o in undo)
    assert undo == sorted(undo, key=lambda o: o[0] == "unlock")
    assert sorted(p for o, p in undo if o == "unlock") == sorted(
        p for o, p in ops if o == "lock" and (o, p) != (op, pid)
    )


def test_failure_of_the_criu_dump_rolls_back(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    with pytest.raises(RuntimeError, match="dump failed"):
        with seq_for(backend, tree) as seq:
            seq.checkpoint(PIDS)
            raise RuntimeError("dump failed")
    assert backend.states == {101: "running", 103: "running"}


def test_interrupt_rolls_back(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    backend.failures[("checkpoint", 103)] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        seq_for(backend, tree).checkpoint(PIDS)
    assert backend.states == {101: "running", 103: "running"}


def test_rollback_trusts_the_driver_over_bookkeeping(tree: Path) -> None:
    # The checkpoint call fails after the driver did checkpoint: it must still be restored.
    backend = FakeBackend({101: "running", 103: "running"})
    backend.fail("checkpoint", 103, "CUDA_ERROR_UNKNOWN", leaves="checkpointed")
    with pytest.raises(GpuError):
        seq_for(backend, tree).checkpoint(PIDS)
    assert backend.states == {101: "running", 103: "running"}


def test_lock_that_fails_late_is_undone(tree: Path) -> None:
    # The lock call reports a failure but the driver did lock: it must still be unlocked.
    backend = FakeBackend({101: "running", 103: "running"})
    backend.fail("lock", 103, "CUDA_ERROR_UNKNOWN", leaves="locked")
    with pytest.raises(GpuError):
        seq_for(backend, tree).checkpoint(PIDS)
    assert backend.states == {101: "running", 103: "running"}


def test_rollback_never_raises_and_reports(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    seq = seq_for(backend, tree)
    seq.checkpoint(PIDS)
    backend.fail("restore", 101, "CUDA_ERROR_ILLEGAL_STATE")
    errors = seq.rollback()
    assert errors == ["cuCheckpointProcessRestore(pid 101) failed: CUDA_ERROR_ILLEGAL_STATE"]
    assert "GPU rollback: cuCheckpointProcessRestore(pid 101)" in capsys.readouterr().err
    # 103 runs again; 101 stays locked (unlocking it without its memory would crash it)
    assert backend.states == {101: "checkpointed", 103: "running"}
    assert ("unlock", 101) not in backend.ops()


def test_resume_attempts_all_then_raises(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    seq = seq_for(backend, tree)
    seq.checkpoint(PIDS)
    backend.fail("unlock", 101, "CUDA_ERROR_UNKNOWN")
    with pytest.raises(GpuError, match=r"not restored.*pid 101\) failed: CUDA_ERROR_UNKNOWN"):
        seq.resume()
    assert backend.states[103] == "running"


def test_stopped_process_is_continued_before_its_restore(tree: Path) -> None:
    make_proc(tree, 105, nspid=[105, 5], maps=[DEV_MAP], state="T")
    backend = FakeBackend({105: "running"})
    continued: list[int] = []
    seq = seq_for(backend, tree, cont=continued.append)
    seq.checkpoint([105])
    seq.rollback()
    assert continued == [105]
    assert backend.states == {105: "running"}


def test_states_set_by_the_user_are_kept(tree: Path) -> None:
    backend = FakeBackend({101: "locked", 103: "checkpointed"})
    seq = seq_for(backend, tree)
    assert seq.checkpoint(PIDS) == [101, 103]
    assert backend.ops() == [("checkpoint", 101)]
    seq.resume()
    assert backend.ops() == [("checkpoint", 101), ("restore", 101)]
    assert backend.states == {101: "locked", 103: "checkpointed"}


def test_device_holder_unknown_to_the_driver_is_skipped(tree: Path) -> None:
    backend = FakeBackend({103: "running"})  # 101 holds the device but is no CUDA process
    seq = seq_for(backend, tree)
    assert seq.checkpoint(PIDS) == [103]
    record = seq.record()
    assert record["pids"] == [103]
    assert "101" in record["skipped"]


def test_failed_process_refused(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "failed"})
    with pytest.raises(GpuError, match="103 is in state failed"):
        seq_for(backend, tree).checkpoint(PIDS)
    assert backend.ops() == []


# --- deadlines ------------------------------------------------------------------------------


def test_deadline_bounds_the_lock_timeout(tree: Path) -> None:
    clock = FakeClock()
    backend = FakeBackend({101: "running", 103: "running"}, clock=clock, cost=1.0)
    seq = seq_for(backend, tree, deadline=Deadline.after(10.0, clock=clock), clock=clock)
    seq.checkpoint(PIDS)
    # state(101), state(103) cost 2 s: 8 s left for the first lock, 7 s for the second
    assert backend.lock_timeouts == {101: 8000, 103: 7000}
    assert seq.deadline.remaining() == pytest.approx(4.0)


def test_deadline_already_past(tree: Path) -> None:
    clock = FakeClock()
    backend = FakeBackend({101: "running", 103: "running"}, clock=clock)
    seq = seq_for(backend, tree, deadline=Deadline.after(-1, clock=clock), clock=clock)
    with pytest.raises(MaxWaitExceeded, match="before locking pid 101"):
        seq.checkpoint(PIDS)
    assert backend.ops() == []


def test_deadline_passing_mid_sequence_rolls_back(tree: Path) -> None:
    clock = FakeClock()
    backend = FakeBackend({101: "running", 103: "running"}, clock=clock, cost=1.0)
    seq = seq_for(backend, tree, deadline=Deadline.after(3.5, clock=clock), clock=clock)
    with pytest.raises(MaxWaitExceeded, match="before checkpointing pid 101") as info:
        seq.checkpoint(PIDS)
    assert exit_code_for(info.value) == 6
    assert backend.states == {101: "running", 103: "running"}
    assert ("checkpoint", 101) not in backend.ops()


def test_lock_timeout_is_maxwait(tree: Path) -> None:
    backend = FakeBackend({101: "running", 103: "running"})
    backend.fail("lock", 103, "CUDA_ERROR_TIMEOUT")
    seq = seq_for(backend, tree, deadline=Deadline.after(1e12))
    with pytest.raises(MaxWaitExceeded, match="lock of pid 103"):
        seq.checkpoint(PIDS)
    assert backend.states == {101: "running", 103: "running"}


def test_no_deadline_means_no_remaining() -> None:
    seq = GpuSequence(FakeBackend({}))  # type: ignore[arg-type]
    assert seq.deadline.remaining() is None


# --- the manifest record ------------------------------------------------------------------


def test_record_shape_and_manifest_round_trip(tree: Path) -> None:
    clock = FakeClock()
    backend = FakeBackend({101: "running", 103: "running"}, clock=clock, cost=0.5)
    seq = seq_for(backend, tree, clock=clock)
    seq.checkpoint(PIDS)
    seq.resume()
    record = seq.record()
    assert record["backend"] == "fake"
    assert record["pids"] == [101, 103]
    assert record["ns_pids"] == [2, 4]
    assert record["initial_states"] == {"101": "running", "103": "running"}
    assert record["gpu_lock_s"] == pytest.approx(2.0)  # 2 state + 2 lock calls
    assert record["gpu_checkpoint_s"] == pytest.approx(3.0)
    assert record["gpu_restore_s"] > 0
    assert json.loads(json.dumps(record)) == record
    manifest = StepManifest(
        job_id=1,
        step_id=0,
        argv=["python"],
        cwd="/",
        output="/dev/null",
        hostname="h",
        uid=0,
        gid=0,
        root_pid=100,
        pids=PIDS,
        criu_version="4.2",
        created=0.0,
        leave_running=True,
        gpu=record,
    )
    again = StepManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.gpu == record
    assert gpu.needs_gpu(again.gpu)


# --- the restore side ---------------------------------------------------------------------


@pytest.fixture
def restored(tmp_path: Path) -> Path:
    """The restored tree: new host pids 500..503, same namespace pids 1..4."""
    for host, inner in ((500, 1), (501, 2), (502, 3), (503, 4)):
        make_proc(tmp_path, host, nspid=[host, inner])
    return tmp_path


RECORD = {"backend": "cuda-driver", "pids": [101, 103], "ns_pids": [2, 4]}
NEW_TREE = [500, 501, 502, 503]


def test_restore_maps_namespace_pids_and_orders_calls(restored: Path) -> None:
    backend = FakeBackend({501: "checkpointed", 503: "checkpointed"})
    result = gpu.restore_tree(RECORD, NEW_TREE, backend, proc_root=restored)  # type: ignore[arg-type]
    assert backend.ops() == [("restore", 501), ("restore", 503), ("unlock", 501), ("unlock", 503)]
    assert backend.states == {501: "running", 503: "running"}
    assert result["pids"] == [501, 503]
    assert result["ns_pids"] == [2, 4]
    assert "gpu_restore_s" in result


def test_restore_leaves_what_criu_plugin_resumed(restored: Path) -> None:
    backend = FakeBackend({501: "running", 503: "checkpointed"})
    result = gpu.restore_tree(RECORD, NEW_TREE, backend, proc_root=restored)  # type: ignore[arg-type]
    assert backend.ops() == [("restore", 503), ("unlock", 503)]
    assert result["already_running"] == [501]


def test_restore_missing_process(restored: Path) -> None:
    backend = FakeBackend({501: "checkpointed"})
    with pytest.raises(GpuError, match=r"CUDA processes 4 .*not in the restored tree"):
        gpu.restore_tree(RECORD, [500, 501, 502], backend, proc_root=restored)  # type: ignore[arg-type]
    assert backend.ops() == []


def test_restore_driver_failure(restored: Path) -> None:
    backend = FakeBackend({501: "checkpointed", 503: "checkpointed"})
    backend.fail("restore", 503, "CUDA_ERROR_NO_DEVICE")
    with pytest.raises(GpuError, match=r"Restore\(pid 503\) failed: CUDA_ERROR_NO_DEVICE"):
        gpu.restore_tree(RECORD, NEW_TREE, backend, proc_root=restored)  # type: ignore[arg-type]


def test_restore_deadline(restored: Path) -> None:
    clock = FakeClock()
    backend = FakeBackend({501: "checkpointed", 503: "checkpointed"}, clock=clock, cost=1.0)
    with pytest.raises(MaxWaitExceeded, match="GPU restore"):
        gpu.restore_tree(
            RECORD,
            NEW_TREE,
            backend,  # type: ignore[arg-type]
            deadline=Deadline.after(1.5, clock=clock),
            proc_root=restored,
            clock=clock,
        )


def test_restore_without_bindings_is_refused_before_anything(restored: Path) -> None:
    backend = FakeBackend({}, available=False)
    with pytest.raises(GpuError, match=r"holds GPU state.*install ccr\[gpu\]"):
        gpu.check_restorable(RECORD, backend)  # type: ignore[arg-type]
    with pytest.raises(GpuError, match=r"install ccr\[gpu\]"):
        gpu.restore_tree(RECORD, NEW_TREE, backend, proc_root=restored)  # type: ignore[arg-type]
    assert backend.calls == []


def test_restore_of_a_cpu_checkpoint_is_a_no_op() -> None:
    backend = FakeBackend({}, available=False)
    assert gpu.restore_tree({}, [1], backend) == {}  # type: ignore[arg-type]
    gpu.check_restorable({}, backend)  # type: ignore[arg-type]


# --- the driver backend, against stand-ins for cuda.bindings.driver ------------------------


def test_driver_backend_without_cuda_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    backend = DriverCheckpointer()
    assert backend.available() is False
    assert "cuda-bindings is not installed" in backend.unavailable_reason()
    with pytest.raises(GpuError, match=r"install ccr\[gpu\]") as info:
        backend.lock(1, 0)
    assert "\n" not in str(info.value)


class _CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_ILLEGAL_STATE = 401


class _CUprocessState(enum.IntEnum):
    CU_PROCESS_STATE_RUNNING = 0
    CU_PROCESS_STATE_LOCKED = 1
    CU_PROCESS_STATE_CHECKPOINTED = 2
    CU_PROCESS_STATE_FAILED = 3


class _LockArgs:
    timeoutMs = 0


def _fake_driver(version: int = 13000) -> tuple[types.ModuleType, list[tuple[object, ...]]]:
    calls: list[tuple[object, ...]] = []
    mod = types.ModuleType("cuda.bindings.driver")
    mod.CUresult = _CUresult  # type: ignore[attr-defined]
    mod.CUprocessState = _CUprocessState  # type: ignore[attr-defined]
    mod.CUcheckpointLockArgs = _LockArgs  # type: ignore[attr-defined]
    mod.cuDriverGetVersion = lambda: (_CUresult.CUDA_SUCCESS, version)  # type: ignore[attr-defined]

    def lock(pid: int, args: _LockArgs | None) -> tuple[_CUresult]:
        calls.append(("lock", pid, args.timeoutMs if args else None))
        return (_CUresult.CUDA_ERROR_NOT_READY if pid == 13 else _CUresult.CUDA_SUCCESS,)

    def simple(name: str):  # type: ignore[no-untyped-def]
        def call(pid: int, args: object) -> tuple[_CUresult]:
            calls.append((name, pid, args))
            if pid == 66:
                raise RuntimeError("driver\nwent away")
            return (_CUresult.CUDA_ERROR_ILLEGAL_STATE if pid == 7 else _CUresult.CUDA_SUCCESS,)

        return call

    def get_state(pid: int) -> tuple[_CUresult, _CUprocessState | None]:
        calls.append(("state", pid))
        if pid == 9:
            return (_CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (_CUresult.CUDA_SUCCESS, _CUprocessState.CU_PROCESS_STATE_CHECKPOINTED)

    mod.cuCheckpointProcessLock = lock  # type: ignore[attr-defined]
    mod.cuCheckpointProcessCheckpoint = simple("checkpoint")  # type: ignore[attr-defined]
    mod.cuCheckpointProcessRestore = simple("restore")  # type: ignore[attr-defined]
    mod.cuCheckpointProcessUnlock = simple("unlock")  # type: ignore[attr-defined]
    mod.cuCheckpointProcessGetState = get_state  # type: ignore[attr-defined]
    return mod, calls


def _install(monkeypatch: pytest.MonkeyPatch, mod: types.ModuleType) -> None:
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = mod  # type: ignore[attr-defined]
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", mod)


def test_driver_backend_calls_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, calls = _fake_driver()
    _install(monkeypatch, mod)
    backend = DriverCheckpointer()
    assert backend.available() and backend.unavailable_reason() == ""
    assert backend.driver_version == 13000
    backend.lock(5, 2500)
    backend.checkpoint(5)
    backend.restore(5)
    backend.unlock(5)
    assert backend.state(5) == "checkpointed"
    assert calls == [
        ("lock", 5, 2500),
        ("checkpoint", 5, None),
        ("restore", 5, None),
        ("unlock", 5, None),
        ("state", 5),
    ]
    with pytest.raises(CudaCallError) as info:
        backend.lock(13, 10)
    assert str(info.value) == "cuCheckpointProcessLock(pid 13) failed: CUDA_ERROR_NOT_READY"
    assert info.value.result == "CUDA_ERROR_NOT_READY" and info.value.pid == 13
    assert isinstance(info.value, GpuError)
    with pytest.raises(GpuError, match=r"Unlock\(pid 7\) failed: CUDA_ERROR_ILLEGAL_STATE"):
        backend.unlock(7)
    with pytest.raises(GpuError, match=r"GetState\(pid 9\) failed: CUDA_ERROR_INVALID_VALUE"):
        backend.state(9)
    with pytest.raises(GpuError, match=r"Restore\(pid 66\) failed: RuntimeError: driver went"):
        backend.restore(66)


def test_driver_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, _ = _fake_driver(version=12040)
    _install(monkeypatch, mod)
    backend = DriverCheckpointer()
    assert backend.available() is False
    assert "CUDA 12.4 only" in backend.unavailable_reason()


def test_driver_library_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, _ = _fake_driver()

    def no_libcuda() -> tuple[object, int]:
        raise OSError('"cuda" is an NVIDIA driver library and can only be found via system search')

    mod.cuDriverGetVersion = no_libcuda  # type: ignore[attr-defined]
    _install(monkeypatch, mod)
    backend = DriverCheckpointer()
    assert backend.available() is False
    assert backend.unavailable_reason().startswith("no NVIDIA driver: OSError")
    with pytest.raises(GpuError, match=r"no NVIDIA driver.*install ccr\[gpu\]"):
        backend.state(1)


def test_sequence_with_driver_backend_and_no_bindings(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    seq = GpuSequence(DriverCheckpointer(), proc_root=tree)
    with pytest.raises(GpuError, match=r"use the GPU but.*install ccr\[gpu\]"):
        seq.checkpoint(PIDS)
