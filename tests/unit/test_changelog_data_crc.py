"""The change log's data CRC: sealed segments are parsed from their record heads, and the
shipper checks every byte of data against the CRC it was logged with as it reads it to send it.

Damage in a sealed segment's data is therefore still found before anything is published
(``ChangeLogCorrupt``), whether the damaged write is sent whole, in part (overwritten later in
the cycle), or split between two batches; segments written by the previous format are read.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from vmreplica.errors import ChangeLogCorrupt
from vmreplica.producers.changelog import (
    HEADER_BYTES,
    MAGIC_V1,
    ChangeLog,
    CutMark,
    RecordKind,
    read_segment,
)
from vmreplica.producers.shipper import BATCH_PAYLOAD_BYTES, CycleBuilder
from vmreplica.schemas.events import DiskSize, ExtentKind

KiB = 1024
MiB = 1024 * KiB
DISKS = (DiskSize("a", 64 * MiB),)


def _sealed(folder: Path, writes: list[tuple[int, bytes]]) -> ChangeLog:
    log = ChangeLog(folder)
    log.open()
    for offset, data in writes:
        log.write(0, offset, data)
    log.cut(CutMark(False, 1, 2))
    return log


def _shipped(log: ChangeLog) -> dict[int, bytes]:
    """What the builder would send: disk offset -> data, read back from the payloads."""
    segment = next(iter(log.sealed_segments()))
    sent: dict[int, bytes] = {}
    builder = CycleBuilder("vm", 1, DISKS, compress=False)
    for extents, payload in builder.extents_and_payloads(segment):
        for extent in extents:
            if extent.kind is ExtentKind.DATA:
                data = payload[extent.payload_offset : extent.payload_offset + extent.length]
                assert zlib.crc32(data) == extent.crc32
                sent[extent.offset] = data
    return sent


def _damage(log: ChangeLog, record_index: int, at: int) -> None:
    """Flip one byte of the data of the ``record_index``-th record of the sealed segment."""
    segment = next(iter(log.sealed_segments()))
    record = segment.records[record_index]
    with segment.path.open("r+b") as file:
        file.seek(record.data_position + at)
        byte = file.read(1)
        file.seek(record.data_position + at)
        file.write(bytes([byte[0] ^ 0x40]))


def test_sealed_segments_carry_the_data_crc_and_a_full_read_checks_it(tmp_path: Path) -> None:
    data = os.urandom(64 * KiB)
    log = _sealed(tmp_path, [(0, data)])
    [record] = next(iter(log.sealed_segments())).records
    assert record.data_crc == zlib.crc32(data)
    assert _shipped(log) == {0: data}
    _damage(log, 0, 100)
    # A full read (what open and failover use) refuses the damaged sealed segment.
    with pytest.raises(ChangeLogCorrupt):
        read_segment(next(iter(log.sealed_segments())).path, repair=False)
    log.close()


@pytest.mark.parametrize(
    ("writes", "damaged", "at"),
    [
        ([(0, os.urandom(64 * KiB))], 0, 5),  # sent whole
        ([(0, os.urandom(64 * KiB)), (4 * KiB, os.urandom(4 * KiB))], 0, 60 * KiB),  # in part
        ([(0, os.urandom(4 * MiB - 8 * KiB)), (8 * MiB, os.urandom(64 * KiB))], 1, 30 * KiB),
    ],
    ids=["whole", "partly-overwritten", "split-between-batches"],
)
def test_the_shipper_finds_damaged_data_before_publishing(
    tmp_path: Path, writes: list[tuple[int, bytes]], damaged: int, at: int
) -> None:
    log = _sealed(tmp_path, writes)
    if damaged == 1:  # the second write straddles the first batch's end
        assert len(writes[0][1]) + len(writes[1][1]) > BATCH_PAYLOAD_BYTES
    expected = dict(writes)
    sent = _shipped(log)
    assert b"".join(sent[o] for o in sorted(sent) if o >= 8 * MiB) == expected.get(8 * MiB, b"")
    _damage(log, damaged, at)
    with pytest.raises(ChangeLogCorrupt, match="differs from what was logged"):
        _shipped(log)
    log.close()


def test_a_torn_tail_inside_the_data_is_truncated_on_open(tmp_path: Path) -> None:
    log = ChangeLog(tmp_path)
    log.open()
    log.write(0, 0, os.urandom(4 * KiB))
    log.write(0, 8 * KiB, os.urandom(64 * KiB))
    path = tmp_path / f"{log.cycle:020d}.hrl"
    os.close(log._fd)
    os.truncate(path, path.stat().st_size - 100)  # the second write's data torn
    reopened = ChangeLog(tmp_path)
    [segment] = reopened.open()
    assert [(r.offset, r.length) for r in segment.records] == [(0, 4 * KiB)]
    assert reopened.recovered_unclean
    reopened.close()


def test_a_segment_of_the_previous_format_is_read_and_shipped(tmp_path: Path) -> None:
    """``VMRHRL1``: one CRC over the fields and the data; still unshipped after an upgrade."""
    chain = os.urandom(16)
    header = struct.pack("<8s16sQ", MAGIC_V1, chain, 1)
    parts = [header, struct.pack("<I", zlib.crc32(header))]
    data = os.urandom(64 * KiB)

    def record(kind: RecordKind, offset: int, length: int, payload: bytes) -> bytes:
        body = struct.pack("<BHQQ", kind, 0, offset, length) + payload
        return struct.pack("<II", zlib.crc32(body), len(body)) + body

    parts.append(record(RecordKind.WRITE, 4 * KiB, len(data), data))
    parts.append(record(RecordKind.CUT, 0, 0, struct.pack("<BQQ", 0, 5, 6)))
    (tmp_path / f"{1:020d}.hrl").write_bytes(b"".join(parts))
    assert len(header) + 4 == HEADER_BYTES
    log = ChangeLog(tmp_path)
    segments = log.open()
    assert [s.cycle for s in segments] == [1, 2]
    assert segments[0].cut == CutMark(False, 5, 6)
    assert _shipped(log) == {4 * KiB: data}
    log.close()
