"""ccr touches only what it creates: existing directories keep their mode and owner, typos in
a directory name create nothing, and a checkpoint is never nested inside another one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from conftest import Ccr, numbers, wait_for
from test_core_e2e import assert_cli_error
from test_users_e2e import started


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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


# -- restart from what the user has: a path, another job id ----------------------------------


def vacated(ccr: Ccr, job: int, ref: str, out: Path, *options: str) -> int:
    """`ccr create REF --stop`; the last number printed before the tree was killed."""
    ccr.run("create", ref, "--stop", *options)
    wait_for(lambda: ccr.step(f"{job}.0")["exit_code"] is not None, 30, f"{job} vacated")
    return numbers(out)[-1]


def resumed_from(out: Path, seen: int, last: int) -> None:
    """The restored tree prints last+1 next: it came back from the checkpoint, not from 0."""
    wait_for(lambda: len(numbers(out)) > seen + 3, 30, "restored output")
    assert numbers(out)[seen] == last + 1, numbers(out)[seen - 2 : seen + 3]


def test_restart_by_path(ccr: Ccr) -> None:
    out = started(ccr, 9010)
    last = vacated(ccr, 9010, "9010", out)
    gen = (ccr.work / "9010.ckpt").resolve()
    seen = len(numbers(out))
    ccr.run("restart", str(gen / "0"))  # a step directory inside a whole-job generation
    resumed_from(out, seen, last)
    last = vacated(ccr, 9010, "9010.0", out)
    seen = len(numbers(out))
    restarted = json.loads(ccr.run("restart", "9010.0.ckpt", "--json").stdout)  # link, relative
    assert (restarted["job_id"], restarted["step_id"], restarted["mode"]) == (9010, 0, "local")
    assert [s["step"] for s in restarted["steps"]] == ["9010.0"]
    resumed_from(out, seen, last)
    ccr.run("cancel", "9010")
    seen = len(numbers(out))
    ccr.run("restart", str((ccr.work / "9010.0.ckpt").resolve()))  # a generation
    resumed_from(out, seen, last)
    ccr.run("cancel", "9010")
    assert_cli_error(ccr.run("restart", "./no-such.ckpt", check=False), 3, "no-such.ckpt")
    assert_cli_error(
        ccr.run("restart", "nonsense", check=False), 2, "malformed job id", "checkpoint path"
    )
    assert_cli_error(ccr.run("restart", str(ccr.work), check=False), 2, "not a ccr checkpoint")


def test_restart_dir_resumes_into_a_new_job_id(ccr: Ccr) -> None:
    old_dir = ccr.work / "old"
    out = started(ccr, 9020, "--checkpoint-dir", str(old_dir))
    last = vacated(ccr, 9020, "9020", out)
    stored = sorted((p.name, p.stat().st_size) for p in old_dir.rglob("*") if p.is_file())
    seen = len(numbers(out))
    # As srun --restart-dir / SLURM_RESTART_DIR in the resubmitted job (a new id).
    env = dict(ccr.env, SLURM_RESTART_DIR=str(old_dir))
    step = ccr.run(
        "run", "--detach", "--job-id", "9021", "--", "python3", "counter.py", env=env
    ).stdout.strip()
    assert step == "9021.0"
    resumed_from(out, seen, last)
    assert ccr.step("9021.0")["state"] == "running"
    assert ccr.step("9020.0")["state"] == "vacated"
    ccr.run("create", "9021")  # the new job's checkpoints go to its own dir, under its own id
    assert (ccr.work / "9021.ckpt").is_symlink() and not (old_dir / "9021.ckpt").exists()
    assert sorted((p.name, p.stat().st_size) for p in old_dir.rglob("*") if p.is_file()) == stored
    ccr.run("cancel", "9021")
    # A directory holding several jobs' checkpoints is ambiguous: refused, naming them.
    other = ccr.detach(
        "python3", "counter.py", options=("--job-id", "9022", "--checkpoint-dir", str(old_dir))
    )
    wait_for(lambda: len(numbers(ccr.work / f"ccr-{other}.out")) > 2, 30, "output")
    ccr.run("create", "9022", "--stop")
    proc = ccr.run(
        "run",
        "--job-id",
        "9023",
        "--restart-dir",
        str(old_dir),
        "--",
        "python3",
        "counter.py",
        check=False,
    )
    assert_cli_error(proc, 2, "several jobs", "9020", "9022")
    assert ccr.run("status", "9023", check=False).returncode == 3


def test_renamed_copy_is_refused_unless_asked(ccr: Ccr) -> None:
    out = started(ccr, 9030)
    last = vacated(ccr, 9030, "9030", out)
    copy = ccr.work / "copy"
    copy.mkdir()
    gen = (ccr.work / "9030.ckpt").resolve()
    subprocess.run(["cp", "-a", str(gen), str(copy / "9031.ckpt.1")], check=True)
    (copy / "9031.ckpt").symlink_to("9031.ckpt.1")
    proc = ccr.run("restart", "9031", "--image-dir", str(copy), check=False)
    assert_cli_error(proc, 7, "9030.0", "9031.0", "--rename")
    assert ccr.run("status", "9031", check=False).returncode == 3  # no phantom job
    assert "9031" not in ccr.run("list").stdout
    seen = len(numbers(out))
    ccr.run("restart", "9031", "--image-dir", str(copy), "--rename")
    resumed_from(out, seen, last)
    assert ccr.step("9031.0")["state"] == "running"
    ccr.run("cancel", "9031")


def test_nothing_found_says_what_is_there(ccr: Ccr) -> None:
    started(ccr, 9040)
    ccr.run("create", "9040")
    proc = ccr.run("restart", "9041", "--image-dir", str(ccr.work), check=False)
    assert_cli_error(proc, 3, "found 9040.ckpt", "did you mean 9040?")
    empty = ccr.work / "empty"
    empty.mkdir()
    proc = ccr.run("restart", "9041", "--image-dir", str(empty), check=False)
    assert_cli_error(proc, 3, "holds no")
    ccr.run("cancel", "9040")
