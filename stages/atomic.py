"""Atomic outputs: write to a temporary sibling, then rename, so that a killed or failed stage never
leaves a half-written file where a later stage or DVC could take it for a result."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether `exc` is an errno-less short write (numpy's report of a full disk: "N requested
    and M written") on a file system with no space left."""
    if not isinstance(exc, OSError) or exc.errno is not None:
        return False
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


def _raise_naming(exc: BaseException, path: str, force: bool = False, disk_full: bool = False) -> None:
    """Re-raise an OS error (ENOSPC, EIO, ...) that names no file, or with `force` one that names
    a temporary file, as the same error naming the output `path`; anything else returns."""
    if not isinstance(exc, OSError) or not (force or exc.filename is None):
        return
    if disk_full:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({exc})", path) from exc
    if exc.errno is not None and exc.strerror is not None:
        raise OSError(exc.errno, exc.strerror, path) from exc
    raise OSError(f"writing {path}: {exc}") from exc


def _raise_naming_inside(exc: BaseException, tmp: Path, path: Path) -> None:
    """Re-raise an OS error about a file inside the temporary folder `tmp` naming its place in
    the output folder `path` instead; anything else returns."""
    if not isinstance(exc, OSError):
        return
    inside = f"{tmp}/"
    if isinstance(exc.filename, str) and exc.filename.startswith(inside):
        _raise_naming(exc, str(path / exc.filename[len(inside):]), force=True)
    if exc.filename is None and exc.errno is None and inside in str(exc):
        raise OSError(str(exc).replace(inside, f"{path}/")) from exc


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it is flushed, fsynced and renamed onto
    `path`; on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from a shared group
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        disk_full = _disk_full(exc, path.parent)  # before the temp file's space is freed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_naming(exc, str(path), disk_full=disk_full)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, so reruns give identical bytes)."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file and a rename."""
    import torch

    with atomic_file(path, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:
            # torch's zip writer reports a failed write (a full disk) as "unexpected pos ..."
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from exc
            raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory output in a temporary sibling; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming_inside(exc, tmp, path)
        raise
