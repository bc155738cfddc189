"""One node's part of a multi-node checkpoint (`ccr _node-checkpoint`, run by the coordinator).

The node dumps its tasks with checkpoint.run_checkpoint, as a one-node job's checkpoint is
taken, into its rank directories of the coordinator's staging directory; the pending
checkpoint is committed or aborted on the coordinator's word (controller/coordinator.py).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

from ccr.controller import checkpoint as ckpt
from ccr.controller.runtime import Runtime
from ccr.deadline import Deadline
from ccr.engines import slurm_cli
from ccr.engines.compression import Codec
from ccr.errors import (
    CcrError,
    JobStateError,
    MaxWaitExceeded,
    error_for_code,
    exit_code_for,
)
from ccr.ids import (
    JobRef,
)
from ccr.storage import layout
from ccr.storage import registry as reg
from ccr.storage.imageset import (
    discard,
    make_private_dir,
    prepare_image_dir,
)

REPORT = "ccr-node-report "
DECISION_WAIT = 300.0  # how long a node waits for commit/abort without a MaxWait


def node_checkpoint(
    rt: Runtime,
    ref: JobRef,
    staging_name: str,
    image_dir: Path | None,
    stop: bool,
    max_wait: float | None,
    codec: Codec,
    mkdir: bool = False,
    keep: int | None = None,
    tcp_established: bool = False,
) -> int:
    """`ccr _node-checkpoint`: dump this node's tasks of ref, report, then commit or roll back.

    The dump is checkpoint.run_checkpoint's, as for a job on one node ("Began at", last
    error, the job's keep, GPU rollback); only the decision is the coordinator's.
    """
    node = slurm_cli.node_name()
    deadline = Deadline.after(max_wait)  # the dump's and the wait for the decision
    with rt.registry() as db:
        job = db.find_job(ref.job_id)
        steps = (
            []
            if job is None
            else [s for s in job.steps if ckpt.is_live(s) and ref.step_id in (None, s.step_id)]
        )
    if job is None or not steps:
        _emit({"ok": True, "node": node, "tasks": [], "image_dir": None})
        _decision(deadline)
        return 0
    if job.disabled:
        code = JobStateError.exit_code
        _emit({"ok": False, "node": node, "error": "checkpoints are disabled", "code": code})
        return code
    opts = ckpt.CheckpointOptions(
        image_dir=image_dir,
        max_wait=max_wait,
        stop=stop,
        keep=keep,
        codec=codec,
        mkdir=mkdir,
        tcp_established=tcp_established,
    )
    base = layout.default_image_dir(job, image_dir)
    staging = NodeStaging(ref, node, base, staging_name, mkdir, deadline)
    try:
        ckpt.run_checkpoint(rt, ref, job, steps, opts, staging, deadline)
    except CcrError as exc:
        if staging.reported:  # the coordinator said abort (or nothing): all rolled back
            print(f"ccr: {node}: checkpoint of {ref} rolled back ({exc})")
            return 0
        _emit({"ok": False, "node": node, "error": str(exc), "code": exit_code_for(exc)})
        return exit_code_for(exc)
    return 0


class NodeStaging:
    """This node's share of a multi-node checkpoint: `<staging>/[<stepid>/]<rank>/` in the
    shared image directory; the coordinator publishes the whole staging directory."""

    def __init__(
        self,
        ref: JobRef,
        node: str,
        image_dir: Path,
        staging_name: str,
        mkdir: bool,
        deadline: Deadline,
    ) -> None:
        self.ref = ref
        self.node = node
        self.image_dir = image_dir
        self.staging_name = staging_name
        self.mkdir = mkdir
        self.deadline = deadline
        self.base: Path | None = None
        self.made: list[Path] = []
        self.reported = False

    def dir_for(self, step: reg.StepRecord) -> Path:
        if self.base is None:
            self.base = prepare_image_dir(self.image_dir, mkdir=self.mkdir)
        rank_dir = self.base / self.staging_name
        make_private_dir(rank_dir)  # 0700 at every level, whatever the umask
        if self.ref.step_id is None:
            rank_dir = rank_dir / str(step.step_id)
            make_private_dir(rank_dir)
        rank_dir = rank_dir / str(step.rank if step.rank is not None else 0)
        make_private_dir(rank_dir)
        self.made.append(rank_dir)
        return rank_dir

    def remove(self) -> None:
        for path in self.made:
            discard(path)

    def decide(self, pending: ckpt.PendingCheckpoint) -> Path:
        """Report what this node dumped; the coordinator's word: published where, or why not."""
        tasks = [
            {
                "step": step.step_id,
                "rank": step.rank if step.rank is not None else 0,
                "ntasks": step.ntasks,
                "node": self.node,
                "frozen": m.frozen_time,
                "image_bytes": m.image_bytes,
                "stored_bytes": m.stored_bytes,
            }
            for step, m in pending.dumped
        ]
        _emit({"ok": True, "node": self.node, "tasks": tasks, "image_dir": str(self.base)})
        self.reported = True
        decision = _decision(self.deadline)
        verb, _, rest = decision.partition(" ")
        if verb == "commit" and rest:
            return Path(rest)
        if verb == "abort" and rest:
            code, _, message = rest.partition(" ")
            if code.isdigit() and message:
                raise error_for_code(int(code), message)
        raise CcrError(
            f"checkpoint of {self.ref}: the coordinator sent {decision!r}"
            if decision
            else f"checkpoint of {self.ref}: no decision from the coordinator in time"
        )

    def abandoned(self, exc: MaxWaitExceeded) -> MaxWaitExceeded:
        return exc  # the coordinator says what it means for the whole job


def abort_line(exc: BaseException) -> str:
    """The decision that aborts a multi-node checkpoint, with why (each node records it)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"abort {exit_code_for(exc)} {message}"


def _emit(report: dict[str, Any]) -> None:
    sys.stdout.write(REPORT + json.dumps(report) + "\n")
    sys.stdout.flush()


def _decision(deadline: Deadline) -> str:
    """The coordinator's line on stdin; "" on EOF or when it does not come in time."""
    limit = time.monotonic() + DECISION_WAIT
    left = deadline.remaining()
    if left is not None:
        limit = min(limit, time.monotonic() + left + 30.0)
    data = b""
    while b"\n" not in data:
        wait = limit - time.monotonic()
        if wait <= 0:
            return ""
        ready, _, _ = select.select([0], [], [], wait)
        if not ready:
            return ""
        chunk = os.read(0, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0].strip()
