"""Catalog transactions from concurrent tasks on one connection do not interleave.

An agent runs one task per VM over a single catalog connection; before transactions were
serialised, two tasks recording at once failed with "cannot start a transaction within a
transaction" (and one task's ROLLBACK could take the other's statements with it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from vmreplica.domain.model import DiskRecord, Position, RecoveryPoint, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.storage.catalog import Catalog


async def test_concurrent_transactions_all_commit(tmp_path: Path) -> None:
    """Forty VMs record a cycle and a state change at the same time; every row lands."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        names = [f"vm{i}" for i in range(40)]
        for name in names:
            await catalog.add_vm(name, "replica", "tg", "site-a", VmSettings(),
                                 [DiskRecord("disk0", f"/nowhere/{name}.img", 4096)],
                                 ReplicationState.REPLICATING)

        async def record(index: int, name: str) -> None:
            await catalog.record_cycle(name, Position(1, index, bytes(32), index + 10, 1),
                                       RecoveryPoint(index, 1, index + 9, 1), 1, 4096)
            await catalog.set_state(name, ReplicationState.ERROR, f"message {index}")

        await asyncio.gather(*(record(i, name) for i, name in enumerate(names)))
        for index, name in enumerate(names):
            position = await catalog.position(name)
            assert position is not None
            assert (position.cycle, position.next_offset) == (index, index + 10)
            assert [p.cycle for p in await catalog.points(name)] == [index]
            vm = await catalog.vm(name)
            assert (vm.state, vm.state_message) == (ReplicationState.ERROR, f"message {index}")
