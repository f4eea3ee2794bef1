"""The change log: every write a primary VM makes, in order, until its cycle is shipped.

What Hyper-V calls the HRL. One append-only segment file per cycle, ``<cycle:020d>.hrl``, in the
VM's ``changelog/`` folder::

    header  : magic "VMRHRL2\\n" | chain id (16 bytes) | cycle (u64) | crc32 of the above
    record  : crc32 (u32, of the fields up to the data) | body length (u32) | kind (u8)
              | disk index (u16) | offset (u64) | length (u64) | data crc32 (u32) | data

Kinds are WRITE, ZERO, TRIM, CUT (the cycle ends here: consistency and times follow) and CLOSE
(clean shutdown). A record is appended with one ``writev`` *before* the image is written, so a
killed process never leaves the image ahead of its log, and on reopen the log's unshipped records
are replayed into the image (redo) so the image is never behind it either. Records after the last
``fsync`` may be lost to a power cut; ``sync()`` is what FLUSH and FUA wait for.

The data carries its own CRC-32 (``zlib.crc32``, the checksum a write batch carries on the wire:
:func:`vmreplica.schemas.payload.checksum`), apart from the fields', so a sealed segment is parsed
from its record heads alone (:meth:`ChangeLog.sealed_segments`) and its data is checked once, by
the shipper, as it reads it to send it — the same pass that makes the wire checksum. Segments
written before (magic ``VMRHRL1``, one CRC over the fields and the data) are still read, and
checked whole as they are read.

A torn tail (a record cut short by a crash) is truncated on open. A sealed segment that fails its
checksums is not repairable: the VM then needs a resynchronization, and :class:`ChangeLogCorrupt`
says so. The *chain id* is new each time a log is created from nothing; a replica that sees it
change knows that writes may have gone unlogged.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Final

from vmreplica.errors import ChangeLogCorrupt
from vmreplica.storage.safefile import create_for_append, fsync_directory

MAGIC: Final = b"VMRHRL2\n"
MAGIC_V1: Final = b"VMRHRL1\n"
_HEADER = struct.Struct("<8s16sQ")
_HEADER_CRC = struct.Struct("<I")
_RECORD_PREFIX = struct.Struct("<II")
_BODY = struct.Struct("<BHQQ")
_HEAD = struct.Struct("<IIBHQQI")
"""A record up to its data: crc32 of the rest of this, body length, kind, disk, offset, length,
crc32 of the data."""
_HEAD_FIELDS = struct.Struct("<IBHQQI")
_HEAD_BUFFER_BYTES: Final = 256 * 1024
"""Read-ahead when parsing record heads: many small records per read, large data skipped."""
_CUT = struct.Struct("<BQQ")
SEGMENT_SUFFIX: Final = ".hrl"
HEADER_BYTES: Final = _HEADER.size + _HEADER_CRC.size


class RecordKind(IntEnum):
    WRITE = 1
    ZERO = 2
    TRIM = 3
    CUT = 4
    CLOSE = 5


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One change-log record; ``data_position`` locates WRITE data inside the segment file."""

    kind: RecordKind
    disk: int
    offset: int
    length: int
    data_position: int
    data_crc: int | None = None
    """CRC-32 of the WRITE data, not yet compared with it (a segment parsed from its record
    heads); None once checked when the segment was read, or for a segment of the old format."""


