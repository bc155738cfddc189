"""The multi-node coordinator's decisions, with fake nodes instead of srun (no CRIU, no Slurm).

A fake launcher plays the nodes: it makes their rank directories in the staging directory
the coordinator named and answers with the reports the test wrote; what the coordinator
then sends on their stdin (commit PATH, or abort CODE WHY) is what the test checks, with
what it published and what it left on disk.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ccr.controller import checkpoint as ckpt
from ccr.controller import coordinator as coord
from ccr.controller import node_participant as node
from ccr.controller.runtime import Runtime
from ccr.engines.compression import parse_codec
from ccr.errors import CcrError, CriuError, JobStateError, MaxWaitExceeded, PermissionDeniedError
from ccr.ids import JobRef
from ccr.storage.imageset import CheckpointSeries

JOB = 71500


class _Stdin(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.sent = ""

    def close(self) -> None:
        self.sent = self.getvalue()
        super().close()


class _Blocking:
    """A node's stdout that says its lines, then never ends (a node that hangs)."""

    def __init__(self, lines: list[str], release: threading.Event) -> None:
        self.lines = lines
        self.release = release

    def __iter__(self) -> Iterator[str]:
        yield from self.lines
        self.release.wait(10)


@dataclass
class FakeNodes:
    """Reports per node: a dict (the report), or None (a node that never answers)."""

    image_dir: Path
    reports: dict[str, dict[str, Any] | None]
    commands: list[list[str]] = field(default_factory=list)
    stdin: _Stdin = field(default_factory=_Stdin)
    release: threading.Event = field(default_factory=threading.Event)
    silent: set[str] = field(default_factory=set)  # nodes srun never started (no report)
    stderr: str = ""  # what srun said

    def nodes_of(self, job_id: int) -> list[str]:
        return list(self.reports)

    def launch(self, job_id: int, nodes: list[str], command: list[str]) -> Any:
        self.commands.append(command)
        staging = command[command.index("--staging") + 1]
        lines = []
        for name, report in self.reports.items():
            if report is None or name in self.silent:
                continue
            for task in report.get("tasks", []):
                rank_dir = self.image_dir / staging / str(task["step"]) / str(task["rank"])
                rank_dir.mkdir(parents=True, exist_ok=True)
                (rank_dir / "manifest.json").write_text("{}")
            lines.append(node.REPORT + json.dumps(report) + "\n")
        stdout: Any = (
            _Blocking(lines, self.release)
            if None in self.reports.values()
            else io.StringIO("".join(lines))
        )
        proc = type("P", (), {})()
        proc.stdin, proc.stdout, proc.stderr = self.stdin, stdout, io.StringIO(self.stderr)
        proc.wait = lambda timeout=None: 0
        proc.kill = lambda: None
        return proc

    def staging_left(self) -> list[str]:
        return sorted(p.name for p in self.image_dir.iterdir() if ".dist-" in p.name)


def task(node: str, rank: int, ntasks: int = 2) -> dict[str, Any]:
    return {"step": 0, "rank": rank, "ntasks": ntasks, "node": node, "frozen": 0.1,
            "image_bytes": 100, "stored_bytes": 50}  # fmt: skip


def ok(node: str, image_dir: Path, *tasks: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "node": node, "tasks": list(tasks), "image_dir": str(image_dir)}


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("CCR_KEY_FILE", str(tmp_path / "key"))
    state = tmp_path / "state"
    state.mkdir()
    return Runtime(state)


def run(rt: Runtime, fake: FakeNodes, **kw: Any) -> ckpt.CheckpointResult:
    opts = ckpt.CheckpointOptions(image_dir=fake.image_dir, codec=parse_codec("none"), **kw)
    return coord.create(rt, JobRef(JOB), opts, nodes_of=fake.nodes_of, launch=fake.launch)


def test_all_nodes_ok_publishes_and_commits(rt: Runtime, tmp_path: Path) -> None:
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0)), "n2": ok("n2", d, task("n2", 1))})
    result = run(rt, fake)
    newest = CheckpointSeries(d, f"{JOB}.ckpt").newest()
    assert newest is not None and result.path == newest.path
    assert fake.stdin.sent == f"commit {newest.path}\n"
    manifest = json.loads((newest.path / "job.json").read_text())
    assert manifest["ranks"] == {"0": {"0": "n1", "1": "n2"}}
    assert result.image_bytes == 200 and result.stored_bytes == 100
    assert fake.staging_left() == []


