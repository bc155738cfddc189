"""Slurm's time formats (`--checkpoint`, `--time`) parsed to seconds."""

from __future__ import annotations

import re

from ccr.errors import UsageError

# The largest interval accepted: what a signed 32-bit count of seconds holds (68 years).
MAX_SECONDS = 2**31 - 1

_NUM = r"([0-9]{1,10})"
_FORMS = [
    (re.compile(rf"^{_NUM}$"), ("minutes",)),
    (re.compile(rf"^{_NUM}:{_NUM}$"), ("minutes", "seconds")),
    (re.compile(rf"^{_NUM}:{_NUM}:{_NUM}$"), ("hours", "minutes", "seconds")),
    (re.compile(rf"^{_NUM}-{_NUM}$"), ("days", "hours")),
    (re.compile(rf"^{_NUM}-{_NUM}:{_NUM}$"), ("days", "hours", "minutes")),
    (re.compile(rf"^{_NUM}-{_NUM}:{_NUM}:{_NUM}$"), ("days", "hours", "minutes", "seconds")),
]
_UNIT = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def parse_slurm_time(text: str) -> int:
    """Seconds in a Slurm time string: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.

    `0` means "none" (no periodic checkpoints).  Anything else raises UsageError.
    """
    value = text.strip() if isinstance(text, str) else ""
    for pattern, units in _FORMS:
        match = pattern.match(value)
        if match:
            total = sum(int(g) * _UNIT[u] for g, u in zip(match.groups(), units, strict=True))
            if total > MAX_SECONDS:
                raise UsageError(f"time {text!r} is too large (at most {MAX_SECONDS} seconds)")
            return total
    raise UsageError(
        f"invalid time {text!r}: use minutes, minutes:seconds, hours:minutes:seconds, "
        "days-hours, days-hours:minutes or days-hours:minutes:seconds"
    )


def format_seconds(seconds: int) -> str:
    """Seconds as Slurm writes times: `[D-]HH:MM:SS`."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
