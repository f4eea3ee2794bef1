"""The undo log of one replica VM: the old content of every range each cycle overwrote.

Like Hyper-V's ``.HRU`` files, one file per cycle, ``undo/<cycle:020d>.hru``, holds the content a
cycle's writes, zeros and trims replaced, captured before the cycle touched the image. The image
always stays at the latest cycle (the head); the state after an older cycle P is the head with
the undo records of cycles head, head-1, …, P+1 applied newest first, so reconstructing a
recovery point costs what changed since it, never the disk size.

File format (little-endian; every integer fixed-width):

1. header ``<8sIIQ``: magic ``VMR-UNDO``, format version, reserved, cycle number;
2. records, each ``<BBHIQQ`` (encoding raw|zstd|zero, reserved, disk-name length, stored length,
   disk offset, data length) + CRC-32 of those fields, the disk name and the stored payload,
   then the disk name (UTF-8) and the payload (absent for zero records);
3. trailer ``<4sQQQI``: magic ``SEAL``, record count, data bytes, records length, CRC-32 of header
   and trailer fields. A file without a valid trailer at its very end is *incomplete*.

Protocol for the materialiser applying cycle C (:mod:`~vmreplica.consumers.streaming`), steps
in order, for each part of the cycle it holds (the whole cycle when it is small):

1. capture the old content of every range the part touches (:meth:`UndoWriter.capture`);
2. make it durable: :meth:`UndoWriter.sync` (fsync file, the first time the folder), or at the
   cycle's commit :meth:`UndoWriter.seal` (trailer too);
3. write the image; at the commit fsync it; 4. record the applied position.

After a crash, the next cycle's undo file (sealed or not: step 2 precedes every image write of
step 3) holds the old content of every range the image may have received:
:meth:`UndoLog.roll_back_interrupted` restores them and removes the file, then the cycle is
applied again from the journal.

About 490 lines: the file format, its writer, and the reader every use of it needs (roll-back,
recovery points' overlays, pruning) share one layout and its checks; the overlay itself is
:mod:`~vmreplica.consumers.overlay`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import zstandard

from vmreplica.consumers.overlay import Overlay
from vmreplica.errors import ConfigurationError, JournalIntegrityError, UndoCorruptError
from vmreplica.storage.image import DiskImage, is_zero
from vmreplica.storage.safefile import fsync_directory

FILE_MAGIC: Final = b"VMR-UNDO"
TRAILER_MAGIC: Final = b"SEAL"
FORMAT_VERSION: Final = 1
RECORD_DATA_MAX_BYTES: Final = 4 * 1024 * 1024
"""Largest range one record holds: bounds the memory of reading and rolling back."""
COMPRESS_MIN_BYTES: Final = 512
"""Smaller ranges are stored raw: zstd's frame overhead would eat most of the gain."""
ZSTD_LEVEL: Final = 3
WRITE_BUFFER_BYTES: Final = 1024 * 1024
NAMED_DISCARD_MAX_CYCLES: Final = 100_000
"""Beyond this many cycles to discard by name, listing the folder once is cheaper."""
_HEADER: Final = struct.Struct("<8sIIQ")
_FIELDS: Final = struct.Struct("<BBHIQQ")
_CRC: Final = struct.Struct("<I")
_TRAILER: Final = struct.Struct("<4sQQQI")
_RAW, _ZSTD, _ZERO = 0, 1, 2
_FILE_NAME: Final = re.compile(r"^(\d{20})\.hru$")
_UNSEALED: Final = "the file has no valid trailer (the cycle's capture was interrupted)"

UndoStatus = Literal["missing", "incomplete", "complete"]


@dataclass(frozen=True, slots=True)
class UndoRecord:
    """The content ``data`` that range ``offset`` of ``disk`` held before the cycle."""

    disk: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SealedUndo:
    """What :meth:`UndoWriter.seal` made durable, for statistics."""

    cycle: int
    path: Path
    records: int
    data_bytes: int
    file_bytes: int


@dataclass(frozen=True, slots=True)
class _Entry:
    position: int
    disk: str
    offset: int
    length: int
    encoding: int
    payload: bytes


