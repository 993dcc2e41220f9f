"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""

from __future__ import annotations

import errno
import re
from pathlib import Path


class R1VError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class CheckpointError(R1VError):
    """A checkpoint directory that cannot be read as an R1V model."""


# errno -> what it means for the user, in words (strerror's wording varies and can be localised)
_REASONS = {
    errno.ENOSPC: "no space left on device (nothing was written under the final name)",
    errno.EDQUOT: "disk quota exceeded (nothing was written under the final name)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
}
# numpy's tofile and some writers report a short write without an errno: on a local disk, it is a full one
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
# Rust's io::Error as safetensors prints it: "I/O error: No space left on device (os error 28)"; older
# versions: "IoError(Os { code: 28, kind: StorageFull, ... })"
_RUST_OS_CODE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_errno(e: BaseException) -> int | None:
    """The errno behind `e`: an OSError's own, or one recognisable in a writer's message."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    text = str(e)
    if _SHORT_WRITE.search(text):
        return errno.ENOSPC
    m = _RUST_OS_CODE.search(text)
    return int(m.group(1) or m.group(2)) if m else None


def os_error(e: BaseException, path: Path | str | None = None, need: str = "") -> R1VError:
    """One line for a failed file operation: `PATH: cannot NEED: REASON`.

    `path` defaults to the path the OSError names; `need` says what the command was doing there ("create
    the output folder", "write the GGUF"), so the user knows what to fix.
    """
    if path is None and isinstance(e, OSError):
        path = e.filename
    code = os_errno(e)
    if code in _REASONS:
        reason = _REASONS[code]
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = " ".join(str(e).split()) or type(e).__name__
    where = f"{path}: " if path not in (None, "") else ""
    return R1VError(f"{where}{f'cannot {need}: ' if need else ''}{reason}")
