"""Slurm's filename patterns for -o/-e: one pure function."""

from __future__ import annotations

import pytest

from ccr.errors import UsageError
from ccr.ids import NO_ARRAY_TASK, FileContext, expand_filename_pattern

CTX = FileContext(job_id=42, step_id=3, node="n01", user="alice", job_name="train.py")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("slurm-%j.out", "slurm-42.out"),
        ("%j.%s.log", "42.3.log"),
        ("%J", "42.3"),
        ("%N-%u-%x", "n01-alice-train.py"),
        ("%A_%a", f"42_{NO_ARRAY_TASK}"),
        ("%4j", "0042"),
        ("%3t-%n", "000-0"),
        ("100%%", "100%"),
        ("%%j", "%j"),
        ("plain.out", "plain.out"),
        ("/abs/%j/x", "/abs/42/x"),
    ],
)
def test_patterns(pattern: str, expected: str) -> None:
    assert expand_filename_pattern(pattern, CTX) == expected


def test_array_job() -> None:
    ctx = FileContext(
        job_id=43, step_id=0, node="n", user="u", job_name="j", array_job_id=40, array_task_id=3
    )
    assert expand_filename_pattern("%A_%a-%j", ctx) == "40_3-43"
    assert expand_filename_pattern("%A_%2a", ctx) == "40_03"


@pytest.mark.parametrize("bad", ["%q", "a%", "%3N", "x%z.out"])
def test_unknown_pattern_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="pattern"):
        expand_filename_pattern(bad, CTX)