def undo_file_name(cycle: int) -> str:
    return f"{cycle:020d}.hru"


class UndoWriter:
    """Writes the undo file of one cycle; it is incomplete until :meth:`seal` returns."""

    def __init__(self, folder: str | os.PathLike[str], cycle: int) -> None:
        self.cycle = cycle
        self.folder = Path(folder)
        self.path = self.folder / undo_file_name(cycle)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path, "xb", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115
        except FileExistsError:
            raise JournalIntegrityError(
                f"{self.path}: the undo log of cycle {cycle} already exists; roll it back or "
                "discard it before capturing the cycle again"
            ) from None
        self._header = _HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, cycle)
        self._file.write(self._header)
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._records = self._data_bytes = self._records_bytes = 0
        self._sealed = False
        self._named = False
        """Whether the folder was fsynced since the file was created (its name is durable)."""

    def add(self, disk: str, offset: int, old: bytes | bytearray | memoryview) -> None:
        """Record that ``disk`` held ``old`` at ``offset`` before this cycle."""
        view = memoryview(old).cast("B")
        for start in range(0, len(view), RECORD_DATA_MAX_BYTES):
            chunk = bytes(view[start : start + RECORD_DATA_MAX_BYTES])
            if is_zero(chunk):
                self._append(disk, offset + start, len(chunk), _ZERO, b"")
            elif (
                len(chunk) >= COMPRESS_MIN_BYTES
                and len(packed := self._compressor.compress(chunk)) <= len(chunk) * 7 // 8
            ):
                self._append(disk, offset + start, len(chunk), _ZSTD, packed)
            else:
                self._append(disk, offset + start, len(chunk), _RAW, chunk)

    def capture(self, disk: str, image: DiskImage, offset: int, length: int) -> None:
        """Record the current content of a range of ``image``, reading only allocated extents."""
        position = offset
        for start, size in [*image.allocated_extents(offset, length), (offset + length, 0)]:
            for hole in range(position, start, RECORD_DATA_MAX_BYTES):
                self._append(disk, hole, min(RECORD_DATA_MAX_BYTES, start - hole), _ZERO, b"")
            for piece in range(start, start + size, RECORD_DATA_MAX_BYTES):
                count = min(RECORD_DATA_MAX_BYTES, start + size - piece)
                self.add(disk, piece, image.read(piece, count))
            position = start + size

    def _append(self, disk: str, offset: int, length: int, encoding: int, payload: bytes) -> None:
        if self._sealed:
            raise JournalIntegrityError(f"{self.path}: the undo log is sealed; nothing more fits")
        name = disk.encode()
        if not name or len(name) > 0xFFFF or offset < 0:
            raise ConfigurationError(f"undo record for disk {disk!r} at offset {offset} is invalid")
        fields = _FIELDS.pack(encoding, 0, len(name), len(payload), offset, length)
        crc = zlib.crc32(payload, zlib.crc32(name, zlib.crc32(fields)))
        self._file.write(fields + _CRC.pack(crc) + name)
        self._file.write(payload)
        self._records += 1
        self._data_bytes += length
        self._records_bytes += _FIELDS.size + _CRC.size + len(name) + len(payload)

    def sync(self) -> None:
        """Make every record added so far durable, without sealing: what a cycle applied batch
        by batch does before it writes the ranges those records saved.

        1. flush and fsync the file; 2. the first time, fsync the folder (the file's name).
        After a crash the file is incomplete, and :meth:`UndoLog.rollback` restores the ranges
        its durable records saved (a torn record at its end saved a range never written).
        """
        self._file.flush()
        os.fsync(self._file.fileno())  # 1
        if not self._named:
            fsync_directory(self.folder)  # 2
            self._named = True

    def seal(self) -> SealedUndo:
        """Make the undo log complete and durable.

        1. write the trailer (counts, lengths, checksum over header and trailer);
        2. flush and fsync the file;
        3. fsync the folder, so the file's name survives a crash too.
        """
        fields = (self._records, self._data_bytes, self._records_bytes)
        crc = zlib.crc32(struct.pack("<4sQQQ", TRAILER_MAGIC, *fields), zlib.crc32(self._header))
        self._file.write(_TRAILER.pack(TRAILER_MAGIC, *fields, crc))  # 1
        self._file.flush()
        os.fsync(self._file.fileno())  # 2
        self._file.close()
        self._sealed = True
        fsync_directory(self.folder)  # 3
        size = _HEADER.size + self._records_bytes + _TRAILER.size
        return SealedUndo(self.cycle, self.path, self._records, self._data_bytes, size)

    def close(self) -> None:
        """Close without sealing (the file stays incomplete); harmless after :meth:`seal`."""
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class UndoLog:
    """The undo files of one VM, in one folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._decompressor = zstandard.ZstdDecompressor()

    def path_of(self, cycle: int) -> Path:
        return self.folder / undo_file_name(cycle)

    def writer(self, cycle: int) -> UndoWriter:
        return UndoWriter(self.folder, cycle)

    def status(self, cycle: int) -> UndoStatus:
        """Whether the undo file of ``cycle`` is missing, torn by a crash, or sealed."""
        try:
            return "complete" if self._seal_problem(cycle) is None else "incomplete"
        except FileNotFoundError:
            return "missing"

    def _seal_problem(self, cycle: int) -> str | None:
        fd = os.open(self.path_of(cycle), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size + _TRAILER.size:
                return _UNSEALED
            header = os.pread(fd, _HEADER.size, 0)
            trailer = os.pread(fd, _TRAILER.size, size - _TRAILER.size)
        finally:
            os.close(fd)
        if _HEADER.unpack(header) != (FILE_MAGIC, FORMAT_VERSION, 0, cycle):
            return f"the header is not that of a version {FORMAT_VERSION} undo log of cycle {cycle}"
        magic, _, _, records_bytes, crc = _TRAILER.unpack(trailer)
        if magic != TRAILER_MAGIC or crc != zlib.crc32(trailer[: -_CRC.size], zlib.crc32(header)):
            return _UNSEALED
        if records_bytes != size - _HEADER.size - _TRAILER.size:
            held = size - _HEADER.size - _TRAILER.size
            return f"the trailer counts {records_bytes} record bytes, the file holds {held}"
        return None

    def _files(self) -> Iterator[tuple[int, Path]]:
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if match := _FILE_NAME.match(path.name):
                    yield int(match.group(1)), path

    def cycles(self) -> list[int]:
        """The cycles whose undo file is complete, oldest first."""
        return sorted(cycle for cycle, _ in self._files() if self.status(cycle) == "complete")

    def bytes_used(self) -> int:
        return sum(path.stat().st_size for _, path in self._files())

    def discard(self, cycle: int) -> None:
        """Remove the undo file of ``cycle`` (complete or not) durably; missing is fine."""
        self.path_of(cycle).unlink(missing_ok=True)
        if self.folder.is_dir():
            fsync_directory(self.folder)

    def discard_through(self, cycle: int, after: int | None = None) -> int:
        """Remove the undo files of every cycle up to ``cycle``; return how many were removed.

        ``after``: every file up to that cycle is gone already, so only the files of the cycles
        after it are looked for, by name, instead of listing the folder (which holds a file per
        cycle of the recovery history): pruning after each cycle then costs what it removes.
        """
        if after is None or not 0 <= cycle - after <= NAMED_DISCARD_MAX_CYCLES:
            paths = [path for number, path in self._files() if number <= cycle]
        else:
            paths = [self.path_of(number) for number in range(after + 1, cycle + 1)]
        removed = 0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            fsync_directory(self.folder)
        return removed

    @contextmanager
    def _mapped(self, cycle: int, sealed: bool = True) -> Iterator[tuple[Path, mmap.mmap | None]]:
        """Map the undo file of ``cycle`` read-only (None: an unsealed file without records).

        :raises UndoCorruptError: the file is missing, or incomplete when ``sealed``.
        """
        path = self.path_of(cycle)
        try:
            problem = self._seal_problem(cycle) if sealed else None
            size = path.stat().st_size
        except FileNotFoundError:
            problem = f"the undo log of cycle {cycle} is missing"
        if problem is not None:
            raise UndoCorruptError(str(path), 0, problem)
        if size <= _HEADER.size:
            yield path, None
            return
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield path, data

    def _readable(self, cycle: int) -> bool:
        """Whether :meth:`rollback` and :meth:`overlay_at` take records from ``cycle``'s file:
        sealed, or cut short by a crash or an abandoned apply (its durable records)."""
        return self.status(cycle) != "missing"

    def _records_of(self, cycle: int, path: Path, data: mmap.mmap | None) -> Iterator[_Entry]:
        """The records of a mapped file: all of a sealed one (checked against its trailer),
        the durable prefix of an unsealed one (up to its first torn or missing record)."""
        if data is None:
            return iter(())
        if self.status(cycle) == "complete":
            return self._entries(path, data)
        return self._prefix(path, data, cycle)

    @staticmethod
    def _prefix(path: Path, data: mmap.mmap, cycle: int) -> Iterator[_Entry]:
        if _HEADER.unpack(data[: _HEADER.size]) != (FILE_MAGIC, FORMAT_VERSION, 0, cycle):
            return
        position = _HEADER.size
        while position < len(data):
            try:
                entry, position = UndoLog._entry_at(path, data, position, len(data))
            except UndoCorruptError:
                return  # the torn end of an unsealed file: nothing after it reached an image
            yield entry

    @staticmethod
    def _entries(path: Path, data: mmap.mmap) -> Iterator[_Entry]:
        """Walk the records of a mapped sealed file, checking each and the record count."""
        _, records, _, records_bytes, _ = _TRAILER.unpack(data[-_TRAILER.size :])
        position, end, count = _HEADER.size, _HEADER.size + records_bytes, 0
        while position < end:
            entry, position = UndoLog._entry_at(path, data, position, end)
            count += 1
            yield entry
        if count != records:
            raise UndoCorruptError(
                str(path), end, f"the trailer counts {records} records, the file holds {count}"
            )

    @staticmethod
    def _entry_at(path: Path, data: mmap.mmap, position: int, end: int) -> tuple[_Entry, int]:
        """Parse and check the record at ``position``; return it and where the next one starts."""
        head_end = position + _FIELDS.size + _CRC.size
        if head_end > end:
            raise UndoCorruptError(str(path), position, "a record header runs past the trailer")
        fields = data[position : position + _FIELDS.size]
        encoding, _, name_size, stored, offset, length = _FIELDS.unpack(fields)
        (crc,) = _CRC.unpack(data[position + _FIELDS.size : head_end])
        name = data[head_end : head_end + name_size]
        following = head_end + name_size + stored
        payload = data[head_end + name_size : following]
        if following > end or crc != zlib.crc32(payload, zlib.crc32(name, zlib.crc32(fields))):
            raise UndoCorruptError(str(path), position, "a record fails its checksum")
        if encoding not in (_RAW, _ZSTD, _ZERO):
            raise UndoCorruptError(str(path), position, f"unknown record encoding {encoding}")
        try:
            disk = name.decode()
        except UnicodeDecodeError:
            raise UndoCorruptError(str(path), position, "a disk name is not UTF-8") from None
        return _Entry(position, disk, offset, length, encoding, payload), following

    def _decode(self, path: Path, entry: _Entry) -> bytes:
        if entry.encoding == _ZERO:
            return bytes(entry.length)
        data = entry.payload
        if entry.encoding == _ZSTD:
            try:
                data = self._decompressor.decompress(data, max_output_size=entry.length)
            except zstandard.ZstdError as error:
                raise UndoCorruptError(str(path), entry.position, f"zstd: {error}") from None
        if len(data) != entry.length:
            raise UndoCorruptError(
                str(path),
                entry.position,
                f"a record decodes to {len(data)} bytes, not {entry.length}",
            )
        return data

    def records(self, cycle: int) -> Iterator[UndoRecord]:
        """The verified records of a sealed cycle, in the order they were added.

        :raises UndoCorruptError: the file is missing, incomplete or fails a checksum.
        """
        with self._mapped(cycle) as (path, data):
            assert data is not None  # a sealed file holds at least its trailer
            for entry in self._entries(path, data):
                yield UndoRecord(entry.disk, entry.offset, self._decode(path, entry))

    def rollback(self, image_by_disk: Mapping[str, DiskImage], cycle: int) -> None:
        """Restore the images to their content before ``cycle``; running it twice is harmless.

        A sealed file restores every range the cycle wrote; an unsealed one (a cycle applied
        batch by batch, cut short) the ranges of its durable records, which are all the ranges
        the cycle wrote so far (:meth:`UndoWriter.sync` precedes every image write).

        1. verify every record (checksum, decoding, disk known, range inside the image), so a
           corrupt log changes nothing;
        2. write the records newest first — where ranges overlap, the first-added record holds
           the content from before the cycle and is written last;
        3. fsync the images.

        :raises UndoCorruptError: the file is missing, or a sealed one fails a check.
        """
        touched: dict[str, DiskImage] = {}
        with self._mapped(cycle, sealed=False) as (path, data):
            positions: list[int] = []
            for entry in self._records_of(cycle, path, data):  # 1
                self._decode(path, entry)
                image = image_by_disk.get(entry.disk)
                if image is None:
                    raise ConfigurationError(
                        f"{path}: records for disk {entry.disk!r} but no "
                        "image of that disk was given"
                    )
                if entry.offset + entry.length > image.size:
                    raise UndoCorruptError(
                        str(path),
                        entry.position,
                        f"a record ends beyond {image.path} ({image.size} bytes)",
                    )
                positions.append(entry.position)
                touched[entry.disk] = image
            for position in reversed(positions):  # 2
                assert data is not None
                entry, _ = self._entry_at(path, data, position, len(data))
                if entry.encoding == _ZERO:
                    touched[entry.disk].zero(entry.offset, entry.length)
                else:
                    touched[entry.disk].write(entry.offset, self._decode(path, entry))
        for image in touched.values():
            image.fsync()  # 3

    def roll_back_interrupted(self, image_by_disk: Mapping[str, DiskImage], applied: int) -> bool:
        """Return the images to cycle ``applied`` (the position the catalog records) if the
        apply of the next cycle was cut short — by a crash, a full disk, or a stop half-way
        through a big cycle — and remove its undo log; returns whether there was one.

        Only that cycle can have been in flight, and its undo log, sealed or not, holds the old
        content of every range it wrote (:meth:`UndoWriter.sync` precedes every image write).
        """
        interrupted = applied + 1
        if self.status(interrupted) == "missing":
            return False
        self.rollback(image_by_disk, interrupted)
        self.discard(interrupted)
        return True

    def overlay_at(self, point_cycle: int, head_cycle: int) -> Overlay:
        """The ranges where the state after ``point_cycle`` differs from the head image, in an
        :class:`Overlay` kept on disk (an unnamed file in this folder; close it after use).

        Cycles point+1 … head are read oldest first and the first record covering a byte wins:
        the oldest cycle touching a byte saved its content as it was at the point. The undo
        file of cycle head+1, if any, comes last: that cycle's apply is under way (batch by
        batch) or was cut short, and its durable records hold the head's content of every
        range it wrote so far.
        """
        if not 0 <= point_cycle <= head_cycle:
            raise ConfigurationError(
                f"recovery point cycle {point_cycle} must be between 0 and "
                f"the head cycle {head_cycle}"
            )
        overlay = Overlay(self.folder)
        try:
            for cycle in range(point_cycle + 1, head_cycle + 2):
                if cycle == head_cycle + 1 and not self._readable(cycle):
                    break
                with self._mapped(cycle, sealed=cycle <= head_cycle) as (path, data):
                    for entry in self._records_of(cycle, path, data):
                        overlay.add(entry.disk, entry.offset, self._decode(path, entry))
        except BaseException:
            overlay.close()
            raise
        return overlay
