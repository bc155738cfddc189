"""`python tests/fake_gpu_node.py ARGS` = `python -m ccr ARGS` with test_gpu's fake CUDA driver.

Every process of a dumped tree but its init passes for a CUDA process (a fake /proc gives
each an open /dev/nvidia0) known to test_gpu.FakeBackend, so the GPU sequence of a dump
really locks and checkpoints them in the fake driver; nothing else changes.  At exit the
driver's states and calls go to $CCR_TEST_GPU_LOG/<node>-<pid>.json for the test to read.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from test_gpu import FakeBackend, make_proc  # noqa: E402

from ccr.engines import gpu  # noqa: E402

BACKEND = FakeBackend({})
PROC_ROOT = Path(tempfile.mkdtemp(prefix="ccr-fake-proc-"))


class FakeGpuSequence(gpu.GpuSequence):
    def __init__(self, backend: Any = None, **kw: Any) -> None:
        kw.update(proc_root=PROC_ROOT, cont=lambda pid: None)
        super().__init__(BACKEND, **kw)  # type: ignore[arg-type]

    def checkpoint(self, pids: Iterable[int]) -> list[int]:
        pids = list(pids)
        for pid in pids[1:]:
            if not (PROC_ROOT / str(pid)).exists():
                make_proc(PROC_ROOT, pid, fds={"5": "/dev/nvidia0"})
            BACKEND.states.setdefault(pid, "running")
        return super().checkpoint(pids)


def _report() -> None:
    log = os.environ.get("CCR_TEST_GPU_LOG")
    if not log:
        return
    node = os.environ.get("SLURMD_NODENAME", "local")
    data = {"states": {str(p): s for p, s in BACKEND.states.items()}, "ops": BACKEND.ops()}
    (Path(log) / f"{node}-{os.getpid()}.json").write_text(json.dumps(data))


gpu.GpuSequence = FakeGpuSequence  # type: ignore[misc]
atexit.register(_report)

if __name__ == "__main__":
    from ccr.cli import main

    main(sys.argv[1:])
