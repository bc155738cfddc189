"""scripts/zdtm.py on 3 tests of its safe list, so that it keeps working (the whole suite
takes minutes: it is run by hand, see README's zdtm section)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parent.parent
TESTS = ["pipe00", "unlink_mmap00", "timerfd"]


def test_zdtm_script_passes_three_tests_plain_and_under_ccr(tmp_path: Path) -> None:
    # A build directory of its own: a full run by hand may be using the shared one.
    env = {**os.environ, "CCR_ZDTM_DIR": str(tmp_path / "zdtm"), "PYTHONPATH": str(REPO)}
    env.pop("CCR_STATE_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "zdtm.py"), *TESTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for test in TESTS:
        [line] = [ln for ln in lines if ln.split()[:1] == [test]]
        assert line.split()[1:] == ["plain=PASS", "ccr=PASS"], line
    assert "plain CRIU: 3 of 3 pass" in lines and "ccr:        3 of 3 pass" in lines, lines
    assert "differ (0):" in lines


def test_zdtm_script_refuses_tests_outside_the_safe_list() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "zdtm.py"), "netns-nf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not in zdtm-safe.txt: netns-nf" in proc.stderr, proc
