"""Catalog transactions: concurrent tasks on one connection do not interleave, and positions
only move forward unless a failover rewinds them.

An agent runs one task per VM over a single catalog connection; before transactions were
serialised, two tasks recording at once failed with "cannot start a transaction within a
transaction" (and one task's ROLLBACK could take the other's statements with it).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from vmreplica.domain.model import (
    Consistency,
    DiskRecord,
    Position,
    RecoveryPoint,
    Rewind,
    VmSettings,
)
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import PositionRegressedError
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.mailbox import Mailbox


async def test_concurrent_transactions_all_commit(tmp_path: Path) -> None:
    """Forty VMs record a cycle and a state change at the same time; every row lands."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        names = [f"vm{i}" for i in range(40)]
        for name in names:
            await catalog.add_vm(
                name,
                "replica",
                "tg",
                "site-a",
                VmSettings(),
                [DiskRecord("disk0", f"/nowhere/{name}.img", 4096)],
                ReplicationState.REPLICATING,
            )

        async def record(index: int, name: str) -> None:
            await catalog.advance_position(
                name,
                Position(1, index, bytes(32), index + 10, 1),
                point=RecoveryPoint(index, 1, index + 9, 1),
                cut_at_ms=1,
                size_bytes=4096,
            )
            await catalog.set_state(name, ReplicationState.ERROR, f"message {index}")

        await asyncio.gather(*(record(i, name) for i, name in enumerate(names)))
        for index, name in enumerate(names):
            position = await catalog.position(name)
            assert position is not None
            assert (position.cycle, position.next_offset) == (index, index + 10)
            assert [p.cycle for p in await catalog.points(name)] == [index]
            vm = await catalog.vm(name)
            assert (vm.state, vm.state_message) == (ReplicationState.ERROR, f"message {index}")


async def test_a_task_cancelled_inside_a_transaction_leaves_the_connection_usable(
    tmp_path: Path,
) -> None:
    """An agent stopping cancels its workers wherever they are, a catalog transaction included.

    Before transactions were shielded, a cancel between BEGIN and COMMIT left the connection
    inside the transaction and the agent's last write failed with "cannot start a transaction
    within a transaction". Cancels land at every await of the transaction in turn here.
    """
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await catalog.add_vm(
            "vm0",
            "replica",
            "tg",
            "site-a",
            VmSettings(),
            [DiskRecord("disk0", "/nowhere/vm0.img", 4096)],
            ReplicationState.REPLICATING,
        )
        for yields in range(12):
            task = asyncio.create_task(
                catalog.set_state("vm0", ReplicationState.ERROR, f"cancelled after {yields} yields")
            )
            for _ in range(yields):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await catalog.set_state("vm0", ReplicationState.REPLICATING, f"after {yields}")
            vm = await catalog.vm("vm0")
            assert (vm.state, vm.state_message) == (ReplicationState.REPLICATING, f"after {yields}")


async def _one_vm(catalog: Catalog, name: str = "web") -> None:
    await catalog.add_vm(
        name,
        "replica",
        "tg",
        "site-a",
        VmSettings(),
        [DiskRecord("disk0", f"/nowhere/{name}.img", 4096)],
        ReplicationState.REPLICATING,
    )


