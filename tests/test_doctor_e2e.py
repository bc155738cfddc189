"""`ccr run` refuses a step it could not checkpoint; `ccr doctor` says what is missing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import REPO, Ccr

from ccr import config

REAL_CRIU = config.criu_binary()


def refused(proc: object, *needles: str) -> str:
    line = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 5, (proc.returncode, line)  # type: ignore[attr-defined]
    assert line.count("\n") == 1 and line.startswith("ccr: error: cannot checkpoint"), line
    for needle in ("install-criu.sh", "README", "--no-checkpoint-check", *needles):
        assert needle in line, (needle, line)
    return line


def fake_criu(path: Path, version: str, check_ok: bool) -> Path:
    path.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "Version: {version}"; exit 0; }}\n'
        f'[ "$1" = check ] && {{ echo "check says no" >&2; exit {0 if check_ok else 1}; }}\n'
        "exit 1\n"
    )
    path.chmod(0o755)
    return path


def test_run_refuses_without_criu_and_the_override_runs(ccr: Ccr) -> None:
    env = {**ccr.env, "CCR_CRIU": str(ccr.work / "no-such-criu")}
    refused(ccr.run("run", "--job-id", "9230", "--", "true", env=env, check=False), "no-such-criu")
    refused(ccr.run("run", "--detach", "--", "true", env=env, check=False))
    assert json.loads(ccr.run("list", "--json").stdout) == {"jobs": []}  # nothing started
    ok = ccr.run("run", "--no-checkpoint-check", "--job-id", "9230", "--", "true", env=env)
    assert ok.returncode == 0
    proc = ccr.run("run", "--json", "--job-id", "9231", "--", "true", env=env, check=False)
    assert proc.returncode == 5 and json.loads(proc.stderr)["code"] == 5

    doctor = ccr.run("doctor", env=env, check=False)
    assert doctor.returncode == 5
    assert "NO  CRIU binary" in doctor.stdout and "install-criu.sh" in doctor.stdout
    report = json.loads(ccr.run("doctor", "--json", env=env, check=False).stdout)
    failed = {c["check"]: c for c in report["checks"] if not c["ok"]}
    assert report["ok"] is False and set(failed) == {"CRIU binary"}, failed
    assert Path(failed["CRIU binary"]["fix"].split()[2]).is_file()  # the installer it names


def test_run_refuses_an_old_or_broken_criu(ccr: Ccr) -> None:
    old = fake_criu(ccr.work / "criu-3", "3.17", check_ok=True)
    env = {**ccr.env, "CCR_CRIU": str(old)}
    refused(ccr.run("run", "--", "true", env=env, check=False), "3.17", "older than 4")
    broken = fake_criu(ccr.work / "criu-broken", "4.2", check_ok=False)
    env = {**ccr.env, "CCR_CRIU": str(broken)}
    refused(ccr.run("run", "--", "true", env=env, check=False), "check` failed")
    report = json.loads(ccr.run("doctor", "--json", env=env, check=False).stdout)
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert failed == {"criu check"}, report


def test_run_refuses_without_pycriu(ccr: Ccr, tmp_path: Path) -> None:
    hidden = tmp_path / "hide-pycriu" / "pycriu"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('pycriu hidden by the test')\n")
    env = {**ccr.env, "PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"}
    refused(ccr.run("run", "--", "true", env=env, check=False), "pycriu")
    doctor = ccr.run("doctor", env=env, check=False)
    assert doctor.returncode == 5 and "NO  pycriu" in doctor.stdout, doctor.stdout
    version = json.loads(ccr.run("version", "--json", env=env).stdout)
    assert version["pycriu"] is False and version["criu"]["works"] is True


def test_doctor_healthy(ccr: Ccr) -> None:
    proc = ccr.run("doctor")
    assert proc.stdout.rstrip().endswith("ccr can checkpoint here")
    report = json.loads(ccr.run("doctor", "--json").stdout)
    assert report["ok"] is True
    names = [c["check"] for c in report["checks"]]
    assert names == [
        "root",
        "CRIU binary",
        "CRIU version",
        "criu check",
        "pycriu",
        "dumb-init",
        "state dir writable",
    ]


def test_criu_check_is_cached_per_binary(ccr: Ccr) -> None:
    """A run pays for `criu check` once per CRIU binary (and kernel), not every time."""
    calls = ccr.work / "criu-calls"
    wrapper = ccr.work / "criu-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec {REAL_CRIU} "$@"\n')
    wrapper.chmod(0o755)
    env = {**ccr.env, "CCR_CRIU": str(wrapper)}

    def checks() -> int:
        return calls.read_text().split().count("check") if calls.exists() else 0

    ccr.run("run", "--job-id", "9232", "--", "true", env=env)
    assert checks() == 1
    cache = ccr.state_dir / "criu-facts.json"
    assert json.loads(cache.read_text())["key"]["binary"] == str(wrapper)
    ccr.run("run", "--job-id", "9233", "--", "true", env=env)
    assert checks() == 1  # cached
    later = time.time() + 5
    os.utime(wrapper, (later, later))  # a new CRIU binary: checked again
    ccr.run("run", "--job-id", "9234", "--", "true", env=env)
    assert checks() == 2
    # A cached pass does not survive a binary that stopped working.
    wrapper.write_text("#!/bin/sh\nexit 1\n")
    refused(ccr.run("run", "--", "true", env=env, check=False))
