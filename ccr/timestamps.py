"""Times as ccr's JSON prints them: RFC 3339 in UTC with an explicit offset, plus the epoch."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def rfc3339(ts: float | None) -> str | None:
    """e.g. 2026-12-01T21:49:00+00:00 (whole seconds; None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def stamp(name: str, ts: float | None) -> dict[str, Any]:
    """{name: RFC 3339, name_epoch: seconds since the epoch}, both None when ts is."""
    return {name: rfc3339(ts), f"{name}_epoch": None if ts is None else round(ts, 3)}


def local(ts: float | None) -> str:
    """A time for people: local, to the second, with its zone (e.g. 2026-12-01 22:49:00 CET)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))
