"""The users' side: show, verify, restart --check, compress/decompress, --json, the Python API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import COUNTER, Ccr, numbers, wait_for


def started(ccr: Ccr, job: int, *options: str) -> Path:
    ccr.program("counter.py", COUNTER)
    ccr.detach("python3", "counter.py", options=("--job-id", str(job), *options))
    out = ccr.work / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    return out


def test_show_decodes_criu_images(ccr: Ccr) -> None:
    started(ccr, 81)
    created = json.loads(ccr.run("create", "81.0", "--json").stdout)
    stats = created["stats"]["81.0"]
    for field in ("freezing_time", "frozen_time", "memdump_time", "memwrite_time"):
        assert field in stats
    assert stats["pages_written"] > 100 and stats["pages_scanned"] >= stats["pages_written"]
    assert created["ratio"] > 1.0
    shown = json.loads(ccr.run("show", "81.0", "--json").stdout)["checkpoints"][0]
    assert shown["authenticated"] is True
    assert shown["command"] == ["python3", "counter.py"]
    procs = {p["pid"]: p for p in shown["processes"]}
    assert procs[1]["command"] == "dumb-init" and procs[2]["command"] == "python3"
    assert procs[2]["ppid"] == 1 and procs[2]["rss_bytes"] > 1 << 20
    assert shown["compression"].startswith("zstd") and shown["stored_bytes"] < shown["image_bytes"]
    text = ccr.run("show", str(ccr.work / "81.0.ckpt")).stdout
    assert "dumb-init" in text and "python3 counter.py" in text
    ccr.run("cancel", "81")


def test_restart_check_changes_nothing(ccr: Ccr) -> None:
    started(ccr, 82)
    ccr.run("create", "82")
    blocked = ccr.run("restart", "82", "--check", "--json", check=False)
    assert blocked.returncode == 4
    report = json.loads(blocked.stdout)
    assert not report["ok"]
    assert any("still running" in c["detail"] for c in report["checks"] if not c["ok"])
    ccr.run("cancel", "82")
    ok = ccr.run("restart", "82", "--check")
    assert "possible" in ok.stdout
    assert ccr.step("82.0")["state"] == "cancelled"  # --check restored nothing
    wrong_node = ccr.run("restart", "82", "--check", "--stick-to-nodes", check=False)
    assert wrong_node.returncode == 0  # same node: StickToNodes holds


def test_compress_decompress_in_place_and_restart(ccr: Ccr) -> None:
    out = started(ccr, 83)
    ccr.run("create", "83.0", "--compress", "none", "--stop")
    ckpt = ccr.work / "83.0.ckpt"
    assert any(p.name.startswith("pages-") and p.suffix == ".img" for p in ckpt.iterdir())
    ccr.run("compress", str(ckpt), "--compress", "zstd:3")
    assert all(not (p.name.startswith("pages-") and p.suffix == ".img") for p in ckpt.iterdir())
    shown = json.loads(ccr.run("show", str(ckpt), "--json").stdout)["checkpoints"]
    assert shown[0]["compression"] == "zstd:3"
    ccr.run("verify", str(ckpt))
    ccr.run("decompress", str(ckpt))
    ccr.run("verify", str(ckpt))
    assert not [p for p in ccr.work.iterdir() if ".tmp-" in p.name]
    before = numbers(out)
    ccr.run("restart", "83")
    wait_for(lambda: len(numbers(out)) > len(before) + 3, 30, "restored output")
    assert numbers(out)[len(before)] == before[-1] + 1
    ccr.run("cancel", "83")


def test_bad_codec_is_a_usage_error(ccr: Ccr) -> None:
    started(ccr, 84)
    for bad in ("gzip", "zstd:abc", "zstd:999"):
        proc = ccr.run("create", "84", "--compress", bad, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("ccr: error:"), proc.stderr
    ccr.run("cancel", "84")


def test_quiet_and_json_everywhere(ccr: Ccr) -> None:
    started(ccr, 85)
    assert ccr.run("-q", "create", "85").stdout == ""
    for args in (
        ["list"],
        ["status", "85"],
        ["show", "85"],
        ["checkpoint", "able", "85"],
        ["checkpoint", "error", "85"],
        ["verify", str(ccr.work / "85.ckpt")],
    ):
        json.loads(ccr.run(*args, "--json").stdout)
    assert json.loads(ccr.run("cancel", "85", "--json").stdout) == {
        "job_id": 85,
        "cancelled": [{"step": "85.0", "job_id": 85, "step_id": 0}],
    }


def test_python_api(ccr: Ccr, monkeypatch: pytest.MonkeyPatch) -> None:
    import ccr as api

    monkeypatch.setenv("CCR_STATE_DIR", str(ccr.state_dir))
    monkeypatch.chdir(ccr.work)
    ccr.program("counter.py", COUNTER)
    step = api.run(["python3", "counter.py"], job_id=86)
    assert step == "86.0"
    out = ccr.work / "ccr-86.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")
    result = api.create(86, stop=True)
    assert result.path.exists() and result.stored_bytes > 0
    wait_for(lambda: api.status(86)["steps"][0]["state"] == "vacated", 30, "vacate")
    api.verify(ccr.work / "86.ckpt")
    restored = api.restart(86)
    assert restored[0].step.job_id == 86 and restored[0].pid > 0
    assert api.show("86")[0]["step"] == "86.0"
    assert api.cancel(86) == ["86.0"]
    assert os.environ["CCR_STATE_DIR"] == str(ccr.state_dir)
