"""What a recovery point holds where it differs from the head image, and writing it out whole.

An :class:`Overlay` is built from the undo records newer than a point
(:meth:`vmreplica.consumers.undo.UndoLog.overlay_at`): per disk, the ranges whose content at the
point differs from the head. A view reads the head under it; :func:`materialize_point` writes
the point out as full images.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from pathlib import Path

from vmreplica.errors import ConfigurationError
from vmreplica.storage.image import DiskImage, copy_allocated, is_zero
from vmreplica.storage.safefile import replace_atomically


class Overlay(Mapping[str, tuple[tuple[int, bytes], ...]]):
    """Per disk, sorted non-overlapping ``(offset, bytes)`` ranges where a point differs from head.

    :meth:`add` only fills bytes no earlier range covers: the first record covering a byte wins.
    """

    def __init__(self) -> None:
        self._starts: dict[str, list[int]] = {}
        self._chunks: dict[str, list[bytes]] = {}

    def add(self, disk: str, offset: int, data: bytes) -> None:
        """Cover with ``data`` those bytes of its range that no earlier range covers."""
        starts, chunks = self._starts.setdefault(disk, []), self._chunks.setdefault(disk, [])
        end, view = offset + len(data), memoryview(data)
        index = bisect_right(starts, offset)
        position = max(offset, starts[index - 1] + len(chunks[index - 1]) if index else offset)
        while position < end:
            gap_end = min(starts[index], end) if index < len(starts) else end
            if position < gap_end:
                starts.insert(index, position)
                whole = gap_end - position == len(data)
                chunks.insert(
                    index, data if whole else bytes(view[position - offset : gap_end - offset])
                )
                index += 1
            if gap_end == end:
                break
            position, index = starts[index] + len(chunks[index]), index + 1

    def __getitem__(self, disk: str) -> tuple[tuple[int, bytes], ...]:
        return tuple(zip(self._starts[disk], self._chunks[disk], strict=True))

    def __iter__(self) -> Iterator[str]:
        return iter(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def bytes_total(self) -> int:
        return sum(len(chunk) for chunks in self._chunks.values() for chunk in chunks)

    def read(self, disk: str, offset: int, length: int, head: DiskImage) -> bytes:
        """Return the point's content of a range: the overlay's bytes over the head image's."""
        merged = bytearray(head.read(offset, length))
        starts, chunks = self._starts.get(disk, []), self._chunks.get(disk, [])
        end = offset + length
        index = max(bisect_right(starts, offset) - 1, 0)
        while index < len(starts) and starts[index] < end:
            start, chunk = starts[index], chunks[index]
            low, high = max(start, offset), min(start + len(chunk), end)
            if low < high:
                merged[low - offset : high - offset] = memoryview(chunk)[low - start : high - start]
            index += 1
        return bytes(merged)


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
                for offset, chunk in overlay.get(disk, ()):
                    if is_zero(chunk):
                        target.zero(offset, len(chunk))
                    else:
                        target.write(offset, chunk)

        replace_atomically(out_path, write)
