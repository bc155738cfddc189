"""ccr's error hierarchy; each class's exit_code attribute is the one exit-code table.

README's "Exit codes" table is checked against these classes (tests/test_errors.py).
"""

from __future__ import annotations

import errno as _errno

# The errnos of a full file system or quota: a storage error (8) whoever hits it.
NO_SPACE = (_errno.ENOSPC, _errno.EDQUOT)


class CcrError(Exception):
    """Base of every error ccr reports to a user as one line."""

    exit_code = 1


class UsageError(CcrError):
    """Malformed input: a bad id, option value or argument."""

    exit_code = 2


class NotFoundError(CcrError):
    """An unknown job, step or checkpoint."""

    exit_code = 3


class JobStateError(CcrError):
    """The job is in the wrong state for the request (running, disabled, finished)."""

    exit_code = 4


class CriuError(CcrError):
    """CRIU failed; the message names CRIU's log."""

    exit_code = 5

    def __init__(self, message: str, log_path: str | None = None) -> None:
        if log_path:
            message = f"{message} (CRIU log: {log_path})"
        super().__init__(message)
        self.log_path = log_path


class MaxWaitExceeded(CcrError):
    """A checkpoint or restart did not finish within MaxWait."""

    exit_code = 6


class IntegrityError(CcrError):
    """A checkpoint failed verification: tampered, corrupted, truncated or missing files."""

    exit_code = 7


class StorageError(CcrError):
    """The image directory or state directory cannot be used (missing, read-only, full).

    errno: the OS error behind it where there is one (ENOSPC, EDQUOT, EROFS, ...), so a
    caller tells a full disk from another failure by number, not by the message.
    """

    exit_code = 8

    def __init__(
        self, message: str, *, errno: int | None = None, log_path: str | None = None
    ) -> None:
        if log_path:
            message = f"{message} (CRIU log: {log_path})"
        super().__init__(message)
        self.errno = errno
        self.log_path = log_path


class PermissionDeniedError(CcrError):
    """The caller may not act on this job or image."""

    exit_code = 9


class GpuError(CcrError):
    """The GPU checkpoint sequence failed or is unavailable."""

    exit_code = 10


# Exit code of a supervisor whose step was checkpointed and terminated (preempted, vacated):
# EX_TEMPFAIL from sysexits.h, "try again later", so a batch script can requeue on it.
EXIT_VACATED = 75
# Exit status of a forked supervisor that failed before it could report (nobody waits
# for it: its caller learns of it from the report pipe's EOF): EX_SOFTWARE, sysexits.h.
EXIT_INTERNAL = 70

# Every error class, in the order of their codes (README's table).
ERROR_CLASSES: tuple[type[CcrError], ...] = (
    CcrError,
    UsageError,
    NotFoundError,
    JobStateError,
    CriuError,
    MaxWaitExceeded,
    IntegrityError,
    StorageError,
    PermissionDeniedError,
    GpuError,
)


def exit_code_for(error: BaseException) -> int:
    """The process exit code for an error: its class's exit_code (1 for anything else)."""
    return error.exit_code if isinstance(error, CcrError) else 1


def error_for_code(code: int, message: str) -> CcrError:
    """Rebuild an error reported by another process (a supervisor) from its exit code."""
    for cls in ERROR_CLASSES[1:]:
        if cls.exit_code == code:
            return cls(message)
    return CcrError(message)
