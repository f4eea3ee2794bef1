"""Durable files: the one implementation of every crash-safety step vmreplica takes on a file.

- **Atomic replace** (:func:`replace_atomically`, :func:`create_for_append`): a file is written
  under a temporary name, fsynced, renamed over its name and its folder fsynced, so after a
  crash the name holds the old content or the new, whole.
- **Durable folder entries** (:func:`fsync_directory`): creating, renaming or removing a file
  is itself only durable once its folder is fsynced.
- **Locks** (:func:`exclusive_lock`): ``flock`` on a lock file, between processes of one machine.
- **A full file system** (:func:`no_space`): what ENOSPC, a quota, or SQLite's "database or
  disk is full" look like, so that callers can pause instead of failing.
- **Holes** (:func:`punch_hole`, :func:`write_zeros`, :func:`zero_range`): make a range of a file
  read as zeros, releasing its storage where the file system can (``fallocate(2)`` with
  ``FALLOC_FL_PUNCH_HOLE``) and writing zeros where it cannot.

Everything here works on paths and file descriptors only, below images and block devices, so both
:mod:`vmreplica.storage.image` and :mod:`vmreplica.nbd.device` build on it without importing each
other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

ZERO_FILL_BYTES: Final = 4 * 1024 * 1024
"""Zeros are written in pieces of this size where a hole cannot be punched."""
_ZEROS: Final = memoryview(bytes(ZERO_FILL_BYTES))
# fallocate(2) modes; Python's os module exposes only posix_fallocate, which cannot free space.
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_CANNOT_PUNCH: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
"""What fallocate answers where the file system (or kernel) cannot punch holes. EINVAL is among
them: some file systems give it for a mode they do not implement, and the callers here only ask
for in-bounds, non-empty ranges, so it cannot mean a bad argument."""

Writer = Callable[[Path], None]
"""Creates the new content of a file at the temporary path it is given."""


NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(error: BaseException) -> str | None:
    """What says the file system is full in ``error`` (``os.strerror``, or SQLite's message), or
    None when it is another error. Looks through ``__cause__`` chains."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return os.strerror(error.errno)
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == (
            sqlite3.SQLITE_FULL
        ):
            return str(error)
        error = error.__cause__  # type: ignore[assignment]
    return None


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the entries of a folder (created, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike[str], write: Writer) -> None:
    """Replace ``path`` with a file that ``write`` creates, so a crash leaves old or new, whole.

    Steps, in this order for crash safety:

    1. ``write(temporary)`` creates the new file under a unique name in the same folder;
    2. the temporary file is fsynced, so its content is durable before it gets the name;
    3. ``os.replace`` renames it over ``path`` (atomic within one file system);
    4. the folder is fsynced, so the rename itself survives a crash.

    On any error before step 3 the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)  # 1
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # 2
        finally:
            os.close(fd)
        os.replace(temporary, target)  # 3
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)  # 4


def _write_all(fd: int, parts: Iterable[bytes | bytearray | memoryview]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


def create_for_append(
    path: str | os.PathLike[str], parts: Iterable[bytes | bytearray | memoryview]
) -> int:
    """Replace ``path`` atomically with ``parts``; return a descriptor that appends to it.

    For append-only files whose first bytes (a header) must never be seen torn: the name only
    ever holds a file whose initial content is complete and durable. The caller owns the
    descriptor.
    """
    opened: list[int] = []

    def write(temporary: Path) -> None:
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        opened.append(fd)
        _write_all(fd, parts)

    try:
        replace_atomically(path, write)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return opened[0]


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder if missing).

    Between processes of one machine; the lock goes with the process, so a crash never leaves it
    held.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """Return libc ``fallocate`` (Linux), or None where the platform has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int, name: str = "") -> bool:
    """Deallocate a non-empty range of a file, which then reads as zeros; the size stays.

    Returns False, having changed nothing, where the platform or the file system cannot punch
    holes (the caller then writes zeros: :func:`zero_range`).

    :raises OSError: any other failure (``EIO``, ``EBADF``...); ``name`` is the file it names.
    """
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_PUNCH:
        return False
    raise OSError(code, os.strerror(code), name or None)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (storage stays allocated)."""
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, _ZEROS[: min(ZERO_FILL_BYTES, end - offset)], offset)


def zero_range(fd: int, offset: int, length: int, *, punch: bool = True, name: str = "") -> bool:
    """Make a range read as zeros: a hole where ``punch`` allows and the file system can, else
    written zeros.

    Returns False when a hole was tried and the file system cannot punch one, so a caller that
    zeroes often may stop trying; True otherwise.
    """
    if not length:
        return True
    if punch and punch_hole(fd, offset, length, name):
        return True
    write_zeros(fd, offset, length)
    return not punch
