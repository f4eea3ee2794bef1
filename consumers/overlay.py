"""What a recovery point holds where it differs from the head image, and writing it out whole.

An :class:`Overlay` is built from the undo records newer than a point
(:meth:`vmreplica.consumers.undo.UndoLog.overlay_at`): per disk, the ranges whose content at the
point differs from the head. It keeps them on disk, not in memory — one sparse, unnamed file
per disk (``O_TMPFILE`` in the undo folder, so it is on the replica's file system and vanishes
with the process), holding each range at its own offset, and in memory only which ranges it
covers — so a view or an export costs disk space for the changes since its point, and memory
for their count, never for their bytes. A view reads the head under it;
:func:`materialize_point` writes the point out as full images.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from vmreplica.domain.intervals import IntervalSet
from vmreplica.errors import ConfigurationError
from vmreplica.storage.image import DiskImage, copy_allocated, is_zero
from vmreplica.storage.safefile import replace_atomically

PIECE_BYTES: Final = 4 * 1024 * 1024
"""Largest piece :meth:`Overlay.ranges` reads at once: bounds the memory of a walk."""


class Overlay:
    """Per disk, the ranges where a point differs from head, and their content, on disk.

    :meth:`add` only fills bytes no earlier range covers: the first record covering a byte wins.
    Zeros are not written: the file is sparse, so a covered range never written reads as zeros.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._files: dict[str, int] = {}
        self._covered: dict[str, IntervalSet] = {}

    def _file(self, disk: str) -> int:
        fd = self._files.get(disk)
        if fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder) as file:
                fd = os.dup(file.fileno())
            self._files[disk] = fd
            self._covered[disk] = IntervalSet()
        return fd

    def add(self, disk: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Cover with ``data`` those bytes of its range that no earlier range covers."""
        fd = self._file(disk)
        covered, view = self._covered[disk], memoryview(data).cast("B")
        for low, high in covered.gaps(offset, offset + len(view)):
            piece = view[low - offset : high - offset]
            if not is_zero(piece):
                _write_all(fd, piece, low)
            covered.add(low, high)

    def disks(self) -> list[str]:
        """The disks where the point differs from the head."""
        return [disk for disk, covered in self._covered.items() if len(covered)]

    def ranges(self, disk: str) -> Iterator[tuple[int, bytes]]:
        """The point's content where it differs from the head, in order, in pieces of at most
        :data:`PIECE_BYTES`."""
        fd = self._files.get(disk)
        if fd is None:
            return
        covered = self._covered[disk]
        for start, end in zip(list(covered.starts), list(covered.ends), strict=True):
            for piece in range(start, end, PIECE_BYTES):
                length = min(PIECE_BYTES, end - piece)
                yield piece, _read_all(fd, piece, length)

    @property
    def bytes_total(self) -> int:
        return sum(covered.total() for covered in self._covered.values())

    def read(self, disk: str, offset: int, length: int, head: DiskImage) -> bytes:
        """Return the point's content of a range: the overlay's bytes over the head image's."""
        merged = bytearray(head.read(offset, length))
        covered = self._covered.get(disk)
        if covered is None:
            return bytes(merged)
        fd = self._files[disk]
        for low, high in covered.covered(offset, offset + length):
            merged[low - offset : high - offset] = _read_all(fd, low, high - low)
        return bytes(merged)

    def close(self) -> None:
        """Give back the overlay's disk space; harmless twice."""
        files, self._files, self._covered = self._files, {}, {}
        for fd in files.values():
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; past the file's end (a zero range never written), zeros."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        chunks = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                chunks.append(bytes(length - got))
                break
            chunks.append(more)
            got += len(more)
        data = b"".join(chunks)
    return data


def materialize_point(
    images: Mapping[str, DiskImage],
    overlay: Overlay,
    out_paths: Mapping[str, str | os.PathLike[str]],
) -> None:
    """Write full images of a recovery point: a sparse copy of each head plus the overlay.

    Each output is replaced atomically (see :func:`vmreplica.storage.safefile.replace_atomically`).
    """
    for disk, out_path in out_paths.items():
        head = images.get(disk)
        if head is None:
            raise ConfigurationError(f"no head image of disk {disk!r} to materialize")

        def write(temporary: Path, head: DiskImage = head, disk: str = disk) -> None:
            with DiskImage.create(temporary, head.size) as target:
                copy_allocated(head, target)
                for offset, chunk in overlay.ranges(disk):
                    if is_zero(chunk):
                        target.zero(offset, len(chunk))
                    else:
                        target.write(offset, chunk)

        replace_atomically(out_path, write)
