"""ccr's error hierarchy and the one table that maps each error to an exit code."""

from __future__ import annotations


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
    """The image directory or state directory cannot be used (missing, read-only, full)."""

    exit_code = 8


class PermissionDeniedError(CcrError):
    """The caller may not act on this job or image."""

    exit_code = 9


class GpuError(CcrError):
    """The GPU checkpoint sequence failed or is unavailable."""

    exit_code = 10


# Exit code of a supervisor whose step was checkpointed and terminated (preempted, vacated):
# EX_TEMPFAIL from sysexits.h, "try again later", so a batch script can requeue on it.
EXIT_VACATED = 75

EXIT_CODES: dict[type[CcrError], int] = {
    cls: cls.exit_code
    for cls in (
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
}


def exit_code_for(error: BaseException) -> int:
    """The process exit code for an error (1 for anything not from ccr)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]  # type: ignore[index]
    return 1


def error_for_code(code: int, message: str) -> CcrError:
    """Rebuild an error reported by another process (a supervisor) from its exit code."""
    for cls, value in EXIT_CODES.items():
        if value == code and cls is not CcrError:
            return cls(message)
    return CcrError(message)
