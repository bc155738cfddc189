"""Every command's --json output against its documented shape, on a real checkpointed job."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import jsonschema
from conftest import COUNTER, REPO, Ccr, numbers, wait_for
from json_schemas import SHAPES


def invariants(value: Any, where: str = "$") -> None:
    """What holds anywhere in ccr's JSON: integer ids and generations, times in RFC 3339
    with an offset, each equal to its `_epoch` twin."""
    if isinstance(value, list):
        for n, item in enumerate(value):
            invariants(item, f"{where}[{n}]")
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        path = f"{where}.{key}"
        if key in ("job_id", "generation", "slurm_job") and item is not None:
            assert isinstance(item, int) and not isinstance(item, bool), (path, item)
        if key == "step_id" and item is not None:
            assert isinstance(item, int), (path, item)
        if f"{key}_epoch" in value:
            epoch = value[f"{key}_epoch"]
            if item is None:
                assert epoch is None, path
            else:
                parsed = datetime.fromisoformat(item)
                assert parsed.utcoffset() is not None, (path, item)
                assert abs(parsed.timestamp() - epoch) < 1, (path, item, epoch)
        invariants(item, path)


def check(ccr: Ccr, shape: str, *args: str, code: int = 0) -> Any:
    cut = args.index("--") if "--" in args else len(args)
    proc = ccr.run(*args[:cut], "--json", *args[cut:], check=False)
    assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
    data = json.loads(proc.stdout.strip().splitlines()[-1] if args[0] == "run" else proc.stdout)
    jsonschema.validate(data, SHAPES[shape])
    invariants(data)
    return data


def failure(ccr: Ccr, code: int, *args: str) -> dict[str, Any]:
    proc = ccr.run(*args, check=False)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)
    assert proc.stdout == "", proc.stdout
    data = json.loads(proc.stderr)
    jsonschema.validate(data, SHAPES["any error (stderr)"])
    assert data["code"] == code
    return data


def test_every_command_prints_its_documented_json(ccr: Ccr) -> None:
    ccr.program("counter.py", COUNTER)
    job = "9210"
    started = check(ccr, "run", "run", "--detach", "--job-id", job, "--", "python3", "counter.py")
    assert started["step"] == f"{job}.0" and started["job_id"] == 9210 and started["detached"]
    out = ccr.work / f"ccr-{job}.0.out"
    wait_for(lambda: len(numbers(out)) > 3, 30, "output")

    made = check(ccr, "create", "create", job)
    assert made["job_id"] == 9210 and made["step_id"] is None and made["generation"] == 1
    again = check(ccr, "checkpoint create|vacate|requeue", "checkpoint", "create", f"{job}.0")
    assert again["step_id"] == 0 and again["generation"] == 1  # its own series: 9210.0.ckpt
    status = check(ccr, "status", "status", job)
    assert status["steps"][0]["generations"][0]["generation"] == 1
    assert status["last_checkpoint"]["time"].endswith("+00:00")
    listed = check(ccr, "list", "list")
    assert [j["job_id"] for j in listed["jobs"]] == [9210]
    shown = check(ccr, "show", "show", job)
    assert shown["checkpoints"][0]["generation"] == 1
    link = made["link"]
    check(ccr, "verify", "verify", link)
    check(ccr, "compress|decompress", "decompress", link)
    check(ccr, "compress|decompress", "compress", link)
    assert check(ccr, "checkpoint able", "checkpoint", "able", job)["able"] == "Yes"
    assert check(ccr, "checkpoint error", "checkpoint", "error", job)["code"] == 0
    assert check(ccr, "checkpoint disable|enable", "checkpoint", "disable", job)["disabled"] == 1
    assert check(ccr, "checkpoint disable|enable", "checkpoint", "enable", job)["disabled"] == 0
    blocked = check(ccr, "restart", "restart", job, "--check", code=4)
    assert blocked["mode"] == "check" and blocked["ok"] is False

    cancelled = check(ccr, "cancel", "cancel", job)
    assert cancelled["cancelled"] == [{"step": f"{job}.0", "job_id": 9210, "step_id": 0}]
    restarted = check(ccr, "restart", "restart", job)
    assert restarted["mode"] == "local" and restarted["steps"][0]["step"] == f"{job}.0"
    vacated = check(ccr, "checkpoint create|vacate|requeue", "checkpoint", "vacate", job)
    wait_for(lambda: ccr.step(f"{job}.0")["exit_code"] is not None, 30, "vacated")
    assert vacated["generation"] == 2
    again = check(ccr, "checkpoint restart", "checkpoint", "restart", job)
    assert again["steps"][0]["generation"] == 2
    check(ccr, "cancel", "cancel", job)

    # A foreground run prints one object, last on stdout, when the step has exited.
    done = check(ccr, "run", "run", "--job-id", "9211", "--", "sh", "-c", "exit 3", code=3)
    assert done["exit_code"] == 3 and not done["detached"]
    check(ccr, "version", "version")
    assert check(ccr, "doctor", "doctor")["ok"] is True

    # Errors under --json: one JSON object on stderr, the exit code of the table.
    assert "9299" in failure(ccr, 3, "status", "9299", "--json")["error"]
    failure(ccr, 2, "status", "x", "--json")
    failure(ccr, 2, "list", "--no-such-option", "--json")
    failure(ccr, 4, "cancel", job, "--json")
    # --json after `--` belongs to the step's command, not to ccr.
    plain = ccr.run("run", "--job-id", "9212", "--", "sh", "-c", "exit 0", "--json", check=False)
    assert plain.returncode == 0 and plain.stdout == "", plain.stdout


def test_readme_documents_every_shape() -> None:
    """README's "JSON output" table lists each command's top-level keys, as the schemas do."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### JSON output", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(?:ccr )?([^`]+)`[^|]* \| `\{([^}]*)\}`", line)
        if match:
            rows[match.group(1).replace("\\|", "|")] = {
                k.strip().rstrip("?") for k in match.group(2).split(",")
            }
    for name, schema in SHAPES.items():
        documented = rows.get(name)
        assert documented is not None, f"README's JSON output table has no row for `ccr {name}`"
        assert documented == set(schema["properties"]), (name, documented)


def test_error_json_is_not_triggered_by_a_step_argument() -> None:
    """A pure-logic check of the argv scan: options after the step's command are not ccr's."""
    from typer.main import get_command

    from ccr import cli

    root = get_command(cli.app)
    args, as_json = cli._normalise(root, ["run", "python3", "x.py", "--json", "-v"])
    assert not as_json and args == ["run", "python3", "x.py", "--json", "-v"]
    args, as_json = cli._normalise(root, ["run", "-o", "-v", "--json", "--", "x", "-q"])
    assert as_json and args == ["run", "-o", "-v", "--json", "--", "x", "-q"]
    args, as_json = cli._normalise(root, ["list", "-q", "--json"])
    assert as_json and args == ["-q", "list", "--json"]
    args, _ = cli._normalise(root, ["checkpoint", "able", "7", "-v"])
    assert args == ["-v", "checkpoint", "able", "7"]
