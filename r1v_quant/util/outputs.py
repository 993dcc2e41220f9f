"""Output folders owned by one run, disk space checked up front, sizes in human units.

`claim_output(path)` is taken by every command that writes an output (`awq`, `gguf`, `onnx`, `calibrate`,
`tiny`) before any work: an exclusive `flock` on a lock file, so a second run into the same output fails
at once with one line instead of racing the first one's existence checks and renames. The kernel drops the
lock when its process dies, even on SIGKILL, so a stale lock file never blocks a rerun. Two layouts:

* an output that appears whole (an AWQ checkpoint, an ONNX or calibration folder): the lock is a sibling
  `.NAME.r1v-lock` in its parent, since the folder itself only exists once complete;
* a folder that collects several runs' files (`gguf`): it is created and the lock lives inside it as
  `.r1v-quant.lock`, so only that folder needs to be writable.

Folders the claim created are removed again when the run fails and they are still empty; staging
folders a killed run left beside the output (`.NAME.partial-*`) are removed once the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from r1v_quant.util.errors import R1VError, os_error

FOLDER_LOCK = ".r1v-quant.lock"
LOCK_SUFFIX = ".r1v-lock"


def human_bytes(n: int | float) -> str:
    """1.5 GB, 12.0 MB, 340 kB, 17 B (decimal units, as disk tools print free space)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def lock_path_for(path: Path, *, folder: bool) -> Path:
    return path / FOLDER_LOCK if folder else path.parent / f".{path.name}{LOCK_SUFFIX}"


@dataclass
class OutputClaim:
    path: Path
    lock_path: Path
    created: list[Path] = field(default_factory=list)  # folders this claim made, outermost first
    _fd: int = -1


def _make_dirs(path: Path, created: list[Path], output: Path) -> None:
    """mkdir -p `path`, recording what was made; errors name the `output` being created."""
    missing = []
    p = path
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail with a confusing EEXIST
            raise R1VError(f"{output}: cannot create the output folder: {p} is a link to nothing")
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise R1VError(f"{output}: cannot create the output folder: {p} is a file, not a folder")
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # another run made it meanwhile
        except OSError as e:
            raise os_error(e, output, "create the output folder") from None
        created.append(d)


def _remove_empty(created: list[Path], keep: Path | None = None) -> None:
    for d in reversed(created):
        if d != keep:
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds while empty


def _lock(claim: OutputClaim) -> None:
    """flock the claim's lock file; retry when a finishing run unlinked it between our open and lock."""
    for _ in range(100):
        try:
            fd = os.open(claim.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise os_error(e, claim.path, "lock the output for this run") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read_owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {owner})" if owner else ""
                raise R1VError(
                    f"{claim.path}: another r1v-quant run{who} is writing this output; wait for it to "
                    "finish or choose another --out"
                ) from None
            raise os_error(e, claim.lock_path, "lock the output for this run") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(claim.lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            claim._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:
                _unlock(claim)
                raise os_error(e, claim.lock_path, "write the lock file") from None
            return
        os.close(fd)  # the previous owner removed that file while we opened it: try the new one
    raise R1VError(f"{claim.path}: could not lock the output (lock file keeps changing)")


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip()
    return ""


def _unlock(claim: OutputClaim) -> None:
    if claim._fd < 0:
        return
    with contextlib.suppress(OSError):
        os.unlink(claim.lock_path)  # while still holding it: a waiting open sees the inode change
    os.close(claim._fd)
    claim._fd = -1


@contextlib.contextmanager
def claim_output(path: Path | str, *, folder: bool = False) -> Iterator[OutputClaim]:
    """Own `path` for the duration of the block; one `error:` line if another run owns it.

    `folder=True`: `path` is a folder that collects outputs (created here, lock inside). Otherwise `path`
    appears whole at the end and only its parent is created here. Created folders that are still empty
    when the block fails are removed.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise R1VError(f"{path}: exists and is not a directory")
    claim = OutputClaim(path, lock_path_for(path, folder=folder))
    _make_dirs(path if folder else path.parent, claim.created, path)
    try:
        _lock(claim)
    except BaseException:
        _remove_empty(claim.created)
        raise
    if not folder:
        # what a killed run left (atomic.atomic_dir's staging): nobody else can be writing it now
        for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    ok = False
    try:
        yield claim
        ok = True
    finally:
        _unlock(claim)
        if not ok:
            _remove_empty(claim.created)


def existing_ancestor(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def require_free_space(needs: Mapping[Path | str, int], what: str = "the outputs") -> None:
    """Refuse up front, in one line, when the bytes each location needs do not fit its file system.

    Locations on one file system are added up (the output and a scratch folder beside it share its space).
    """
    per_fs: dict[int, tuple[Path, int]] = {}
    for where, need in needs.items():
        base = existing_ancestor(Path(where))
        dev = base.stat().st_dev
        at, total = per_fs.get(dev, (base, 0))
        per_fs[dev] = (at, total + need)
    for at, need in per_fs.values():
        free = shutil.disk_usage(at).free
        if need > free:
            raise R1VError(
                f"{at}: not enough free space for {what} ({human_bytes(free)} free, about "
                f"{human_bytes(need)} needed)"
            )
