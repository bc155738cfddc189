"""The job registry: jobs, steps and checkpoints in SQLite under the state directory."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr import identity
from ccr.errors import NotFoundError, PermissionDeniedError, StorageError
from ccr.ids import StepId

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    checkpoint_dir TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    ckpt_began REAL,
    last_error TEXT,
    last_error_code INTEGER NOT NULL DEFAULT 0,
    interval_s INTEGER NOT NULL DEFAULT 0,
    keep INTEGER NOT NULL DEFAULT 2,
    restart_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS steps (
    job_id INTEGER NOT NULL,
    step_id INTEGER NOT NULL,
    argv TEXT NOT NULL,
    cwd TEXT NOT NULL,
    output TEXT NOT NULL,
    state TEXT NOT NULL,
    init_pid INTEGER,
    init_start INTEGER,
    supervisor_pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    next_checkpoint REAL,
    PRIMARY KEY (job_id, step_id)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    step_id INTEGER,
    path TEXT NOT NULL,
    created REAL NOT NULL,
    stored_bytes INTEGER NOT NULL,
    image_bytes INTEGER NOT NULL,
    frozen_time REAL NOT NULL,
    total_time REAL NOT NULL
);
"""

# Columns added after the first release (Slurm task placement), by Registry._migrate.
STEP_COLUMNS = {
    "rank": "INTEGER",
    "node": "TEXT",
    "ntasks": "INTEGER NOT NULL DEFAULT 1",
    "nnodes": "INTEGER NOT NULL DEFAULT 1",
    # stderr's own file (-e), and how far a foreground `ccr run` relayed each file.
    "error": "TEXT",
    "out_offset": "INTEGER",
    "err_offset": "INTEGER",
}

# Columns of jobs added later: the uid that launched the job (NULL: root, or a registry made
# before the node service), by Registry._migrate.
JOB_COLUMNS = {"owner": "INTEGER"}

# Step states.  `vacating` marks a step whose tree is about to be killed by a checkpoint,
# so its supervisor records the exit as a vacate, not a failure.
RUNNING, COMPLETED, FAILED, CANCELLED, VACATING, VACATED, LOST = (
    "running",
    "completed",
    "failed",
    "cancelled",
    "vacating",
    "vacated",
    "lost",
)


@dataclass
class StepRecord:
    """One step as the registry knows it."""

    job_id: int
    step_id: int
    argv: list[str]
    cwd: str
    output: str
    state: str
    init_pid: int | None
    init_start: int | None
    supervisor_pid: int | None
    started: float
    ended: float | None = None
    exit_code: int | None = None
    next_checkpoint: float | None = None
    rank: int | None = None  # SLURM_PROCID of this task (None: not a Slurm step task)
    node: str | None = None  # the node it runs on
    ntasks: int = 1  # tasks of the whole step, on every node
    nnodes: int = 1
    error: str | None = None  # stderr's file; None: with stdout in `output`
    out_offset: int | None = None  # bytes of output already relayed to a terminal
    err_offset: int | None = None

    @property
    def id(self) -> StepId:
        return StepId(self.job_id, self.step_id)


@dataclass
class CheckpointRecord:
    """One published checkpoint (a generation directory)."""

    job_id: int
    step_id: int | None
    path: str
    created: float
    stored_bytes: int
    image_bytes: int
    frozen_time: float
    total_time: float


@dataclass
class JobRecord:
    """One job and its checkpoint settings."""

    job_id: int
    created: float
    checkpoint_dir: str
    disabled: int = 0
    ckpt_began: float | None = None
    last_error: str | None = None
    last_error_code: int = 0
    interval_s: int = 0
    keep: int = 2
    restart_count: int = 0
    owner: int | None = None
    steps: list[StepRecord] = field(default_factory=list)


