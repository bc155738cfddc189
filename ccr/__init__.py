"""ccr: transparent checkpoint/restart of batch job steps with CRIU."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("run", "create", "restart", "status", "cancel", "show", "verify")


def __getattr__(name: str) -> Any:
    # The API is imported lazily so `import ccr` stays cheap (the CLI imports ccr.cli only).
    if name in _API:
        from ccr import api

        return getattr(api, name)
    raise AttributeError(f"module 'ccr' has no attribute {name!r}")
