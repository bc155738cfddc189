"""The eager restart streams the stored images to `criu restore --stream` (engines.imagestream):
stored files untouched, damage refused before anything runs, older manifests restore, and a
process holding most of the node's RAM comes back on that node."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Ccr, numbers, wait_for

from ccr.storage.manifest import MANIFEST, ManifestKey, read_json, write_signed

# A step whose memory holds `MIB` MiB: half incompressible (a random 4 MiB block, each copy
# stamped with its offset: ccr's 8 MiB frames are compressed independently and zstd level
# 1 looks back 512 KiB, so they do not compress), half text-like (compressible).  It prints
# a counter and every `EVERY` lines compares all of its memory with what it wrote (memcmp
# speed, seconds for 14 GiB where hashing took minutes on a busy 2-CPU node): a restored
# process whose memory differs in one byte prints MISMATCH and exits 3.
HOLDER = """\
import random, sys, time
mib, seed, every = map(int, sys.argv[1:4])
rng = random.Random(seed)
CH = 4 << 20
block = rng.randbytes(CH)
line = b" ".join(rng.randbytes(6).hex().encode() for _ in range(500)) + b"\\n"
text = (line * (CH // len(line) + 1))[:CH]
size = mib << 20
half = size // 2 // CH * CH

def expected(at):
    n = min(CH, size - at)
    return (at.to_bytes(8, "little") + block[8:n]) if at < half else text[:n]

blob = bytearray(size)
for at in range(0, size, CH):
    blob[at:at + CH] = expected(at)
view = memoryview(blob)
i = 0
while True:
    if i % every == 0:
        if not all(view[at:at + CH] == expected(at) for at in range(0, size, CH)):
            print("MISMATCH", i, flush=True)
            sys.exit(3)
    print(i, flush=True)
    i += 1
    time.sleep(0.05)
"""


def start_holder(ccr: Ccr, job: int, mib: int, every: int = 20) -> Path:
    prog = ccr.program("holder.py", HOLDER)
    argv = ("python3", str(prog), str(mib), str(job), str(every))
    ccr.detach(*argv, options=("--job-id", str(job)))
    out = ccr.work / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 2, 60 + mib / 50, "the holder's first lines")
    return out


def vacate(ccr: Ccr, job: int, compress: str | None = None, timeout: float = 180) -> Path:
    codec = ("--compress", compress) if compress else ()
    ccr.run("create", f"{job}.0", "--stop", *codec, timeout=timeout)
    wait_for(lambda: ccr.step(f"{job}.0")["state"] == "vacated", 60, "vacate recorded")
    return (ccr.work / f"{job}.0.ckpt").resolve()


def stored_state(ckpt: Path) -> dict[str, tuple[str, int, int]]:
    """Every stored file: (sha256, mode, mtime_ns)."""
    found = {}
    for path in sorted(ckpt.iterdir()):
        st = path.stat()
        found[path.name] = (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            st.st_mode,
            st.st_mtime_ns,
        )
    return found


def restart_json(ccr: Ccr, job: int, timeout: float = 180) -> dict[str, Any]:
    proc = ccr.run("restart", str(job), "--json", timeout=timeout)
    [step] = json.loads(proc.stdout)["steps"]
    return dict(step)


def growing(out: Path, beyond: int, timeout: float = 60) -> None:
    wait_for(
        lambda: "MISMATCH" in out.read_text() or len(numbers(out)) > beyond + 5,
        timeout,
        "restored output",
    )
    assert "MISMATCH" not in out.read_text(), "the restored memory differs"


def kill_step(ccr: Ccr, job: int) -> None:
    pid = ccr.step(f"{job}.0")["init_pid"]
    ccr.run("cancel", f"{job}.0")
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30, "the step gone")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("compress", ["zstd:1", "none"])
def test_streamed_restart_leaves_stored_files_unchanged(ccr: Ccr, compress: str) -> None:
    job = 75010 if compress == "none" else 75011
    out = start_holder(ccr, job, 48)
    ckpt = vacate(ccr, job, compress)
    manifest = read_json(ckpt / MANIFEST)
    assert manifest["format"] == 4 and manifest["compression"] == compress
    assert all(f["frames"] for f in manifest["files"])
    before = stored_state(ckpt)
    lines_at_checkpoint = len(numbers(out))
    for round_ in range(2):  # twice from the same checkpoint: nothing consumed its files
        step = restart_json(ccr, job)
        assert step["streamed"] is True
        assert step["fill_time"] is None
        assert 0 < step["criu_time"] <= step["resume_time"] <= step["restore_time"]
        assert 0 <= step["verify_time"] <= step["restore_time"]
        assert step["peak_extra_bytes"] >= 0
        growing(out, lines_at_checkpoint if round_ == 0 else len(numbers(out)))
        assert stored_state(ckpt) == before
        kill_step(ccr, job)
    ccr.run("verify", str(ckpt))


def _corrupt_middle(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _as_format_3(ckpt: Path, ccr: Ccr) -> None:
    """Rewrite ckpt's manifest as an older ccr wrote it: no per-frame digests."""
    data = read_json(ckpt / MANIFEST)
    data.pop("hmac")
    data["format"] = 3
    for entry in data["files"]:
        entry.pop("frames")
        entry.pop("frame_bytes")
    key = ManifestKey(ccr.state_dir / "manifest.key").load(create=False)
    assert key is not None
    write_signed(ckpt / MANIFEST, data, key)


@pytest.mark.parametrize(
    ("compress", "old"), [("zstd:1", False), ("none", False), ("zstd:1", True), ("none", True)]
)
def test_corrupted_frame_refused_before_anything_runs(ccr: Ccr, compress: str, old: bool) -> None:
    """A flipped byte in the middle of the pages: the restart fails naming the file, and the
    tree never ran: format 4 refuses the frame before CRIU gets it, older manifests (one
    digest per file, known at its end) are held at post-restore and CRIU kills the tree."""
    job = 75020 + 2 * old + (compress == "none")
    out = start_holder(ccr, job, 32)
    ckpt = vacate(ccr, job, compress)
    if old:
        _as_format_3(ckpt, ccr)
    pages = max(ckpt.glob("pages-*"), key=lambda p: p.stat().st_size)
    assert pages.name.endswith(".zst") == (compress != "none")
    _corrupt_middle(pages)
    lines_at_checkpoint = out.read_bytes()
    scratch_before = set(Path("/dev/shm").glob(".ccr-*"))
    proc = ccr.run("restart", str(job), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("ccr: error: ") and pages.name in line and "corrupted" in line, line
    time.sleep(1)
    assert out.read_bytes() == lines_at_checkpoint  # not one line: nothing ran
    assert ccr.step(f"{job}.0")["state"] == "vacated"
    assert ccr.marked_pids() == []  # no half-restored tree, no CRIU left
    left = [
        p
        for p in set(Path("/dev/shm").glob(".ccr-*")) - scratch_before
        if not Path(f"/proc/{p.name.split('-')[2]}").exists()
    ]
    assert left == []  # the failed restore removed its scratch


@pytest.mark.parametrize("compress", ["zstd:1", "none"])
def test_older_manifest_format_still_restores(ccr: Ccr, compress: str) -> None:
    job = 75030 + (compress == "none")
    out = start_holder(ccr, job, 32)
    ckpt = vacate(ccr, job, compress)
    _as_format_3(ckpt, ccr)
    at = len(numbers(out))
    step = restart_json(ccr, job)
    assert step["streamed"] is True
    growing(out, at)


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


@pytest.mark.heavy
def test_process_holding_60_percent_of_ram_restores_on_the_same_node(ccr: Ccr) -> None:
    """60% of MemTotal, half compressible, default compression: the restore needs no second
    copy of it, so it fits beside the process (run under flock /work/notes/bigmem.lock)."""
    mib = int(_mem_total() * 0.6) >> 20
    job = 75040
    every = 100  # comparing 14 GiB takes seconds: a check every 100 lines
    out = start_holder(ccr, job, mib, every)
    ckpt = vacate(ccr, job, timeout=900)
    assert read_json(ckpt / MANIFEST)["compression"].startswith("zstd")
    at = len(numbers(out))
    step = restart_json(ccr, job, timeout=900)
    assert step["streamed"] is True
    # The restored process re-hashes all of its memory at its next multiple of `every`.
    check = (at // every + 1) * every
    growing(out, check, timeout=300)
    kill_step(ccr, job)
