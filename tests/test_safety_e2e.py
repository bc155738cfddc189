"""ccr touches only what it creates: existing directories keep their mode and owner, typos in
a directory name create nothing, and a checkpoint is never nested inside another one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import COUNTER, Ccr, numbers, wait_for
from test_core_e2e import assert_cli_error


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def started(ccr: Ccr, job: int, *options: str) -> Path:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", str(job), *options))
    out = ccr.work / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    return out


def test_existing_directories_keep_mode_and_owner(ccr: Ccr) -> None:
    # A sticky world-writable dir (like /tmp or /scratch) owned by somebody else, the
    # job's own cwd (the default image dir) and an existing state dir: none is chmod'ed.
    shared = ccr.work.parent / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    os.chown(shared, 65534, 65534)
    ccr.work.chmod(0o751)
    ccr.state_dir.mkdir()
    ccr.state_dir.chmod(0o750)
    started(ccr, 9001)
    ccr.run("create", "9001")  # default image dir: the cwd
    ccr.run("create", "9001", "--image-dir", str(shared))
    ccr.run("checkpoint", "create", "9001", f"ImageDir={shared}")
    assert mode(shared) == 0o1777
    assert (shared.stat().st_uid, shared.stat().st_gid) == (65534, 65534)
    assert mode(ccr.work) == 0o751
    assert mode(ccr.state_dir) == 0o750
    # What ccr created itself is private.
    for gen in ((ccr.work / "9001.ckpt").resolve(), (shared / "9001.ckpt").resolve()):
        assert mode(gen) == 0o700
        assert all(mode(p) == 0o600 for p in gen.iterdir() if p.is_file())
    ccr.run("cancel", "9001")


def test_missing_parents_are_an_error_unless_asked(ccr: Ccr) -> None:
    typo = ccr.work.parent / "no-such-parent" / "ckpt"
    proc = ccr.run("run", "--checkpoint-dir", str(typo), "--", "true", check=False)
    assert_cli_error(proc, 8, str(typo), "--mkdir")
    assert not typo.parent.exists()
    started(ccr, 9002)
    proc = ccr.run("create", "9002", "--image-dir", str(typo), check=False)
    assert_cli_error(proc, 8, str(typo), "--mkdir")
    assert not typo.parent.exists()
    assert ccr.step("9002.0")["state"] == "running"
    # Only the last component new: created, private (as Slurm's --checkpoint-dir did).
    fresh = ccr.work / "fresh"
    ccr.run("create", "9002", "--image-dir", str(fresh))
    assert mode(fresh) == 0o700 and (fresh / "9002.ckpt").is_symlink()
    # Asked for: every missing component created, each private.
    ccr.run("create", "9002", "--image-dir", str(typo), "--mkdir")
    assert mode(typo.parent) == 0o700 and mode(typo) == 0o700
    assert (typo / "9002.ckpt").is_symlink()
    ccr.run("cancel", "9002")
    out = ccr.run("run", "--checkpoint-dir", str(ccr.work / "a" / "b"), "--mkdir", "--", "true")
    assert out.returncode == 0 and mode(ccr.work / "a" / "b") == 0o700


def test_image_dir_inside_a_checkpoint_is_refused(ccr: Ccr) -> None:
    started(ccr, 9003)
    ccr.run("create", "9003")
    link = ccr.work / "9003.ckpt"
    gen = link.resolve()
    before = sorted(p.name for p in gen.rglob("*"))
    for inside in (link, gen, gen / "sub", link / "sub"):
        proc = ccr.run("create", "9003", "--image-dir", str(inside), check=False)
        assert_cli_error(proc, 8, "inside the checkpoint")
        proc = ccr.run("run", "--checkpoint-dir", str(inside), "--", "true", check=False)
        assert_cli_error(proc, 8, "inside the checkpoint")
    assert sorted(p.name for p in gen.rglob("*")) == before
    ccr.run("verify", str(link))
    # A user's own manifest.json does not make a directory a checkpoint.
    project = ccr.work / "project"
    project.mkdir()
    (project / "manifest.json").write_text('{"name": "my project"}')
    ccr.run("create", "9003", "--image-dir", str(project))
    assert (project / "9003.ckpt").is_symlink()
    ccr.run("cancel", "9003")
