"""`ccr show`, `ccr verify` and `ccr restart --check`: what a checkpoint holds, whether it is
intact, and what would block a restart."""

from __future__ import annotations

import io
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ccr import config
from ccr.controller import restart as rst
from ccr.controller.runtime import Runtime
from ccr.engines import openfiles
from ccr.errors import CcrError, NotFoundError, UsageError
from ccr.ids import JobRef, parse_job_ref
from ccr.storage import layout
from ccr.storage.manifest import MANIFEST, StepManifest, read_json
from ccr.timestamps import stamp

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resolve(rt: Runtime, target: str, image_dir: Path | None = None) -> list[layout.StepCheckpoint]:
    """The step checkpoints named by a path (link, generation, step or rank dir) or an id
    (the newest of each step it names)."""
    key = rt.manifest_key(create=False)
    path = Path(target)
    if path.exists():
        return layout.open_path(path, key).steps
    try:
        ref = parse_job_ref(target)
    except UsageError:
        raise NotFoundError(f"no checkpoint or job {target!r}") from None
    return layout.newest(rt.image_dir(ref.job_id, image_dir), ref, key)


def verify(rt: Runtime, target: str, image_dir: Path | None = None) -> list[Path]:
    """Authenticate and check every file of each image directory target names; return them."""
    dirs = [d for step in resolve(rt, target, image_dir) for d in step.dirs()]
    for d in dirs:
        rst.load_image(rt, d)
    return dirs


