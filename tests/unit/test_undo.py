"""The undo log: file format, torn and corrupt files, rollback, overlays and materialised points."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmreplica.consumers.overlay import Overlay, materialize_point
from vmreplica.consumers.undo import (
    RECORD_DATA_MAX_BYTES,
    SealedUndo,
    UndoLog,
    UndoRecord,
)
from vmreplica.errors import (
    ConfigurationError,
    CorruptEventError,
    JournalIntegrityError,
    UndoCorruptError,
)
from vmreplica.storage.image import DiskImage, sha256_of

BLOCK = 4096
HEADER_BYTES = 24
TRAILER_BYTES = 32
RECORD_HEAD_BYTES = 28


@pytest.fixture
def log(tmp_path: Path) -> UndoLog:
    return UndoLog(tmp_path / "undo")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskImage]:
    with DiskImage.create(tmp_path / "sda.img", 64 * BLOCK) as created:
        yield created


def write_cycle(
    log: UndoLog, image: DiskImage, cycle: int, writes: list[tuple[int, bytes]]
) -> None:
    """Apply one cycle the way the materialiser does: capture, seal, then write."""
    with log.writer(cycle) as writer:
        for offset, data in writes:
            writer.capture("sda", image, offset, len(data))
        writer.seal()
    for offset, data in writes:
        image.write(offset, data)


def test_round_trip_of_raw_compressed_and_zero_records(log: UndoLog) -> None:
    incompressible = os.urandom(5000)
    compressible = b"abcd" * 2000
    with log.writer(7) as writer:
        writer.add("sda", 0, incompressible)
        writer.add("sdb", 100, compressible)
        writer.add("sda", 9000, bytes(3000))
        writer.add("sda", 20, b"")
        sealed = writer.seal()
    size = (log.path_of(7)).stat().st_size
    assert sealed == SealedUndo(7, log.path_of(7), 3, 16000, size)
    assert log.path_of(7).name == "00000000000000000007.hru"
    assert size < HEADER_BYTES + TRAILER_BYTES + 3 * (RECORD_HEAD_BYTES + 3) + 5000 + 1000
    assert list(log.records(7)) == [
        UndoRecord("sda", 0, incompressible),
        UndoRecord("sdb", 100, compressible),
        UndoRecord("sda", 9000, bytes(3000)),
    ]


def test_large_ranges_are_split_into_bounded_records(log: UndoLog) -> None:
    data = os.urandom(RECORD_DATA_MAX_BYTES + 10)
    with log.writer(1) as writer:
        writer.add("sda", 50, data)
        assert writer.seal().records == 2
    assert [(record.offset, len(record.data)) for record in log.records(1)] == [
        (50, RECORD_DATA_MAX_BYTES),
        (50 + RECORD_DATA_MAX_BYTES, 10),
    ]


def test_capture_reads_only_allocated_extents(log: UndoLog, disk: DiskImage) -> None:
    disk.write(3 * BLOCK, b"d" * BLOCK)
    with log.writer(1) as writer:
        writer.capture("sda", disk, BLOCK, 4 * BLOCK)
        writer.seal()
    assert [(r.offset, r.data) for r in log.records(1)] == [
        (BLOCK, bytes(2 * BLOCK)),
        (3 * BLOCK, b"d" * BLOCK),
        (4 * BLOCK, bytes(BLOCK)),
    ]


def test_status_missing_incomplete_complete(log: UndoLog) -> None:
    assert log.status(1) == "missing"
    writer = log.writer(1)
    writer.add("sda", 0, b"x" * 100)
    writer.close()
    assert log.status(1) == "incomplete"
    with log.writer(2) as writer:
        writer.add("sda", 0, b"x" * 100)
        writer.seal()
    assert log.status(2) == "complete"
    assert log.cycles() == [2]
    with pytest.raises(UndoCorruptError) as raised:
        list(log.records(1))
    assert (raised.value.path, raised.value.position) == (str(log.path_of(1)), 0)
    assert raised.value.problem == (
        "the file has no valid trailer (the cycle's capture was interrupted)"
    )
    with pytest.raises(UndoCorruptError, match="the undo log of cycle 3 is missing"):
        list(log.records(3))


def test_a_torn_tail_is_incomplete(log: UndoLog) -> None:
    with log.writer(4) as writer:
        writer.add("sda", 0, os.urandom(1000))
        writer.seal()
    path = log.path_of(4)
    os.truncate(path, path.stat().st_size - 1)
    assert log.status(4) == "incomplete"
    assert log.cycles() == []


def test_a_flipped_byte_is_reported_with_file_and_position(log: UndoLog) -> None:
    with log.writer(5) as writer:
        writer.add("sda", 0, b"first" * 10)
        writer.add("sda", 100, b"second" * 10)
        writer.seal()
    path = log.path_of(5)
    second = HEADER_BYTES + RECORD_HEAD_BYTES + 3 + 50
    content = bytearray(path.read_bytes())
    content[second + RECORD_HEAD_BYTES + 5] ^= 0xFF
    path.write_bytes(bytes(content))
    assert log.status(5) == "complete"
    records = log.records(5)
    assert next(records) == UndoRecord("sda", 0, b"first" * 10)
    with pytest.raises(UndoCorruptError) as raised:
        next(records)
    assert isinstance(raised.value, CorruptEventError)
    assert str(raised.value) == (
        f"{path} at byte {second}: a record fails its checksum. Operator action: recovery points "
        "older than this cycle cannot be rebuilt; if the cycle was being applied, resynchronize "
        "the VM."
    )


def test_writer_refuses_an_existing_file(log: UndoLog) -> None:
    log.writer(1).close()
    with pytest.raises(JournalIntegrityError, match="already exists"):
        log.writer(1)


def test_discard_discard_through_and_bytes_used(log: UndoLog) -> None:
    assert (log.cycles(), log.bytes_used(), log.discard_through(10)) == ([], 0, 0)
    for cycle in (1, 2, 3, 4):
        with log.writer(cycle) as writer:
            writer.add("sda", 0, b"u" * 10)
            writer.seal()
    (log.folder / "notes.txt").write_text("not an undo file")
    one_file = log.path_of(1).stat().st_size
    assert log.bytes_used() == 4 * one_file
    assert log.discard_through(2) == 2
    log.discard(4)
    log.discard(4)
    assert log.cycles() == [3]
    assert log.bytes_used() == one_file


def test_rollback_restores_and_is_idempotent(log: UndoLog, disk: DiskImage) -> None:
    disk.write(0, b"a" * 3 * BLOCK)
    before = sha256_of(disk)
    writes = [(BLOCK, b"b" * BLOCK), (40 * BLOCK, b"c" * 2 * BLOCK), (63 * BLOCK, b"d" * BLOCK)]
    write_cycle(log, disk, 1, writes)
    assert sha256_of(disk) != before
    log.rollback({"sda": disk}, 1)
    assert sha256_of(disk) == before
    log.rollback({"sda": disk}, 1)
    assert sha256_of(disk) == before
    assert list(disk.allocated_extents()) == [(0, 3 * BLOCK)]


def test_rollback_applies_overlapping_records_newest_first(log: UndoLog, disk: DiskImage) -> None:
    disk.write(0, b"o" * 2 * BLOCK)
    before = sha256_of(disk)
    with log.writer(1) as writer:
        writer.capture("sda", disk, 0, BLOCK)
        disk.write(0, b"1" * BLOCK)
        writer.capture("sda", disk, 100, BLOCK)
        disk.write(100, b"2" * BLOCK)
        writer.seal()
    log.rollback({"sda": disk}, 1)
    assert sha256_of(disk) == before


def test_rollback_changes_nothing_when_a_disk_is_unknown(log: UndoLog, disk: DiskImage) -> None:
    with log.writer(1) as writer:
        writer.add("sda", 0, b"old")
        writer.add("sdz", 0, b"old")
        writer.seal()
    disk.write(0, b"new")
    with pytest.raises(ConfigurationError, match="records for disk 'sdz' but no image"):
        log.rollback({"sda": disk}, 1)
    assert disk.read(0, 3) == b"new"


def test_rollback_of_an_unsealed_log_restores_its_durable_records(
    log: UndoLog, disk: DiskImage
) -> None:
    """A cycle applied batch by batch and cut short: each synced record's range was written,
    the torn record at the end saved a range never written."""
    disk.write(0, b"a" * BLOCK + b"b" * BLOCK)
    writer = log.writer(1)
    writer.capture("sda", disk, 0, BLOCK)
    writer.sync()
    disk.write(0, b"A" * BLOCK)  # the first batch
    writer.capture("sda", disk, BLOCK, BLOCK)
    writer.close()
    path = log.path_of(1)
    os.truncate(path, path.stat().st_size - 10)  # the second batch's record is torn
    disk.write(2 * BLOCK, b"never saved")  # cannot happen: shows the torn record is skipped
    assert log.status(1) == "incomplete"
    log.rollback({"sda": disk}, 1)
    assert disk.read(0, 2 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK
    assert disk.read(2 * BLOCK, 11) == b"never saved"
    log.writer(2).close()  # a header alone: nothing was written
    log.rollback({"sda": disk}, 2)
    assert disk.read(0, BLOCK) == b"a" * BLOCK


def test_overlay_first_record_wins_and_ranges_stay_sorted(tmp_path: Path) -> None:
    with Overlay(tmp_path) as overlay:
        overlay.add("sda", 10, b"AAAA")
        overlay.add("sda", 0, b"bbbbbbbbbbbbbbbbbbbb")
        overlay.add("sda", 30, b"C")
        overlay.add("sda", 12, b"dd")
        overlay.add("sda", 40, bytes(5))  # zeros: covered, never written
        assert list(overlay.ranges("sda")) == [
            (0, b"bbbbbbbbbbAAAAbbbbbb"),
            (30, b"C"),
            (40, bytes(5)),
        ]
        assert (overlay.disks(), overlay.bytes_total) == (["sda"], 26)
        assert list(tmp_path.iterdir()) == []  # kept in an unnamed file


def test_overlay_read_merges_over_head(disk: DiskImage, tmp_path: Path) -> None:
    disk.write(0, b"h" * 40)
    overlay = Overlay(tmp_path / "overlay")
    overlay.add("sda", 5, b"xyz")
    overlay.add("sda", 30, b"0123456789")
    assert overlay.read("sda", 2, 32, disk) == b"hhhxyz" + b"h" * 22 + b"0123"
    assert overlay.read("sdb", 0, 3, disk) == b"hhh"
    overlay.close()
    overlay.close()


def test_points_are_rebuilt_from_head_and_newer_undo(
    log: UndoLog, disk: DiskImage, tmp_path: Path
) -> None:
    digests = [sha256_of(disk)]
    cycles = [
        [(0, b"1" * BLOCK)],
        [(BLOCK // 2, b"2" * BLOCK), (10 * BLOCK, b"x" * 7)],
        [(0, b"3" * 100), (63 * BLOCK, b"e" * BLOCK)],
    ]
    for cycle, writes in enumerate(cycles, start=1):
        write_cycle(log, disk, cycle, writes)
        digests.append(sha256_of(disk))
    for point in range(4):
        out = tmp_path / f"point{point}.img"
        with log.overlay_at(point, 3) as overlay:
            materialize_point({"sda": disk}, overlay, {"sda": out})
        assert sha256_of(out) == digests[point]
    with log.overlay_at(3, 3) as overlay:
        assert overlay.disks() == []
    with log.overlay_at(0, 3) as overlay:
        assert [(offset, len(data)) for offset, data in overlay.ranges("sda")] == [
            (0, BLOCK + BLOCK // 2),
            (10 * BLOCK, 7),
            (63 * BLOCK, BLOCK),
        ]


def test_overlay_at_takes_the_durable_records_of_a_cycle_under_way(
    log: UndoLog, disk: DiskImage, tmp_path: Path
) -> None:
    """Between two fetches of a big cycle the head image is part-way into the next cycle: the
    point's content still comes out right, from that cycle's synced (unsealed) undo log."""
    write_cycle(log, disk, 1, [(0, b"1" * BLOCK)])
    at_one = sha256_of(disk)
    writer = log.writer(2)
    writer.capture("sda", disk, 0, BLOCK)
    writer.sync()
    disk.write(0, b"2" * BLOCK)
    out = tmp_path / "point1.img"
    with log.overlay_at(1, 1) as overlay:
        materialize_point({"sda": disk}, overlay, {"sda": out})
    assert sha256_of(out) == at_one
    writer.close()


def test_overlay_at_checks_its_arguments_and_needs_every_undo(
    log: UndoLog, disk: DiskImage
) -> None:
    write_cycle(log, disk, 1, [(0, b"x")])
    write_cycle(log, disk, 2, [(0, b"y")])
    with pytest.raises(ConfigurationError, match="must be between 0 and the head cycle 2"):
        log.overlay_at(3, 2)
    log.discard(1)
    with pytest.raises(UndoCorruptError, match="the undo log of cycle 1 is missing"):
        log.overlay_at(0, 2)


def test_materialize_point_needs_the_head_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no head image of disk 'sda'"):
        materialize_point({}, Overlay(tmp_path), {"sda": tmp_path / "out.img"})