async def test_positions_advance_forward_only(tmp_path: Path) -> None:
    """Positions only move forward: a later cycle or epoch, or more journal at the same cycle."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        steps = [
            Position(1, 4, b"a", 40, 1),  # seed progress at cycle 4 ...
            Position(1, 4, b"a", 55, 2),  # ... reads further at the same cycle
            Position(1, 4, b"a", 55, 3),  # the same place again changes nothing
            Position(1, 5, b"b", 60, 4),  # a cycle applied
            Position(2, 5, b"b", 61, 5),  # a new epoch starting after cycle 5
            Position(2, 6, b"c", 30, 6),
        ]  # the offset is only compared within a cycle
        for step in steps:
            await catalog.advance_position("web", step)
            assert await catalog.position("web") == step


@pytest.mark.parametrize(
    "offered",
    [
        Position(2, 6, b"x", 80, 9),  # an older cycle
        Position(2, 7, b"x", 60, 9),  # an older offset at the same epoch and cycle
        Position(1, 9, b"x", 90, 9),  # an older epoch, even with a later cycle
    ],
)
async def test_a_position_that_moves_back_is_refused_and_nothing_is_written(
    tmp_path: Path, offered: Position
) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        current = Position(2, 7, b"h", 70, 1)
        await catalog.advance_position(
            "web", current, point=RecoveryPoint(7, 2, 69, 1), cut_at_ms=1, size_bytes=10
        )

        with pytest.raises(PositionRegressedError) as raised:
            await catalog.advance_position(
                "web",
                offered,
                point=RecoveryPoint(offered.cycle, offered.epoch, 1, 2, Consistency.APPLICATION),
                cut_at_ms=2,
                size_bytes=20,
            )

        assert (raised.value.vm, raised.value.current, raised.value.offered) == (
            "web",
            current,
            offered,
        )
        assert str(raised.value) == (
            f"VM 'web': position (epoch {offered.epoch}, cycle {offered.cycle}, offset "
            f"{offered.next_offset}) would move back from (epoch 2, cycle 7, offset 70); "
            "positions only move forward, and nothing was recorded. Operator action: make sure "
            "one agent alone uses this site's catalog; if the VM's journal was recreated, "
            "resynchronize the VM."
        )
        assert await catalog.position("web") == current
        assert await catalog.points("web") == [RecoveryPoint(7, 2, 69, 1)]
        assert await catalog.cycle_stats("web", 0) == [(7, 1, 1, 10, None)]


async def test_rewind_goes_back_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await catalog.advance_position("web", Position(3, 9, b"h", 90, 1))
        back = Position(2, 5, b"p", 51, 2)

        with caplog.at_level(logging.WARNING, logger="vmreplica.storage.catalog"):
            await catalog.rewind_position("web", back, "failover cancelled")

        assert await catalog.position("web") == back
        assert caplog.messages == [
            "VM web: position rewound from (epoch 3, cycle 9, offset 90) to (epoch 2, cycle 5, "
            "offset 51): failover cancelled"
        ]
        await catalog.advance_position("web", Position(2, 6, b"q", 60, 3))  # forward from there


async def test_a_role_change_that_moves_back_needs_a_rewind(tmp_path: Path) -> None:
    """The role and the position change in one transaction: refused, neither lands."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await catalog.advance_position("web", Position(1, 9, b"h", 90, 1))
        back = Position(2, 5, b"p", 120, 2)

        with pytest.raises(PositionRegressedError):
            await catalog.change_role(
                "web",
                "primary",
                "site-a",
                2,
                ReplicationState.FAILED_OVER,
                "unplanned failover to cycle 5",
                position=back,
            )
        vm = await catalog.vm("web")
        assert (vm.role, vm.epoch, vm.state) == ("replica", 1, ReplicationState.REPLICATING)
        assert await catalog.generation("web") == 0

        await catalog.change_role(
            "web",
            "primary",
            "site-a",
            2,
            ReplicationState.FAILED_OVER,
            "unplanned failover to cycle 5",
            position=Rewind(back, "unplanned failover to cycle 5"),
        )
        vm = await catalog.vm("web")
        assert (vm.role, vm.epoch, vm.state) == ("primary", 2, ReplicationState.FAILED_OVER)
        assert await catalog.position("web") == back


async def test_moving_on_without_a_cycle_keeps_the_cycle_statistics(tmp_path: Path) -> None:
    """Seed progress and reconciliation record a position, not a cycle: the statistics of the
    cycle they stand at (its cut time, hence its latency) stay as the cycle left them."""
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _one_vm(catalog)
        await catalog.advance_position(
            "web", Position(1, 3, b"h", 30, 2_000), cut_at_ms=1_500, size_bytes=4096
        )
        await catalog.advance_position("web", Position(1, 3, b"h", 31, 2_000))
        assert await catalog.cycle_stats("web", 0) == [(3, 1_500, 2_000, 4096, None)]


async def test_transactions_beside_reads_and_the_mailbox(tmp_path: Path) -> None:
    """Workers read the catalog while others record, and the mailbox's connection stamps the
    agent alive in between, as an agent of many VMs does: no transaction fails with "database
    is locked". (A read executed in one call on the connection's thread and fetched in another
    left a read transaction open in between; a transaction begun there failed at once once the
    mailbox had written since, and the agent lost that VM's worker.)"""
    path = tmp_path / "catalog.sqlite"
    async with Catalog(path) as catalog, Mailbox(path) as mailbox:
        names = [f"vm{i}" for i in range(20)]
        for name in names:
            await catalog.add_vm(
                name,
                "primary",
                "tg",
                "site-b",
                VmSettings(),
                [DiskRecord("disk0", f"/nowhere/{name}.img", 4096)],
                ReplicationState.REPLICATING,
            )

        async def worker(name: str) -> None:
            for beat in range(20):
                await catalog.find_vm(name)
                await catalog.record_heartbeat(name, beat, None)
                await catalog.vms()

        async def stamp() -> None:
            for _ in range(200):
                await mailbox.agent_alive("site-a", 1)
                await asyncio.sleep(0)

        await asyncio.gather(stamp(), *(worker(name) for name in names))
        for name in names:
            heartbeat = await catalog.last_heartbeat(name)
            assert heartbeat is not None
            assert heartbeat.at_ms == 19
