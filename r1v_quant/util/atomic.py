"""Atomic outputs: write under a temporary name, rename into place only when complete.

An interrupted run (Ctrl-C, kill, full disk) therefore never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from r1v_quant.util.errors import R1VError, os_errno, os_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask-based mode
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_output_dir(path: Path, *, allow_existing_empty: bool = True) -> None:
    """Refuse to overwrite: an existing non-empty output directory is a user mistake."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise R1VError(f"{path}: exists and is not a directory")
        if not allow_existing_empty or any(path.iterdir()):
            raise R1VError(f"{path}: output directory is not empty (choose another --out or remove it)")


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` on success, delete it on failure."""
    final = Path(final)
    check_output_dir(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as e:
        raise os_error(e, final, "create the output folder") from None
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if final.exists():
            final.rmdir()  # empty (checked above); rename needs it gone
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and os_errno(e) is not None:  # OSError, or a writer's wrapped one
            raise os_error(e, final) from None
        raise


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `final`; `os.replace` it into place on success."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as e:
        raise os_error(e, final, "write") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            _publish_mode(tmp, directory=False)
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and os_errno(e) is not None:  # OSError, or a writer's wrapped one
            raise os_error(e, final) from None
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