@dataclass(frozen=True, slots=True)
class CutMark:
    """How a segment was sealed: the cycle boundary's consistency and times."""

    application_consistent: bool
    started_at_ms: int
    cut_at_ms: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed or open segment as read back from disk."""

    path: Path
    cycle: int
    chain_id: bytes
    records: tuple[LogRecord, ...]
    cut: CutMark | None
    clean_close: bool
    size_bytes: int

    def read_data(self, record: LogRecord, start: int = 0, length: int | None = None) -> bytes:
        """WRITE data of ``record`` (or a slice of it), read back from the segment file."""
        length = record.length - start if length is None else length
        with self.path.open("rb") as file:
            return os.pread(file.fileno(), length, record.data_position + start)


def _segment_path(folder: Path, cycle: int) -> Path:
    return folder / f"{cycle:020d}{SEGMENT_SUFFIX}"


def pending_bytes(folder: Path) -> int:
    """Change-log bytes of a VM not yet shipped: the open segment and any sealed ones."""
    return sum(path.stat().st_size for path in folder.glob(f"*{SEGMENT_SUFFIX}"))


def read_segment(path: Path, *, repair: bool, check_data: bool = True) -> Segment:
    """Parse a segment; with ``repair`` a torn tail is truncated, else it is an error.

    ``check_data=False`` reads the record heads only and leaves each WRITE's data CRC in its
    :attr:`LogRecord.data_crc` for whoever reads the data (the shipper); a segment of the old
    format is checked whole all the same.

    :raises ChangeLogCorrupt: bad header, or damage in a segment that must be intact.
    """
    with path.open("rb", buffering=_HEAD_BUFFER_BYTES) as file:
        head = file.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise ChangeLogCorrupt(f"change-log segment {path} is shorter than its header")
        magic, chain_id, cycle = _HEADER.unpack_from(head)
        (crc,) = _HEADER_CRC.unpack_from(head, _HEADER.size)
        if magic not in (MAGIC, MAGIC_V1) or crc != zlib.crc32(head[: _HEADER.size]):
            raise ChangeLogCorrupt(f"change-log segment {path} has a damaged header")
        size = os.fstat(file.fileno()).st_size
        if magic == MAGIC_V1:
            file.seek(0)
            records, cut, clean, position = _parse_v1(file.read())
        else:
            records, cut, clean, position = _parse(file, size, check_data or repair)
    if position != size:
        if not repair or cut is not None:
            raise ChangeLogCorrupt(
                f"change-log segment {path} is damaged at byte {position} of {size}. "
                "Operator action: seed the VM's replica again (a full initial replication); the "
                "writes after that byte cannot be read from this segment."
            )
        with path.open("r+b") as file:
            file.truncate(position)
            os.fsync(file.fileno())
    return Segment(path, cycle, chain_id, tuple(records), cut, clean, position)


_Parsed = tuple[list[LogRecord], CutMark | None, bool, int]


def _parse(file: BinaryIO, size: int, check_data: bool) -> _Parsed:
    """Records of a segment in the current format, from just past its header.

    ``check_data``: read each WRITE's data and compare it with its CRC (a repair always does:
    a torn tail may end inside the data); otherwise the data is skipped and its CRC handed on.
    """
    records: list[LogRecord] = []
    cut: CutMark | None = None
    clean = False
    position = HEADER_BYTES
    while position + _HEAD.size <= size:
        head = file.read(_HEAD.size)
        if len(head) < _HEAD.size:
            break
        crc, body_length, kind_value, disk, offset, length, data_crc = _HEAD.unpack(head)
        data_length = body_length - (_HEAD.size - _RECORD_PREFIX.size)
        end = position + _RECORD_PREFIX.size + body_length
        if data_length < 0 or end > size or zlib.crc32(memoryview(head)[4:]) != crc:
            break
        try:
            kind = RecordKind(kind_value)
        except ValueError:
            break
        data_position = position + _HEAD.size
        if kind is RecordKind.CUT or check_data or kind is not RecordKind.WRITE:
            data = file.read(data_length)
            if len(data) != data_length or zlib.crc32(data) != data_crc:
                break
            if kind is RecordKind.CUT:
                consistent, started, cut_at = _CUT.unpack_from(data)
                cut = CutMark(bool(consistent), started, cut_at)
            elif kind is RecordKind.CLOSE:
                clean = True
            else:
                clean = False
                records.append(LogRecord(kind, disk, offset, length, data_position))
        else:
            file.seek(data_length, os.SEEK_CUR)
            clean = False
            records.append(LogRecord(kind, disk, offset, length, data_position, data_crc))
        position = end
    return records, cut, clean, position


def _parse_v1(data: bytes) -> _Parsed:
    """Records of a segment written before the data had a CRC of its own (``VMRHRL1``)."""
    records: list[LogRecord] = []
    cut: CutMark | None = None
    clean = False
    position = HEADER_BYTES
    while position < len(data):
        if position + _RECORD_PREFIX.size > len(data):
            break
        crc, body_length = _RECORD_PREFIX.unpack_from(data, position)
        body_start = position + _RECORD_PREFIX.size
        body_end = body_start + body_length
        if body_length < _BODY.size or body_end > len(data):
            break
        if zlib.crc32(memoryview(data)[body_start:body_end]) != crc:
            break
        kind_value, disk, offset, length = _BODY.unpack_from(data, body_start)
        kind = RecordKind(kind_value)
        if kind is RecordKind.CUT:
            consistent, started, cut_at = _CUT.unpack_from(data, body_start + _BODY.size)
            cut = CutMark(bool(consistent), started, cut_at)
        elif kind is RecordKind.CLOSE:
            clean = True
        else:
            clean = False
            records.append(LogRecord(kind, disk, offset, length, body_start + _BODY.size))
        position = body_end
    return records, cut, clean, position


class ChangeLog:
    """The open change log of one VM: append, sync, cut, and drop what was shipped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd = -1
        self.cycle = 0
        self.chain_id = b""
        self.segment_bytes = 0
        self.recovered_unclean = False

    def open(self, first_cycle: int = 1) -> list[Segment]:
        """Open (creating if needed) and return the unshipped segments, oldest first.

        The last returned segment is the open one, still being appended to. Callers replay the
        returned records into the image when :attr:`recovered_unclean` is set.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}"))
        segments = [read_segment(p, repair=(p == paths[-1])) for p in paths]
        if not segments:
            self.chain_id = uuid.uuid4().bytes
            self._start_segment(first_cycle)
            return [read_segment(_segment_path(self.folder, first_cycle), repair=False)]
        self.chain_id = segments[-1].chain_id
        self.recovered_unclean = not segments[-1].clean_close
        last = segments[-1]
        if last.cut is not None:
            self._start_segment(last.cycle + 1)
            segments.append(read_segment(_segment_path(self.folder, last.cycle + 1), repair=False))
        else:
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self.cycle = last.cycle
            self.segment_bytes = last.size_bytes
        return segments

    def _start_segment(self, cycle: int) -> None:
        """Create the segment of ``cycle``: write header, fsync file, rename, fsync folder.

        The header is written under a temporary name, so a crash never leaves a segment file
        without its header (which ``open`` would have to refuse).
        """
        header = _HEADER.pack(MAGIC, self.chain_id, cycle)
        fd = create_for_append(
            _segment_path(self.folder, cycle), (header, _HEADER_CRC.pack(zlib.crc32(header)))
        )
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.cycle = cycle
        self.segment_bytes = HEADER_BYTES

    def _append(
        self, kind: RecordKind, disk: int, offset: int, length: int, data: bytes | memoryview = b""
    ) -> None:
        fields = _HEAD_FIELDS.pack(
            _HEAD_FIELDS.size + len(data) - 4, kind, disk, offset, length, zlib.crc32(data)
        )
        head = _HEADER_CRC.pack(zlib.crc32(fields)) + fields
        expected = len(head) + len(data)
        written = os.writev(self._fd, [head, data])
        if written != expected:  # a full disk: never leave a torn record mid-segment
            os.ftruncate(self._fd, self.segment_bytes)
            raise OSError(
                errno.ENOSPC,
                f"change log {self.folder} is out of space: wrote "
                f"{written} of {expected} bytes of a record",
            )
        self.segment_bytes += written

    def write(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        self._append(RecordKind.WRITE, disk, offset, len(data), data)

    def zero(self, disk: int, offset: int, length: int) -> None:
        self._append(RecordKind.ZERO, disk, offset, length)

    def trim(self, disk: int, offset: int, length: int) -> None:
        self._append(RecordKind.TRIM, disk, offset, length)

    def sync(self) -> None:
        """Make every appended record durable (what FLUSH and FUA wait for)."""
        os.fsync(self._fd)

    def cut(self, mark: CutMark) -> int:
        """Seal the open segment as a cycle boundary and start the next; return the sealed cycle.

        Steps: (1) append the CUT record, (2) fsync the segment, (3) create and fsync the next
        segment and the folder. A crash after (2) leaves a sealed last segment, which ``open``
        completes by doing (3).
        """
        payload = _CUT.pack(int(mark.application_consistent), mark.started_at_ms, mark.cut_at_ms)
        self._append(RecordKind.CUT, 0, 0, 0, payload)
        self.sync()
        sealed = self.cycle
        self._start_segment(sealed + 1)
        return sealed

    def sealed_segments(self) -> Iterator[Segment]:
        """Sealed (cut but not yet shipped) segments, oldest first, parsed from their record
        heads: whoever reads a WRITE's data checks it against :attr:`LogRecord.data_crc`."""
        for path in sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}")):
            if path != _segment_path(self.folder, self.cycle):
                yield read_segment(path, repair=False, check_data=False)

    def drop_through(self, cycle: int) -> None:
        """Delete segments of cycles up to ``cycle``: they are committed in the journal."""
        for path in sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}")):
            if int(path.name.removesuffix(SEGMENT_SUFFIX)) <= cycle and path != _segment_path(
                self.folder, self.cycle
            ):
                path.unlink()
        fsync_directory(self.folder)

    def renumber_open_segment(self, cycle: int) -> None:
        """Make the open (empty) segment carry ``cycle`` (after a failover changes numbering)."""
        if self.cycle == cycle:
            return
        old = _segment_path(self.folder, self.cycle)
        os.close(self._fd)
        self._fd = -1
        old.unlink()
        self._start_segment(cycle)

    def close(self) -> None:
        """Append the clean-close marker, fsync, close. Harmless when already closed."""
        if self._fd < 0:
            return
        self._append(RecordKind.CLOSE, 0, 0, 0)
        self.sync()
        os.close(self._fd)
        self._fd = -1