def _load_image_file(step_dir: Path, name: str) -> dict[str, Any] | None:
    """Decode one CRIU image with pycriu, from the plain or the .zst file."""
    from pycriu import images

    plain = step_dir / name
    packed = step_dir / f"{name}.zst"
    try:
        if plain.exists():
            with plain.open("rb") as fh:
                return dict(images.load(fh))
        if packed.exists():
            import zstandard

            with packed.open("rb") as fh:
                data = zstandard.ZstdDecompressor().stream_reader(fh).read()
            return dict(images.load(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - an undecodable image is shown as unknown, not fatal
        return None
    return None


def process_tree(step_dir: Path) -> list[dict[str, Any]]:
    """Each process of a dumped tree: pid (in its namespace), parent, command, threads, RSS."""
    pstree = _load_image_file(step_dir, "pstree.img")
    if pstree is None:
        return []
    procs = []
    for entry in pstree["entries"]:
        pid = int(entry["pid"])
        core = _load_image_file(step_dir, f"core-{pid}.img")
        comm = core["entries"][0]["tc"]["comm"] if core else "?"
        pagemap = _load_image_file(step_dir, f"pagemap-{pid}.img")
        pages = sum(int(e.get("nr_pages", 0)) for e in pagemap["entries"][1:]) if pagemap else 0
        procs.append(
            {
                "pid": pid,
                "ppid": int(entry["ppid"]),
                "command": comm,
                "threads": len(entry.get("threads", [])),
                "rss_bytes": pages * PAGE_SIZE,
                "pages": pages,
            }
        )
    return procs


def show(rt: Runtime, target: str, image_dir: Path | None = None) -> list[dict[str, Any]]:
    """Everything about each step checkpoint that target names."""
    key = rt.manifest_key(create=False)
    out = []
    for step_dir, step, rank in (
        (d, s, r) for s in resolve(rt, target, image_dir) for r, d in s.images()
    ):
        data = read_json(step_dir / MANIFEST)
        try:
            rst.load_step_manifest(step_dir, key)
            authenticated = True
        except CcrError:
            authenticated = False
        manifest = StepManifest.from_dict({k: v for k, v in data.items() if k != "hmac"})
        raw, stored = manifest.image_bytes, manifest.stored_bytes
        out.append(
            {
                "checkpoint": str(step_dir),
                "step": f"{manifest.job_id}.{manifest.step_id}",
                "job_id": manifest.job_id,
                "step_id": manifest.step_id,
                "generation": layout.generation_number(step.generation),
                **({"rank": rank} if rank is not None else {}),
                "authenticated": authenticated,
                "command": manifest.argv,
                "cwd": manifest.cwd,
                "output": manifest.output,
                "node": manifest.hostname,
                "uid": manifest.uid,
                **stamp("created", manifest.created),
                "criu_version": manifest.criu_version,
                "compression": manifest.compression,
                "image_bytes": raw,
                "stored_bytes": stored,
                "ratio": round(raw / stored, 3) if stored else None,
                "frozen_time": manifest.frozen_time,
                "total_time": manifest.total_time,
                "stats": manifest.stats,
                "restart_count": manifest.restart_count,
                "gpu": manifest.gpu or None,
                "processes": process_tree(step_dir),
            }
        )
    return out


@dataclass
class Check:
    """One pre-flight check of a restart."""

    name: str
    ok: bool
    detail: str
    # A file the job writes: its path, the action restart takes, its checkpointed size.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, **self.extra}


def _ok(fn: Any, *args: Any) -> str:
    fn(*args)
    return "ok"


def _check(name: str, fn: Any) -> Check:
    try:
        detail = fn()
        return Check(name, True, detail or "ok")
    except CcrError as exc:
        return Check(name, False, str(exc))


def restart_check(
    rt: Runtime, target: JobRef | Path, image_dir: Path | None, stick_to_nodes: bool
) -> list[Check]:
    """What would block `ccr restart` of target (a job or step, or a path), changing nothing."""
    checks: list[Check] = []
    key = rt.manifest_key(create=False)
    try:
        if isinstance(target, Path):
            steps = layout.open_path(target, key).steps
        else:
            steps = layout.newest(rt.image_dir(target.job_id, image_dir), target, key)
    except CcrError as exc:
        return [Check("checkpoint found", False, str(exc))]
    paths = []
    for step in steps:
        if not step.multi_node:
            paths.append(step.path)
            continue
        checks += _multi_node_checks(rt, step, isinstance(target, Path))
    for path in paths:
        found: list[rst.StepImage] = []

        def load(path: Path = path, found: list[rst.StepImage] = found) -> str:
            found.append(rst.load_image(rt, path))
            return f"{path}: manifest authenticated, every file verified"

        checks.append(_check("integrity", load))
        if not found:
            continue
        image = found[0]
        m = image.manifest
        checks.append(
            _check("CRIU version", lambda image=image: _ok(rst.check_criu_version, rt, image))
        )

        def node(m: StepManifest = m) -> str:
            here = socket.gethostname()
            if stick_to_nodes and m.hostname != here:
                raise CcrError(f"StickToNodes: taken on {m.hostname}, this node is {here}")
            return f"taken on {m.hostname}, this node is {here}"

        checks.append(_check("node", node))
        checks.append(
            _check(
                "not running, cwd present, allowed",
                lambda image=image: _ok(rst.preflight, rt, image, stick_to_nodes),
            )
        )
        checks.append(Check("PIDs free", True, "each step restores into its own PID namespace"))
        need_mem = m.image_bytes
        avail = psutil.virtual_memory().available
        checks.append(
            Check(
                "memory",
                avail > need_mem,
                f"{need_mem / 2**20:.0f} MiB needed, {avail / 2**20:.0f} MiB available",
            )
        )
        if any(f.codec != "none" for f in m.files):
            fast = config.fast_scratch()
            scratch = fast if fast.is_dir() else image.path.parent
            free = shutil.disk_usage(scratch).free
            checks.append(
                Check(
                    "scratch space for decompression",
                    free > need_mem or shutil.disk_usage(image.path.parent).free > need_mem,
                    f"{need_mem / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free in {scratch}",
                )
            )
        checks.append(Check("GPU", not m.gpu, "no GPU state" if not m.gpu else "needs a GPU"))
        for plan in rst.file_plans(image):
            checks.append(
                Check(
                    f"file {plan.file.path}",
                    plan.action != openfiles.REFUSE,
                    plan.describe(),
                    plan.to_dict(),
                )
            )
    return checks


def _multi_node_checks(rt: Runtime, step: layout.StepCheckpoint, by_path: bool) -> list[Check]:
    """A multi-node step restarts through Slurm, one task per rank: here only what holds for
    every rank wherever it lands (integrity, CRIU version) is checked."""
    nodes = ", ".join(sorted(set(step.ranks.values())))
    how = (
        f"restart it by job id (ccr restart {step.step.job_id})"
        if by_path
        else "ccr restart requeues the job, or submits a new one, through Slurm"
    )
    checks = [
        Check(
            "multi-node",
            not by_path,
            f"{step.path}: a multi-node checkpoint of {step.step}, {step.ntasks} ranks "
            f"taken on {nodes}; {how}",
        )
    ]
    for rank, path in step.images():
        found: list[rst.StepImage] = []

        def load(path: Path = path, found: list[rst.StepImage] = found) -> str:
            found.append(rst.load_image(rt, path))
            return f"{path}: manifest authenticated, every file verified"

        checks.append(_check("integrity", load))
        if found:
            image = found[0]
            checks.append(
                _check(
                    f"CRIU version (rank {rank})",
                    lambda image=image: _ok(rst.check_criu_version, rt, image),
                )
            )
    return checks
