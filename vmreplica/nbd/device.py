"""What an NBD export serves: the :class:`BlockDevice` seam and a plain-file implementation.

The NBD server (:mod:`vmreplica.nbd.server`) validates every request against ``size`` before
calling a device, so a device never sees a range past its end or a malformed request. The
journaling device that captures writes for replication implements the same Protocol; the
:class:`FileBlockDevice` here serves a raw image directly and is used by tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Protocol, runtime_checkable

from vmreplica.storage.safefile import zero_range


@runtime_checkable
class BlockDevice(Protocol):
    """A byte-addressed disk the NBD server exposes as one export.

    Contract the server relies on:

    - every call is in bounds (``offset + length <= size``) and ``length`` is at most the
      server's ``max_request_bytes`` for ``read``/``write``;
    - calls may overlap in time (the server pipelines requests); the device need not order
      them, as NBD clients do not rely on the order of concurrent requests;
    - ``write(..., fua=True)`` returns only once that data is durable;
    - ``flush()`` returns only once every write this device has *completed* (on any
      connection) is durable — this is what lets the server advertise ``CAN_MULTI_CONN``;
    - ``read`` returns exactly ``length`` bytes;
    - errors are raised as :class:`OSError` with an errno (``ENOSPC``, ``EIO``, ``EPERM``...),
      which the client receives; anything else is reported as EIO.

    The server starts each call directly from its read callback and only wraps it in a task if
    it suspends, so a device that completes without awaiting (as page-cache writes do) costs
    no task switch. Consequently code before a method's first ``await`` runs outside any
    task: ``asyncio.current_task()`` is None there and ``asyncio.timeout()`` must not be
    entered before the method has awaited something.
    """

    @property
    def size(self) -> int:
        """The export size in bytes; constant while the device is served."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``."""
        ...

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        """Write ``data`` at ``offset``; with ``fua``, make it durable before returning."""
        ...

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        """Make the range read as zeroes; ``may_trim`` allows deallocating it (a hole)."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """The client no longer needs the range; its content is unspecified afterwards."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...


class FileBlockDevice:
    """A raw image file served as a block device.

    Reads and writes call ``os.pread``/``os.pwrite`` directly on the event loop: on a
    page-cached file they take a few microseconds, far less than a hop to a worker thread.
    Anything that can wait on the disk (fsync, fdatasync, zeroing large ranges) runs in a
    thread so the loop keeps serving other requests meanwhile.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        self._size = os.fstat(self._fd).st_size
        self._can_punch_holes = True
        """False once the file system has said it cannot punch holes: zeros are written then."""

    @property
    def size(self) -> int:
        """The image size in bytes, read once when the file was opened."""
        return self._size

    def close(self) -> None:
        """Close the image file; a second call is harmless."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def read(self, offset: int, length: int) -> bytes:
        """Read from the page cache; a short read means the file shrank under us."""
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path} shrank: short read at offset {offset}")
        return data

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        """Write into the page cache; with ``fua``, fdatasync before returning."""
        written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            # Regular files only write short when the disk is full; finish or raise ENOSPC.
            view = memoryview(data)
            while written < len(data):
                written += os.pwrite(self._fd, view[written:], offset + written)
        if fua:
            await asyncio.to_thread(os.fdatasync, self._fd)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        """Punch a hole when allowed and possible (reads back as zeroes), else write zeroes."""
        await asyncio.to_thread(self._zero_range, offset, length, may_trim)
        if fua:
            await asyncio.to_thread(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int) -> None:
        """Deallocate the range; zeroing it is the fallback, which is also a valid trim."""
        await asyncio.to_thread(self._zero_range, offset, length, True)

    async def flush(self) -> None:
        """fsync the image: every completed pwrite, from any connection, becomes durable."""
        await asyncio.to_thread(os.fsync, self._fd)

    def _zero_range(self, offset: int, length: int, may_punch: bool) -> None:
        punch = may_punch and self._can_punch_holes
        if not zero_range(self._fd, offset, length, punch=punch, name=self.path):
            self._can_punch_holes = False
