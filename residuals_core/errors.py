"""One error type whose message always says what went wrong and what to do about it."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ResidualsError(ValueError):
    """A problem with the user's input or environment, with the fix in the message.

    Subclasses ValueError so that code written against the `residuals` package, which raises
    ValueError for bad shapes and tokenizers, keeps catching it.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}")


class Cancelled(ResidualsError):
    """The user stopped the run on purpose: what it made is removed, nothing is kept for a resume."""


# ---- the one error path for faults of the machine (disk full, permissions, read-only disks) ----------
_OS_FIXES = {
    errno.ENOSPC: (
        "there is no space left on the disk",
        "Free some space, choose a folder on a larger disk, or push straight to the Hub (--push-to keeps "
        "only about two shards on local disk); nothing partial was left behind.",
    ),
    errno.EDQUOT: (
        "the disk quota is exhausted",
        "Free some space or choose a folder on another disk; nothing partial was left behind.",
    ),
    errno.EACCES: (
        "permission was denied",
        "Choose a folder you may write to (or files you may read), or fix the permissions.",
    ),
    errno.EPERM: (
        "the operation is not permitted",
        "Choose a folder you may write to (or files you may read), or fix the permissions.",
    ),
    errno.EROFS: ("the file system is read-only", "Choose an output folder on a writable disk."),
    errno.EBUSY: ("it is busy (a mount point, or in use)", "Choose another output folder."),
    errno.ENAMETOOLONG: ("the path is too long", "Choose a shorter output path."),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Check the path."),
    errno.EIO: (
        "the disk reported an input/output error",
        "Check the disk (it may be failing or disconnected) and run again.",
    ),
}


def from_os_error(exc: OSError, doing: str | None = None) -> ResidualsError:
    """A machine fault as a ResidualsError: what failed, on which file, and what to do."""
    reason, fix = _OS_FIXES.get(
        exc.errno or 0, (exc.strerror or str(exc), "Check the path and the disk, then run again.")
    )
    where = f" ({exc.filename})" if exc.filename else ""
    what = doing or "A file operation"
    return ResidualsError(f"{what} failed{where}: {reason}.", fix)


def reports_os_errors(function: Callable[P, T]) -> Callable[P, T]:
    """Public entry points: a machine fault reaches the user as a ResidualsError, a bug as itself."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return function(*args, **kwargs)
        except OSError as exc:
            raise from_os_error(exc) from exc

    return wrapper
