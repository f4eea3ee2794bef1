"""Sparse raw disk images: the one module of vmreplica that touches image files.

A :class:`DiskImage` is a raw file whose length is the disk's logical size. Unwritten and zeroed
ranges are holes, so a replica of a mostly empty 1 TiB disk costs what the guest wrote, and
digests, copies and views walk only the allocated extents (``SEEK_DATA``/``SEEK_HOLE``) instead of
the whole disk. Every access is bounds-checked against the logical size: a journal event that
does not fit the disk is a typed error, never a silently grown file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from vmreplica.errors import ConfigurationError, OutOfBoundsError
from vmreplica.storage.safefile import replace_atomically, zero_range

IO_CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Unit of streamed reads, digests and copies: large enough for few syscalls, small for memory."""
_ZERO_CHUNK: Final = bytes(IO_CHUNK_BYTES)
_ZERO_VIEW: Final = memoryview(_ZERO_CHUNK)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte of ``data`` is zero (an empty range is).

    One ``memcmp`` against preallocated zeros per :data:`IO_CHUNK_BYTES`, without copying
    ``data``; data that is not zero almost always differs at once, so it costs next to nothing.
    This is what decides which ranges are sent, logged or kept as holes, so every caller asks it.
    """
    view = memoryview(data)
    for start in range(0, len(view), IO_CHUNK_BYTES):
        if not _ZERO_CHUNK.startswith(view[start : start + IO_CHUNK_BYTES]):
            return False
    return True


class DiskImage:
    """An open sparse raw image of fixed logical size; use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self._path = path
        self._fd = fd
        self._size = size

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> DiskImage:
        """Create a new all-hole image of ``size`` bytes.

        :raises ConfigurationError: the size is negative or the file already exists (an existing
            image is never overwritten by accident).
        """
        if size < 0:
            raise ConfigurationError(f"{path}: a disk size cannot be negative, got {size}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"{path}: the image already exists; remove it or open it instead"
            ) from None
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)  # an empty file left behind would later open as a 0-byte disk
            raise
        return cls(Path(path), fd, size)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True) -> DiskImage:
        """Open an existing image; its logical size is the file's length."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        return cls(Path(path), fd, os.fstat(fd).st_size)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfBoundsError(str(self._path), offset, length, self._size)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``; bytes past the end of the file read as zeros."""
        self._check(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            part = os.pread(self._fd, length - done, offset + done)
            if not part:
                parts.append(bytes(length - done))
                break
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the content at ``offset``, without allocating (zeros past EOF)."""
        self._check(offset, len(buffer))
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:
                break
            done += count
        while done < len(buffer):
            count = min(IO_CHUNK_BYTES, len(buffer) - done)
            buffer[done : done + count] = _ZERO_VIEW[:count]
            done += count

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (not durable until :meth:`fsync`)."""
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros, releasing its storage where the file system can."""
        self._check(offset, length)
        zero_range(self._fd, offset, length, name=str(self._path))

    def trim(self, offset: int, length: int) -> None:
        """Discard a range. It then reads as zeros, as on the primary, so digests stay equal."""
        self.zero(offset, length)

    def resize(self, new_size: int) -> None:
        """Grow (with a hole) or shrink (dropping the tail) the disk to ``new_size`` bytes."""
        if new_size < 0:
            raise ConfigurationError(
                f"{self._path}: a disk size cannot be negative, got {new_size}"
            )
        os.ftruncate(self._fd, new_size)
        self._size = new_size

    def allocated_extents(
        self, offset: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` of the data regions within a range (default: the disk).

        Holes are skipped using ``SEEK_DATA``/``SEEK_HOLE``; where the file system cannot say,
        the whole range is reported as data, which is slower but never wrong.
        """
        end = self._size if length is None else offset + length
        self._check(offset, end - offset)
        position = offset
        while position < end:
            try:
                start = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    return
                if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield position, end - position
                    return
                raise
            if start >= end:
                return
            stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
            yield start, stop - start
            position = stop

    def fsync(self) -> None:
        """Make every completed write durable."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file; a second call is harmless."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiskImage({str(self._path)!r}, size={self._size})"


def sha256_of(image: DiskImage | str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a disk's whole logical content, holes hashed as zeros.

    Only allocated extents are read; zero runs are fed from one preallocated buffer, so a sparse
    disk hashes at memory speed.
    """
    if not isinstance(image, DiskImage):
        with DiskImage.open(image, writable=False) as opened:
            return sha256_of(opened)
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(IO_CHUNK_BYTES))
    position = 0
    for start, length in [*image.allocated_extents(), (image.size, 0)]:
        for _, count in _chunks(position, start - position):
            digest.update(_ZERO_VIEW[:count])
        for offset, count in _chunks(start, length):
            image.read_into(offset, buffer[:count])
            digest.update(buffer[:count])
        position = start + length
    return digest.hexdigest()


def _chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Split a range into ``(offset, length)`` pieces of at most :data:`IO_CHUNK_BYTES`."""
    for start in range(offset, offset + length, IO_CHUNK_BYTES):
        yield start, min(IO_CHUNK_BYTES, offset + length - start)


def copy_allocated(source: DiskImage, target: DiskImage) -> None:
    """Copy the allocated extents of ``source`` into ``target`` (same size), keeping holes.

    All-zero chunks inside data extents are not written either, so the copy is as sparse as the
    content allows.
    """
    if target.size != source.size:
        raise ConfigurationError(
            f"cannot copy {source.path} ({source.size} bytes) into {target.path} "
            f"({target.size} bytes): the sizes differ"
        )
    buffer = memoryview(bytearray(IO_CHUNK_BYTES))
    for start, length in source.allocated_extents():
        for offset, count in _chunks(start, length):
            chunk = buffer[:count]
            source.read_into(offset, chunk)
            if not is_zero(chunk):
                target.write(offset, chunk)


def sparse_copy(source: DiskImage, target_path: str | os.PathLike[str]) -> None:
    """Write a sparse copy of ``source`` to ``target_path``, replacing it atomically."""

    def write(temporary: Path) -> None:
        with DiskImage.create(temporary, source.size) as target:
            copy_allocated(source, target)

    replace_atomically(target_path, write)


def nonzero_chunks(image: DiskImage, start: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of the allocated chunks of ``image`` from ``start`` that are not all zero,
    aligned to ``chunk_bytes``: what an initial copy sends (holes and zero blocks are skipped)."""
    for extent_offset, length in image.allocated_extents(start):
        position, end = extent_offset, extent_offset + length
        while position < end:
            take = min(chunk_bytes - position % chunk_bytes, end - position)
            data = image.read(position, take)
            if not is_zero(data):
                yield position, data
            position += take
