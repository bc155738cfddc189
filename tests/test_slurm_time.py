"""parse_slurm_time: every Slurm time format, and everything else rejected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccr.errors import UsageError
from ccr.slurm_time import MAX_SECONDS, format_seconds, parse_slurm_time


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("10", 600),
        ("0:30", 30),
        ("1:30", 90),
        ("90:00", 5400),
        ("1:00:00", 3600),
        ("01:02:03", 3723),
        ("2-3", 2 * 86400 + 3 * 3600),
        ("2-3:04", 2 * 86400 + 3 * 3600 + 4 * 60),
        ("2-3:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("0-0:0:1", 1),
        (" 5 ", 300),
    ],
)
def test_valid_formats(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "-5",
        "-1",
        "1:2:3:4",
        "1-2-3",
        "1-",
        "-1:00",
        "1:",
        ":30",
        "1::2",
        "1.5",
        "1e3",
        "1-2:3:4:5",
        "10m",
        "+5",
        "1 2",
        "99999999999",
        "1-99999999999",
        "２",
    ],
)
def test_invalid_formats(text: str) -> None:
    with pytest.raises(UsageError):
        parse_slurm_time(text)


def test_overflow_is_rejected() -> None:
    with pytest.raises(UsageError, match="too large"):
        parse_slurm_time("9999999999")
    assert parse_slurm_time(str(MAX_SECONDS // 60)) <= MAX_SECONDS


@given(
    st.integers(0, 20000),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
)
def test_days_hours_minutes_seconds_roundtrip(d: int, h: int, m: int, s: int) -> None:
    total = d * 86400 + h * 3600 + m * 60 + s
    assert parse_slurm_time(f"{d}-{h}:{m:02d}:{s:02d}") == total
    assert parse_slurm_time(format_seconds(total)) == total


@given(st.integers(0, 10**6), st.integers(0, 59))
def test_minutes_seconds(m: int, s: int) -> None:
    assert parse_slurm_time(f"{m}:{s}") == m * 60 + s
    assert parse_slurm_time(str(m)) == m * 60


@given(st.text(alphabet="0123456789-:abc .", max_size=12))
def test_never_crashes(text: str) -> None:
    try:
        value = parse_slurm_time(text)
    except UsageError:
        return
    assert 0 <= value <= MAX_SECONDS
