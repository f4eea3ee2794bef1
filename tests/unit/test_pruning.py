"""What a replica keeps does not grow with the number of cycles, and pruning it costs what it
removes, not what it keeps. No broker: a real catalog, real images and undo files.

- cycle statistics older than :data:`CYCLE_STATS_HOURS` go as new ones are written, but the
  newest row stays (an idle VM's last cycle is days old, and its cut time still counts);
- recovery points are pruned by ranges of cycles: a continuous VM keeps more points than SQLite
  takes parameters in one statement;
- continuous protection (every cycle a point) prunes by looking only at the points that aged
  out, and removes undo files by name rather than listing a folder of one file per cycle.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest

from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.consumers.materializer import Materializer
from vmreplica.consumers.retention import RetentionPolicy, settled_from_ms
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.clock import HOUR_MS, now_ms
from vmreplica.domain.model import DiskRecord, Position, RecoveryPoint, VmSettings
from vmreplica.domain.states import LastHeartbeat, ReplicationState
from vmreplica.journal.kafka import JournalRecord
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import Heartbeat
from vmreplica.storage.catalog import CYCLE_STATS_HOURS, Catalog
from vmreplica.storage.image import DiskImage

VM: Final = "web"
MINUTE_MS: Final = 60_000
DISK_BYTES: Final = 64 * 1024


async def _one_vm(catalog: Catalog) -> None:
    await catalog.add_vm(
        VM,
        "replica",
        "tg",
        "site-a",
        VmSettings(),
        [DiskRecord("disk0", "/nowhere/web.img", DISK_BYTES)],
        ReplicationState.REPLICATING,
    )


# Cycle statistics --------------------------------------------------------------------------------


async def test_cycle_statistics_older_than_the_horizon_go_and_the_newest_stays(
    tmp_path: Path,
) -> None:
    assert CYCLE_STATS_HOURS == 2
    start = 1_800_000_000_000
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        for cycle in range(1, 101):  # a cycle every 5 minutes for 8 h 15 min
            done = start + cycle * 5 * MINUTE_MS
            await catalog.advance_position(
                VM,
                Position(1, cycle, bytes(32), cycle, done),
                cut_at_ms=done - 100,
                size_bytes=cycle,
                started_at_ms=done - 5 * MINUTE_MS,
            )
        rows = await catalog.cycle_stats(VM, 0)
        # the last two hours: cycles 77-100 (cycle 76 was done exactly two hours before 100)
        assert [row[0] for row in rows] == list(range(76, 101))
        assert rows[-1] == (
            100,
            start + 500 * MINUTE_MS - 100,
            start + 500 * MINUTE_MS,
            100,
            start + 495 * MINUTE_MS,
        )

        # An idle VM ships nothing for a day: its last cycle stays, and the window finds it.
        later = start + 500 * MINUTE_MS + 24 * HOUR_MS
        assert [
            row[0] for row in await catalog.cycle_stats(VM, later - HOUR_MS, previous=True)
        ] == [100]
        assert await catalog.cycle_stats(VM, later - HOUR_MS) == []
        # A cycle then prunes everything older than two hours but itself.
        await catalog.advance_position(
            VM, Position(1, 101, bytes(32), 101, later), cut_at_ms=later - 100, size_bytes=1
        )
        assert [row[0] for row in await catalog.cycle_stats(VM, 0)] == [101]


async def test_a_catalog_from_before_gets_the_start_time_column(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE cycle_stat (vm TEXT NOT NULL, cycle INTEGER NOT NULL,"
            " cut_at_ms INTEGER NOT NULL, done_at_ms INTEGER NOT NULL,"
            " bytes INTEGER NOT NULL, PRIMARY KEY (vm, cycle))"
        )
        old.execute("INSERT INTO cycle_stat VALUES ('web', 3, 1000, 2000, 10)")
    async with Catalog(path) as catalog:
        await _one_vm(catalog)
        assert await catalog.cycle_stats(VM, 0) == [(3, 1000, 2000, 10, None)]
        await catalog.advance_position(
            VM,
            Position(1, 4, bytes(32), 40, 3000),
            cut_at_ms=2500,
            size_bytes=20,
            started_at_ms=2100,
        )
        assert await catalog.cycle_stats(VM, 0) == [
            (3, 1000, 2000, 10, None),
            (4, 2500, 3000, 20, 2100),
        ]


# Recovery points ---------------------------------------------------------------------------------


def _point(cycle: int, cut_at_ms: int) -> RecoveryPoint:
    return RecoveryPoint(cycle, 1, cycle * 2, cut_at_ms)


async def _insert_points(catalog: Catalog, points: Iterator[RecoveryPoint]) -> None:
    """Many points at once (in one transaction), as a continuous replica accumulates them."""
    await catalog.db.execute("BEGIN")
    await catalog.db.executemany(
        "INSERT INTO recovery_point (vm, cycle, epoch, journal_offset, cut_at_ms, consistency)"
        " VALUES (?, ?, ?, ?, ?, 'crash')",
        ((VM, p.cycle, p.epoch, p.journal_offset, p.cut_at_ms) for p in points),
    )
    await catalog.db.execute("COMMIT")


async def test_keeping_more_points_than_sqlite_takes_parameters(tmp_path: Path) -> None:
    limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    count = limit + 8_000
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await _insert_points(catalog, (_point(cycle, cycle) for cycle in range(1, count + 1)))
        # A day of continuous points: all but the oldest 5,000, and every 1000th of those.
        kept = [*range(1000, 5001, 1000), *range(5001, count + 1)]
        assert len(kept) > limit  # one parameter per kept cycle would be refused

        await catalog.keep_points(VM, kept)

        assert await catalog.count_points(VM) == len(kept)
        assert [p.cycle for p in await catalog.points(VM, cut_before_ms=5001)] == [
            1000,
            2000,
            3000,
            4000,
            5000,
        ]
        assert await catalog.oldest_point(VM) == 1000


async def test_keeping_points_among_the_older_ones_leaves_the_rest(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await _insert_points(catalog, (_point(cycle, cycle * 10) for cycle in range(1, 21)))
        await catalog.keep_points(VM, [3, 20], cut_before_ms=100)  # among cycles 1-9
        assert [p.cycle for p in await catalog.points(VM)] == [3, *range(10, 21)]
        await catalog.keep_points(VM, [])
        assert (await catalog.count_points(VM), await catalog.oldest_point(VM)) == (0, None)


# The materialiser's prune: continuous protection ------------------------------------------------


class CountingCatalog(Catalog):
    """A catalog that counts the recovery points it reads."""

    points_read = 0

    async def points(self, name: str, cut_before_ms: int | None = None) -> list[RecoveryPoint]:
        found = await super().points(name, cut_before_ms)
        self.points_read += len(found)
        return found


def _records(
    cycle: int, cut_at_ms: int, previous_hash: bytes, offset: int
) -> tuple[list[JournalRecord], bytes]:
    """Cycle ``cycle`` (one 4 KiB write) as the journal holds it, at ``offset``."""
    batch = write_batch(
        VM, 1, cycle, 0, [Change("disk0", (cycle % 16) * 4096, bytes([cycle % 251]) * 4096)]
    )
    commit = replace(
        cycle_commit(VM, 1, cycle, [batch], previous_hash, {"disk0": DISK_BYTES}),
        started_at_ms=cut_at_ms - 1000,
        cut_at_ms=cut_at_ms,
    )
    return (
        [
            JournalRecord(offset, VM.encode(), encode(batch), cut_at_ms),
            JournalRecord(offset + 1, VM.encode(), encode(commit), cut_at_ms),
        ],
        commit.cycle_hash,
    )


async def test_continuous_protection_prunes_what_aged_out_and_looks_at_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings = 0
    files = UndoLog._files

    def counted_files(self: UndoLog) -> Iterator[tuple[int, Path]]:
        nonlocal listings
        listings += 1
        return files(self)

    monkeypatch.setattr(UndoLog, "_files", counted_files)
    policy = RetentionPolicy("every_cycle", 1)
    now = now_ms()
    async with CountingCatalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await catalog.advance_position(VM, Position(1, 0, GENESIS_HASH, 0, now))
        image = DiskImage.create(tmp_path / "disk0.img", DISK_BYTES)
        materializer = Materializer(VM, {"disk0": image}, tmp_path / "undo", catalog, policy)
        await materializer.recover()
        # 90 cycles a minute apart up to now: the first 30 fall out of the hour as they come.
        chain, reads = GENESIS_HASH, []
        for cycle in range(1, 91):
            records, chain = _records(cycle, now - (90 - cycle) * MINUTE_MS, chain, cycle * 3)
            before = catalog.points_read
            await materializer.apply_records(records)
            reads.append(catalog.points_read - before)
        image.close()

        # The last hour's points: cycle 30 was cut an hour before the clock the last prune read.
        kept = [p.cycle for p in await catalog.points(VM)]
        assert kept == list(range(31, 91))
        horizon = settled_from_ms(policy, now_ms())
        assert horizon is not None
        assert all(p.cut_at_ms < horizon for p in await catalog.points(VM, cut_before_ms=horizon))
        # Each prune read only the points that had aged out, a couple at most, never the
        # sixty it keeps; and listed the undo folder once, on the first prune.
        assert max(reads) <= 2, reads
        assert listings == 1
        undo = UndoLog(tmp_path / "undo")
        assert undo.cycles() == list(range(kept[0] + 1, 91))  # what rebuilding a point needs


async def test_an_idle_heartbeat_counts_only_when_the_replica_holds_its_cycle(
    tmp_path: Path,
) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await catalog.advance_position(VM, Position(1, 0, GENESIS_HASH, 0, 1))
        image = DiskImage.create(tmp_path / "disk0.img", DISK_BYTES)
        materializer = Materializer(
            VM, {"disk0": image}, tmp_path / "undo", catalog, RetentionPolicy()
        )
        await materializer.recover()
        records, _ = _records(1, 5_000, GENESIS_HASH, 0)
        await materializer.apply_records(records)

        ahead = Heartbeat(VM, 1, "site-a", 9_000, 2, idle_at_ms=8_900)  # says cycle 2 exists
        await materializer.apply_records([JournalRecord(2, None, encode(ahead), 9_000)])
        assert await catalog.last_heartbeat(VM) == LastHeartbeat(9_000, None, False)
        assert await catalog.primary_seen_ms(VM) == 9_000  # alive all the same

        idle = Heartbeat(VM, 1, "site-a", 10_000, 1, idle_at_ms=9_950)
        await materializer.apply_records([JournalRecord(3, None, encode(idle), 10_000)])
        assert await catalog.last_heartbeat(VM) == LastHeartbeat(10_000, 9_950, True)
        busy = Heartbeat(VM, 1, "site-a", 11_000, 1)  # writes wait: the idle instant stays
        await materializer.apply_records([JournalRecord(4, None, encode(busy), 11_000)])
        assert await catalog.last_heartbeat(VM) == LastHeartbeat(11_000, 9_950, False)
        records, _ = _records(2, 12_000, materializer.cursor.cycle_hash, 5)
        await materializer.apply_records(records)  # a cycle supersedes what it said
        assert await catalog.last_heartbeat(VM) == LastHeartbeat(11_000, None, False)
        image.close()