class Registry:
    """A connection to the registry database; use as a context manager per operation."""

    # Registry files (path, device, inode) whose schema this process has already checked: a
    # `ccr create` opens the registry a dozen times, and the schema script, migration and
    # WAL switch each cost a write transaction; once per process and file is enough.
    _prepared: set[tuple[str, int, int]] = set()
    # One idle connection per registry file, open until the process forks or ends.  While
    # it is, closing an operation's connection is not closing the last one, which SQLite
    # follows with a WAL checkpoint (an fsync) and the removal of the -wal and -shm files
    # that the next operation makes again: 10 registry operations of a `ccr create` took
    # 120 ms so against 210-270 ms (a busy node).  Closed before any fork (_drop_keepers):
    # SQLite breaks in a child that inherited an open connection to the file it opens.
    _keepers: dict[tuple[str, int, int], sqlite3.Connection] = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        # The registry is the service's own file: root's credentials while it is open.
        self._privileged = identity.privileged()
        self._privileged.__enter__()
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            st = os.stat(path)
            key = (str(path), st.st_dev, st.st_ino)
            if key not in Registry._prepared:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                self._migrate()
                path.chmod(0o600)
                Registry._prepared.add(key)
            if key not in Registry._keepers:
                keeper = sqlite3.connect(path, timeout=30, isolation_level=None)
                keeper.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()  # maps the WAL index
                Registry._keepers[key] = keeper
        except (sqlite3.Error, OSError) as exc:
            self._privileged.__exit__(None, None, None)
            raise StorageError(f"cannot open job registry {path}: {exc}") from None

    def _migrate(self) -> None:
        """Add the columns newer ccr versions use to an older registry (idempotent, racy-safe)."""
        for table, columns in (("steps", STEP_COLUMNS), ("jobs", JOB_COLUMNS)):
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column, decl in columns.items():
                if column not in have:
                    try:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    except sqlite3.OperationalError as exc:
                        if "duplicate column" not in str(exc):
                            raise

    def _own(self, job_id: int) -> None:
        """Refuse (exit 9) a caller other than root acting on a job another uid launched."""
        uid = identity.caller_uid()
        if uid == 0:
            return
        row = self.db.execute("SELECT owner FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None and (row[0] or 0) != uid:
            raise PermissionDeniedError(f"job {job_id} belongs to another user")

    @staticmethod
    def _drop_keepers() -> None:
        keepers = list(Registry._keepers.values())
        Registry._keepers.clear()
        for keeper in keepers:
            try:
                keeper.close()
            except sqlite3.Error:
                pass

    @classmethod
    def open(cls, state_dir: Path) -> Registry:
        return cls(state_dir / "registry.db")

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.db.close()
        finally:
            self._privileged.__exit__(None, None, None)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # jobs -----------------------------------------------------------------------------
    def allocate_job_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(job_id), 0) + 1 FROM jobs").fetchone()
        return int(row[0])

    def ensure_job(self, job_id: int, default_dir: str, **settings: Any) -> JobRecord:
        """Create the job if it is new (with default_dir), then apply settings."""
        self._own(job_id)
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, created, checkpoint_dir, owner) "
                "VALUES (?, ?, ?, ?)",
                (job_id, time.time(), default_dir, identity.caller_uid() or None),
            )
            if settings:
                self._update_job(db, job_id, settings)
        return self.job(job_id)

    def update_job(self, job_id: int, **values: Any) -> None:
        self._own(job_id)
        with self.transaction() as db:
            self._update_job(db, job_id, values)

    @staticmethod
    def _update_job(db: sqlite3.Connection, job_id: int, values: dict[str, Any]) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE jobs SET {cols} WHERE job_id = ?", (*values.values(), job_id))

    def adjust_disabled(self, job_id: int, delta: int) -> int:
        self._own(job_id)
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET disabled = MAX(0, disabled + ?) WHERE job_id = ?", (delta, job_id)
            )
        return self.job(job_id).disabled

    def find_job(self, job_id: int) -> JobRecord | None:
        self._own(job_id)
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = JobRecord(**dict(row))
        job.steps = self.steps(job_id)
        return job

    def job(self, job_id: int) -> JobRecord:
        job = self.find_job(job_id)
        if job is None:
            raise NotFoundError(f"unknown job {job_id}")
        return job

    def jobs(self) -> list[JobRecord]:
        uid = identity.caller_uid()
        rows = self.db.execute("SELECT job_id, owner FROM jobs ORDER BY job_id").fetchall()
        # A user other than root lists only the jobs they launched.
        return [self.job(r[0]) for r in rows if uid == 0 or (r[1] or 0) == uid]

    # steps ----------------------------------------------------------------------------
    def next_step_id(self, job_id: int) -> int:
        self._own(job_id)
        row = self.db.execute(
            "SELECT COALESCE(MAX(step_id) + 1, 0) FROM steps WHERE job_id = ?", (job_id,)
        ).fetchone()
        return int(row[0])

    def put_step(self, step: StepRecord) -> None:
        self._own(step.job_id)
        data = dict(step.__dict__)
        data["argv"] = json.dumps(step.argv)
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO steps ({cols}) VALUES ({marks})", tuple(data.values())
            )

    def delete_step(self, step: StepId) -> None:
        self._own(step.job_id)
        with self.transaction() as db:
            db.execute(
                "DELETE FROM steps WHERE job_id = ? AND step_id = ?", (step.job_id, step.step_id)
            )

    def update_step(self, step: StepId, **values: Any) -> None:
        self._own(step.job_id)
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(
                f"UPDATE steps SET {cols} WHERE job_id = ? AND step_id = ?",
                (*values.values(), step.job_id, step.step_id),
            )

    def update_step_if_owner(self, step: StepId, init_pid: int, **values: Any) -> None:
        """update_step, only while the step still runs the tree rooted at init_pid."""
        self._own(step.job_id)
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(
                f"UPDATE steps SET {cols} WHERE job_id = ? AND step_id = ? AND init_pid = ?",
                (*values.values(), step.job_id, step.step_id, init_pid),
            )

    def bump_restart_count(self, job_id: int) -> None:
        self._own(job_id)
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET restart_count = restart_count + 1 WHERE job_id = ?", (job_id,)
            )

    def compare_and_set_state(self, step: StepId, expected: tuple[str, ...], new: str) -> bool:
        self._own(step.job_id)
        marks = ", ".join("?" for _ in expected)
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE steps SET state = ? WHERE job_id = ? AND step_id = ? "
                f"AND state IN ({marks})",
                (new, step.job_id, step.step_id, *expected),
            )
            return cur.rowcount == 1

    def find_step(self, step: StepId) -> StepRecord | None:
        self._own(step.job_id)
        row = self.db.execute(
            "SELECT * FROM steps WHERE job_id = ? AND step_id = ?", (step.job_id, step.step_id)
        ).fetchone()
        return None if row is None else _step(row)

    def step(self, step: StepId) -> StepRecord:
        rec = self.find_step(step)
        if rec is None:
            raise NotFoundError(f"unknown step {step}")
        return rec

    def steps(self, job_id: int) -> list[StepRecord]:
        self._own(job_id)
        rows = self.db.execute(
            "SELECT * FROM steps WHERE job_id = ? ORDER BY step_id", (job_id,)
        ).fetchall()
        return [_step(r) for r in rows]

    # checkpoints ----------------------------------------------------------------------
    def add_checkpoint(self, ckpt: CheckpointRecord) -> None:
        self._own(ckpt.job_id)
        data = dict(ckpt.__dict__)
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self.transaction() as db:
            db.execute(f"INSERT INTO checkpoints ({cols}) VALUES ({marks})", tuple(data.values()))

    def checkpoints(self, job_id: int) -> list[CheckpointRecord]:
        self._own(job_id)
        rows = self.db.execute(
            "SELECT job_id, step_id, path, created, stored_bytes, image_bytes, frozen_time, "
            "total_time FROM checkpoints WHERE job_id = ? ORDER BY created",
            (job_id,),
        ).fetchall()
        return [CheckpointRecord(**dict(r)) for r in rows]


def _step(row: sqlite3.Row) -> StepRecord:
    data = dict(row)
    data["argv"] = json.loads(data["argv"])
    return StepRecord(**data)


os.register_at_fork(before=Registry._drop_keepers)
