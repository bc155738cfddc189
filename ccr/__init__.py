"""ccr: transparent checkpoint/restart of batch job steps with CRIU."""

__version__ = "0.1.0"