def test_keep_and_tcp_reach_the_nodes(rt: Runtime, tmp_path: Path) -> None:
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0, ntasks=1))})
    run(rt, fake, keep=5, tcp_established=True)
    command = fake.commands[0]
    assert command[command.index("--keep") + 1] == "5" and "--tcp-established" in command
    fake2 = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0, ntasks=1))})
    run(rt, fake2, tcp_established=False)
    assert "--keep" not in fake2.commands[0]  # the nodes apply the job's own keep


def test_a_failed_node_aborts_everyone_with_its_reason(rt: Runtime, tmp_path: Path) -> None:
    d = tmp_path
    failed = {"ok": False, "node": "n2", "error": "CRIU dump failed", "code": CriuError.exit_code}
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0)), "n2": failed})
    with pytest.raises(CriuError) as err:
        run(rt, fake)
    assert "failed on n2: CRIU dump failed" in str(err.value)
    verb, code, why = fake.stdin.sent.rstrip("\n").split(" ", 2)
    assert (verb, int(code)) == ("abort", CriuError.exit_code)
    assert "n2" in why and "\n" not in why
    assert fake.staging_left() == [] and CheckpointSeries(d, f"{JOB}.ckpt").newest() is None


def test_a_missing_rank_is_not_published(rt: Runtime, tmp_path: Path) -> None:
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0)), "n2": ok("n2", d)})
    with pytest.raises(JobStateError, match=r"ranks \[1\]"):
        run(rt, fake)
    assert fake.stdin.sent.startswith(f"abort {JobStateError.exit_code} ")
    assert fake.staging_left() == []


def test_a_silent_node_runs_into_maxwait(rt: Runtime, tmp_path: Path) -> None:
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0)), "n2": None})
    try:
        with pytest.raises(MaxWaitExceeded, match="no answer from n2"):
            run(rt, fake, max_wait=0.5)
    finally:
        fake.release.set()
    assert fake.stdin.sent.startswith(f"abort {MaxWaitExceeded.exit_code} ")
    assert fake.staging_left() == []


@pytest.mark.parametrize(
    ("line", "published", "error"),
    [
        ("commit /x/42.ckpt.3", "/x/42.ckpt.3", None),
        ("abort 5 checkpoint of 42 failed on n2: boom", None, CriuError),
        ("abort", None, Exception),
        ("", None, Exception),
    ],
)
def test_a_node_reads_the_decision(
    line: str, published: str | None, error: type[Exception] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "_decision", lambda deadline: line)
    monkeypatch.setattr(node, "_emit", lambda report: None)
    staging = node.NodeStaging(JobRef(42), "n1", Path("/x"), ".s", False, None)
    pending: Any = type("P", (), {"dumped": []})()
    if error is None:
        assert staging.decide(pending) == Path(str(published))
    else:
        with pytest.raises(error) as exc:
            staging.decide(pending)
        if line.startswith("abort 5"):
            assert str(exc.value) == "checkpoint of 42 failed on n2: boom"
    assert staging.reported


def test_abort_line_is_one_line_with_the_code() -> None:
    line = node.abort_line(JobStateError("two\nlines"))
    assert line == f"abort {JobStateError.exit_code} two lines"
    assert node.abort_line(KeyboardInterrupt()).startswith("abort ")


def test_registry_is_untouched_by_the_coordinator(rt: Runtime, tmp_path: Path) -> None:
    """The job's bookkeeping is its nodes' (each commits or aborts in run_checkpoint)."""
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0, ntasks=1))})
    run(rt, fake)
    with rt.registry() as db:
        assert db.find_job(JOB) is None


@pytest.mark.parametrize(
    "said, expected",
    [
        ("srun: error: Unable to create step for job 71500: Access/permission denied\n",
         PermissionDeniedError),
        ("srun: error: node n2 unreachable\n", CcrError),
    ],
)  # fmt: skip
def test_srun_refused_by_slurm_is_a_permission_error(
    rt: Runtime, tmp_path: Path, said: str, expected: type[CcrError]
) -> None:
    """A user's create of a job that is not hers: Slurm refuses her srun, and ccr says so
    with exit 9 (another srun failure stays a plain error); nothing is published."""
    d = tmp_path
    fake = FakeNodes(d, {"n1": ok("n1", d, task("n1", 0)), "n2": ok("n2", d, task("n2", 1))})
    fake.silent, fake.stderr = {"n1", "n2"}, said
    with pytest.raises(CcrError) as caught:
        run(rt, fake)
    assert type(caught.value) is expected, caught.value
    assert said.strip().rsplit(": ", 1)[-1] in str(caught.value)
    assert CheckpointSeries(d, f"{JOB}.ckpt").newest() is None
    assert fake.staging_left() == []
