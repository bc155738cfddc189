"""The things every controller operation needs: state dir, registry, CRIU, manifest key."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ccr import config, identity
from ccr.deadline import Deadline
from ccr.locking import exclusive_lock
from ccr.storage.registry import Registry

if TYPE_CHECKING:
    from ccr.engines.criu import Criu


# What CRIU says of itself on this node (version, `criu check`, features), learned once.
CRIU_FACTS = "criu-facts.json"


@dataclass
class Runtime:
    """Where state lives and which CRIU to use, resolved once per command."""

    state_dir: Path

    @classmethod
    def from_env(cls) -> Runtime:
        return cls(config.state_dir())

    def registry(self) -> Registry:
        return Registry.open(self.state_dir)

    def image_dir(self, job_id: int, given: Path | None = None) -> Path:
        """Where job_id's checkpoints are (layout.default_image_dir, with its registry record)."""
        if given is not None:
            return given
        # Imported here: the layout pulls in manifests and the image set (21 ms of `ccr
        # --version`'s import time), which read-only commands never use.
        from ccr.storage.layout import default_image_dir

        with self.registry() as db:
            return default_image_dir(db.find_job(job_id))

    def criu(self) -> Criu:
        # Imported here: read-only commands (list, status) never load CRIU's protobufs.
        from ccr.engines.criu import Criu

        return Criu(config.criu_binary(), facts_file=self.state_dir / CRIU_FACTS)

    def manifest_key(self, create: bool) -> bytes | None:
        from ccr.storage.manifest import ManifestKey

        with identity.privileged():  # the service's key: users never read it
            return ManifestKey(config.key_file(self.state_dir)).load(create)

    def work_dir(self, what: str) -> Path:
        """A fresh directory under logs/ for one CRIU action's log and statistics."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        base = config.logs_dir()
        for n in range(1000):
            path = base / f"{what}-{stamp}-{os.getpid()}-{n}"
            try:
                with identity.privileged():
                    path.mkdir(mode=0o700)
                # Inside the root-only logs dir, so no user reaches it: the caller's, so that
                # ccr, acting with the caller's credentials, writes its notes there.
                identity.give_to_caller(path)
                return path
            except FileExistsError:
                continue
        raise RuntimeError("cannot create a log directory")  # pragma: no cover

    @contextmanager
    def job_lock(self, job_id: int, deadline: Deadline) -> Iterator[None]:
        """Serialize checkpoints of one job; wait for the lock until deadline."""
        locks = self.state_dir / "locks"
        busy = f"another checkpoint of job {job_id} is still running"
        with identity.privileged():
            locks.mkdir(exist_ok=True, mode=0o700)
            lock = exclusive_lock(locks / f"job-{job_id}.lock", deadline, busy)
            lock.__enter__()
        try:
            yield
        finally:
            lock.__exit__(None, None, None)
