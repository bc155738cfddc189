"""What a path in an image directory holds, and finding the newest checkpoint: the one owner
of the on-disk layout (every reader of checkpoints asks here; imageset writes them).

    ImageDir/
      42.0.ckpt -> 42.0.ckpt.7      a step's series: `<name>` links to its newest generation
      42.0.ckpt.7/manifest.json     one step on one node: its CRIU images and signed manifest
      42.0.ckpt.8/{job.json,0/,1/}  one step on several nodes: a rank directory each
      42.ckpt -> 42.ckpt.3          a whole job's series
      42.ckpt.3/{job.json,0/,1/}    a whole job: a step directory each, which is an image
                                    directory (one node) or holds rank directories (several)

A directory holding `manifest.json` is one *image directory* (one CRIU dump of one tree).  A
generation holding `job.json` is a whole-job checkpoint, or a multi-node one: its job manifest
then maps each step to its ranks and their nodes (`ranks`), and `step_ref` says whether it
was taken of one step (its rank directories sit in the generation itself) or of the job.

Functions here take the manifest key (bytes, or None to read job manifests unverified, for
display: every step's own manifest is authenticated again before it is restored, verified
or converted), never the controller's Runtime.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr.errors import IntegrityError, NotFoundError, StorageError, UsageError
from ccr.ids import JobRef, StepId, checkpoint_name
from ccr.storage.imageset import CheckpointSeries
from ccr.storage.manifest import JOB_MANIFEST, MANIFEST, read_json, read_verified
from ccr.storage.registry import JobRecord

# What a path holds (kind_of).
LINK = "link"  # a `.ckpt` symlink to a generation
GENERATION = "generation"  # a generation (or a copy of one under another name)
STEP = "step"  # a step's directory inside a whole-job generation
RANK = "rank"  # a rank's image directory of a multi-node step


def default_image_dir(job: JobRecord | None, given: Path | None = None) -> Path:
    """Where a job's checkpoints go and are looked for: the directory given (--image-dir,
    ImageDir=, --checkpoint-dir), else the job's checkpoint dir, else the current directory
    (as Slurm's --checkpoint-dir defaulted to the cwd)."""
    if given is not None:
        return given
    return Path(job.checkpoint_dir) if job is not None else Path.cwd()


@dataclass(frozen=True)
class StepCheckpoint:
    """One step of a checkpoint: one image directory, or one per rank (multi-node)."""

    step: StepId  # as its checkpoint's name (or, opened by path, its manifest) says
    path: Path  # the image directory (one node) or the directory of its rank directories
    generation: Path  # the generation that holds it
    created: float
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> node; empty: one node

    @property
    def multi_node(self) -> bool:
        return bool(self.ranks)

    @property
    def ntasks(self) -> int:
        return len(self.ranks) or 1

    def rank_dir(self, rank: int) -> Path:
        return self.path / str(rank)

    def images(self) -> list[tuple[int | None, Path]]:
        """Each image directory with its rank (None: a step on one node)."""
        if not self.ranks:
            return [(None, self.path)]
        return [(rank, self.rank_dir(rank)) for rank in sorted(self.ranks)]

    def dirs(self) -> list[Path]:
        return [path for _, path in self.images()]


@dataclass(frozen=True)
class Opened:
    """The checkpoint a path names, as far as the path reaches into it."""

    path: Path  # resolved
    kind: str  # LINK, GENERATION, STEP or RANK
    generation: Path
    steps: list[StepCheckpoint]

    @property
    def multi_node(self) -> bool:
        return any(s.multi_node for s in self.steps)

    def dirs(self) -> list[Path]:
        """Every image directory the path names."""
        return [d for s in self.steps for d in s.dirs()]


def generation_number(generation: Path) -> int | None:
    """7 for `42.0.ckpt.7`; None for a directory not named like a generation (a copy)."""
    head, _, suffix = generation.name.rpartition(".")
    return int(suffix) if suffix.isdigit() and head.endswith(".ckpt") else None


def generation_of(image_dir: Path) -> Path:
    """The generation an image directory (or step or rank directory) belongs to."""
    parent = image_dir.parent
    if (parent / JOB_MANIFEST).is_file():
        return parent
    if image_dir.name.isdigit() and parent.name.isdigit():
        if (parent.parent / JOB_MANIFEST).is_file():  # <gen>/<step>/<rank>
            return parent.parent
    return image_dir


def series_dir(image_dir: Path) -> Path:
    """The image directory holding the series that an image directory belongs to."""
    return generation_of(image_dir).parent


def _job_manifest(generation: Path, key: bytes | None) -> dict[str, Any]:
    path = generation / JOB_MANIFEST
    return read_json(path) if key is None else read_verified(path, key)


def _ranks(data: dict[str, Any], step_id: int) -> dict[int, str]:
    placed = data.get("ranks", {}).get(str(step_id), {})
    try:
        return {int(rank): str(node) for rank, node in placed.items()}
    except (AttributeError, TypeError, ValueError):
        raise IntegrityError(f"malformed ranks for step {step_id} in a job manifest") from None


def _created(manifest: Path) -> float:
    try:
        return float(json.loads(manifest.read_text()).get("created", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def _step_ids(path: Path) -> StepId | None:
    """The ids an image directory's manifest names (unverified), if it has them."""
    try:
        data = read_json(path / MANIFEST)
        return StepId(int(data["job_id"]), int(data["step_id"]))
    except (IntegrityError, KeyError, TypeError, ValueError):
        return None


def generation_steps(
    generation: Path, key: bytes | None, named: JobRef | None = None
) -> list[StepCheckpoint]:
    """Every step a generation holds, under the ids its series' name says (named; a renamed
    copy is then told by its manifests), else under its manifests' own."""
    if (generation / MANIFEST).is_file():
        step = _step_ids(generation)
        if step is None:
            raise UsageError(f"{generation} is not a ccr checkpoint (unreadable {MANIFEST})")
        if named is not None:
            step = StepId(named.job_id, step.step_id if named.step_id is None else named.step_id)
        return [StepCheckpoint(step, generation, generation, _created(generation / MANIFEST))]
    if not (generation / JOB_MANIFEST).is_file():
        raise UsageError(
            f"{generation} is not a ccr checkpoint (no {MANIFEST} or {JOB_MANIFEST} in it)"
        )
    data = _job_manifest(generation, key)
    try:
        job = int(data["job_id"]) if named is None else named.job_id
        created = float(data.get("created", 0.0))
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"malformed job manifest {generation / JOB_MANIFEST}") from None
    if "ranks" in data:  # multi-node: the generation's steps are the job manifest's
        single = data.get("step_ref")
        out = []
        for sid in sorted(int(s) for s in data["ranks"]):
            path = generation if single is not None else generation / str(sid)
            out.append(
                StepCheckpoint(StepId(job, sid), path, generation, created, _ranks(data, sid))
            )
        return out
    return [
        StepCheckpoint(StepId(job, int(sub.name)), sub, generation, _created(sub / MANIFEST))
        for sub in sorted(generation.iterdir(), key=lambda p: (len(p.name), p.name))
        if sub.is_dir() and sub.name.isdigit()
    ]


def kind_of(path: Path) -> str | None:
    """What path holds: LINK, GENERATION, STEP, RANK, or None (not a checkpoint)."""
    target = path.resolve()
    if not target.is_dir():
        return None
    gen = generation_of(target)
    if gen == target:
        if (target / JOB_MANIFEST).is_file() or (target / MANIFEST).is_file():
            return LINK if path.is_symlink() else GENERATION
        return None
    if gen == target.parent.parent:
        return RANK
    data = _safe_job_manifest(gen)
    return RANK if "ranks" in data and data.get("step_ref") is not None else STEP


def _safe_job_manifest(generation: Path) -> dict[str, Any]:
    try:
        return read_json(generation / JOB_MANIFEST)
    except IntegrityError:
        return {}


def open_path(path: Path, key: bytes | None) -> Opened:
    """The checkpoint at path (a `.ckpt` link, a generation, a step or a rank directory in
    one), with the steps (and ranks) that path names.  Raises NotFoundError when path does
    not exist, UsageError when it holds no checkpoint."""
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    kind = kind_of(path)
    target = path.resolve()
    if kind is None:
        raise UsageError(f"{path} is not a ccr checkpoint (no {MANIFEST} or {JOB_MANIFEST} in it)")
    if kind in (LINK, GENERATION):
        return Opened(target, kind, target, generation_steps(target, key))
    gen = generation_of(target)
    steps = generation_steps(gen, key)
    if kind == STEP:
        chosen = [s for s in steps if s.path == target]
    else:  # a rank: its step, with that one rank
        rank = int(target.name)
        chosen = [
            StepCheckpoint(s.step, s.path, s.generation, s.created, {rank: s.ranks[rank]})
            for s in steps
            if s.path == target.parent and rank in s.ranks
        ]
    if not chosen:  # a directory the job manifest does not name
        raise UsageError(f"{path} is not a step of the checkpoint {gen}")
    return Opened(target, kind, gen, chosen)


_LINK = re.compile(r"^(?P<job>\d+)(?:\.(?P<step>\d+))?\.ckpt$")


def checkpoints_in(image_dir: Path) -> list[tuple[int, int | None, str]]:
    """The checkpoint names in image_dir: (job id, step id or None for a whole job, name)."""
    try:
        entries = [entry.name for entry in image_dir.iterdir()]
    except OSError:
        return []
    found = []
    for name in entries:
        match = _LINK.match(name)
        if match:
            step = match.group("step")
            found.append((int(match.group("job")), None if step is None else int(step), name))
    return sorted(found, key=lambda item: (item[0], -1 if item[1] is None else item[1]))


def newest(image_dir: Path, ref: JobRef, key: bytes | None) -> list[StepCheckpoint]:
    """The newest complete checkpoint of each step that ref names, one node or several.

    A whole-job checkpoint (`<jobid>.ckpt`) and per-step ones (`<jobid>.<stepid>.ckpt`)
    compete: for each step the most recent one wins.  Raises StorageError for an unusable
    image directory and NotFoundError (saying what the directory does hold) for none.
    """
    if not image_dir.exists():
        raise StorageError(f"image directory {image_dir} does not exist")
    if not image_dir.is_dir():
        raise StorageError(f"image directory {image_dir} is not a directory")
    if not os.access(image_dir, os.R_OK | os.X_OK):
        raise StorageError(f"image directory {image_dir} is not readable")
    present = checkpoints_in(image_dir)
    series = [JobRef(ref.job_id)]  # the whole job's, then each step's
    series += [JobRef(j, s) for j, s, _ in present if j == ref.job_id and s is not None]
    if ref.step_id is not None:
        series = [JobRef(ref.job_id), ref]
    best: dict[int, StepCheckpoint] = {}
    for named in series:
        gen = CheckpointSeries(image_dir, checkpoint_name(named)).newest()
        if gen is None:
            continue
        for step in generation_steps(gen.path, key, named):
            sid = step.step.step_id
            if ref.step_id not in (None, sid):
                continue
            if sid not in best or step.created > best[sid].created:
                best[sid] = step
    if not best:
        raise NotFoundError(_nothing_found(ref, image_dir, present))
    return [best[s] for s in sorted(best)]


def _nothing_found(ref: JobRef, image_dir: Path, present: list[tuple[int, int | None, str]]) -> str:
    """'No checkpoint', saying what IS in the directory and what the user may have meant."""
    head = f"no complete checkpoint of {ref} in {image_dir}"
    if not present:
        return f"{head} (it holds no <jobid>.ckpt or <jobid>.<stepid>.ckpt)"
    names = [name for _, _, name in present]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    mine = [s for j, s, _ in present if j == ref.job_id and s is not None]
    if mine:
        guess = f"{ref.job_id}.{mine[0]}"
    else:
        guess = str(present[0][0]) if len({j for j, _, _ in present}) == 1 else ""
    return f"{head}; found {shown}" + (f"; did you mean {guess}?" if guess else "")
