"""What a replica's status records say of it: its real state and the health `vmreplica status`
computes, never a fixed "replicating" / "normal" (``ReplicaVm.standing``). No broker: the
worker is built but not started, and its catalog is written directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmreplica.consumers.replica import HEALTH_REFRESH_MS, ReplicaVm
from vmreplica.domain.model import DiskRecord, Position, VmSettings
from vmreplica.domain.states import Health, ReplicationState
from vmreplica.journal.kafka import KafkaConnection
from vmreplica.storage.catalog import Catalog

NOW_MS = 1_800_000_000_000


async def test_a_published_position_carries_the_measured_state_and_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [NOW_MS]
    monkeypatch.setattr(time, "time", lambda: clock[0] / 1000)
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await catalog.add_vm(
            "db",
            "replica",
            "tg",
            "site-a",
            VmSettings(frequency_seconds=30),
            [DiskRecord("disk0", str(tmp_path / "db.img"), 4096)],
            ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
        )
        worker = ReplicaVm(
            await catalog.vm("db"),
            "site-b",
            tmp_path,
            KafkaConnection("127.0.0.1:1", client_id="site-b"),
            catalog,
            "journal",
            "status",
        )
        try:
            assert await worker.standing() == (
                ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                Health.WARNING,
            )
            await catalog.set_state("db", ReplicationState.REPLICATING)
            await catalog.advance_position(
                "db", Position(1, 1, bytes(32), 5, NOW_MS), cut_at_ms=NOW_MS - 500, size_bytes=1
            )
            # a new state is measured at once
            assert await worker.standing() == (ReplicationState.REPLICATING, Health.NORMAL)
            assert await worker.standing(ReplicationState.RESYNCHRONIZATION_REQUIRED) == (
                ReplicationState.RESYNCHRONIZATION_REQUIRED,
                Health.CRITICAL,
            )
            # the primary falls silent: 16 minutes later the replica says it is critical
            clock[0] = NOW_MS + 16 * 60_000
            assert await worker.standing() == (ReplicationState.REPLICATING, Health.CRITICAL)
            # in the same state, a health measured less than five seconds ago is reused
            await catalog.advance_position(
                "db",
                Position(1, 2, bytes(32), 9, clock[0]),
                cut_at_ms=clock[0] - 500,
                size_bytes=1,
            )
            assert await worker.standing() == (ReplicationState.REPLICATING, Health.CRITICAL)
            clock[0] += HEALTH_REFRESH_MS  # heard again: no longer critical, but the outage's
            # missed cycles stay in the window
            assert await worker.standing() == (ReplicationState.REPLICATING, Health.WARNING)
        finally:
            await worker.stop()
