"""storage/layout.py on every layout ccr writes (pure logic: the directories and manifests
are written here; the end-to-end tests in test_layout_e2e.py use real CRIU dumps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ccr.errors import IntegrityError, NotFoundError, UsageError
from ccr.ids import JobRef, StepId
from ccr.storage import layout
from ccr.storage.manifest import JOB_MANIFEST, MANIFEST, write_signed

KEY = b"k" * 32


def image(path: Path, job: int, step: int, created: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).write_text(json.dumps({"job_id": job, "step_id": step, "created": created}))
    return path


def generation(image_dir: Path, name: str, number: int) -> Path:
    gen = image_dir / f"{name}.{number}"
    gen.mkdir(parents=True)
    link = image_dir / name
    link.unlink(missing_ok=True)
    os.symlink(gen.name, link)
    return gen


def job_manifest(gen: Path, job: int, created: float, **extra: object) -> None:
    write_signed(gen / JOB_MANIFEST, {"job_id": job, "created": created, **extra}, KEY)


def test_what_each_path_holds(tmp_path: Path) -> None:
    single = generation(tmp_path, "1.0.ckpt", 3)
    image(single, 1, 0, 10.0)
    whole = generation(tmp_path, "2.ckpt", 1)
    job_manifest(whole, 2, 10.0, steps=[0, 1])
    image(whole / "0", 2, 0, 10.0)
    image(whole / "1", 2, 1, 10.0)
    multi = generation(tmp_path, "3.ckpt", 2)
    job_manifest(multi, 3, 20.0, ranks={"0": {"0": "n1", "1": "n2"}}, step_ref=None)
    image(multi / "0" / "0", 3, 0, 19.0)
    image(multi / "0" / "1", 3, 0, 19.0)
    step_multi = generation(tmp_path, "4.5.ckpt", 1)
    job_manifest(step_multi, 4, 20.0, ranks={"5": {"0": "n1", "1": "n2"}}, step_ref=5)
    image(step_multi / "0", 4, 5, 19.0)
    image(step_multi / "1", 4, 5, 19.0)

    kinds = {
        tmp_path / "1.0.ckpt": layout.LINK,
        single: layout.GENERATION,
        whole / "1": layout.STEP,
        multi: layout.GENERATION,
        multi / "0": layout.STEP,
        multi / "0" / "1": layout.RANK,
        step_multi / "1": layout.RANK,
        tmp_path: None,
    }
    assert {p: layout.kind_of(p) for p in kinds} == kinds

    assert layout.open_path(tmp_path / "2.ckpt", KEY).dirs() == [whole / "0", whole / "1"]
    assert layout.open_path(whole / "1", KEY).dirs() == [whole / "1"]
    opened = layout.open_path(tmp_path / "3.ckpt", KEY)
    assert opened.multi_node and opened.dirs() == [multi / "0" / "0", multi / "0" / "1"]
    assert opened.steps[0].ranks == {0: "n1", 1: "n2"} and opened.steps[0].step == StepId(3, 0)
    rank = layout.open_path(multi / "0" / "1", KEY)
    assert rank.kind == layout.RANK and rank.dirs() == [multi / "0" / "1"]
    assert layout.open_path(step_multi, KEY).dirs() == [step_multi / "0", step_multi / "1"]
    for gen, number in ((single, 3), (whole, 1), (multi, 2)):
        assert layout.generation_number(gen) == number
    assert layout.generation_of(multi / "0" / "1") == multi
    assert layout.series_dir(whole / "0") == tmp_path
    assert layout.generation_number(tmp_path / "copy") is None
    with pytest.raises(UsageError, match="not a ccr checkpoint"):
        layout.open_path(tmp_path, KEY)
    with pytest.raises(NotFoundError):
        layout.open_path(tmp_path / "missing", KEY)
    with pytest.raises(IntegrityError, match="failed authentication"):
        layout.open_path(multi, b"x" * 32)


def test_newest_of_each_step_whole_job_against_per_step(tmp_path: Path) -> None:
    whole = generation(tmp_path, "7.ckpt", 1)
    job_manifest(whole, 7, 10.0, ranks={"0": {"0": "n1", "1": "n2"}, "1": {"0": "n1"}})
    for step, ranks in ((0, 2), (1, 1)):
        for rank in range(ranks):
            image(whole / str(step) / str(rank), 7, step, 10.0)
    newer = generation(tmp_path, "7.1.ckpt", 4)
    image(newer, 7, 1, 30.0)
    older = generation(tmp_path, "7.0.ckpt", 2)
    image(older, 7, 0, 5.0)

    found = layout.newest(tmp_path, JobRef(7), KEY)
    assert [(s.step, s.path, s.multi_node) for s in found] == [
        (StepId(7, 0), whole / "0", True),
        (StepId(7, 1), newer, False),
    ]
    assert [s.path for s in layout.newest(tmp_path, JobRef(7, 0), KEY)] == [whole / "0"]
    # A renamed copy keeps the name's ids (restart refuses it unless --rename).
    copy = generation(tmp_path, "8.3.ckpt", 1)
    image(copy, 5, 0, 1.0)
    assert [s.step for s in layout.newest(tmp_path, JobRef(8, 3), KEY)] == [StepId(8, 3)]
    with pytest.raises(NotFoundError, match="did you mean 7.0"):
        layout.newest(tmp_path, JobRef(7, 9), KEY)
    with pytest.raises(Exception, match="does not exist"):
        layout.newest(tmp_path / "nowhere", JobRef(7), KEY)


def test_default_image_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccr.storage.registry import JobRecord

    monkeypatch.chdir(tmp_path)
    job = JobRecord(job_id=1, created=0.0, checkpoint_dir="/ckpt")
    assert layout.default_image_dir(None) == tmp_path
    assert layout.default_image_dir(job) == Path("/ckpt")
    assert layout.default_image_dir(job, Path("/given")) == Path("/given")


def test_prune_leaves_the_series_at_once_and_deletes_in_the_background(tmp_path: Path) -> None:
    """Pruned generations are gone from the series when prune returns; a detached process
    deletes them (a 100 MB pages file took ~60 ms to delete here), and a leftover of a
    deletion that died is removed by the next checkpoint's staging clean-up."""
    import time

    from ccr.storage.imageset import CheckpointSeries

    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    for number in range(1, 5):
        gen = images / f"9.0.ckpt.{number}"
        gen.mkdir(mode=0o700)
        (gen / MANIFEST).write_text("{}")
        (gen / "pages-1.img").write_bytes(os.urandom(1 << 20))
    series = CheckpointSeries(images, "9.0.ckpt")
    removed = series.prune(2)
    assert sorted(p.name for p in removed) == ["9.0.ckpt.1", "9.0.ckpt.2"]
    assert [g.number for g in series.generations()] == [3, 4]
    deadline = time.monotonic() + 30
    while [p for p in images.iterdir() if p.name.startswith(".")]:
        assert time.monotonic() < deadline, sorted(p.name for p in images.iterdir())
        time.sleep(0.02)
    assert sorted(p.name for p in images.iterdir()) == ["9.0.ckpt.3", "9.0.ckpt.4"]
    # A deletion that died half-way (its process is gone): the next staging removes it.
    stale = images / ".9.0.ckpt.old-999999999-abcd1234"
    (stale / "sub").mkdir(parents=True)
    series.begin()
    assert not stale.exists()
