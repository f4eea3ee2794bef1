"""The site's catalog: replication relationships, positions and recovery points, in SQLite.

One file per site, opened through aiosqlite in WAL mode with ``synchronous=FULL``: a row written
here is durable when the call returns. The replica writes its applied position only after the
image is fsynced, so the catalog never claims more than the image holds. The agent's request
mailbox and liveness share the file (:mod:`vmreplica.storage.mailbox`).

Positions only move forward (:meth:`Catalog.advance_position`, checked inside the writing
transaction); failover, the one caller that goes back, rewinds with a reason
(:meth:`Catalog.rewind_position`, or a :class:`Rewind` given to :meth:`Catalog.change_role`).

Nothing here grows with the number of cycles: cycle statistics older than
:data:`CYCLE_STATS_HOURS` are pruned as new ones are written (the newest row stays, for its cut
time), and recovery points are pruned by ranges of cycles, never one SQL parameter per point.

About 900 lines: every statement that writes the site's relationships, settings, positions,
points, role changes and failover marks, so that each durable step is one transaction whose
order can be checked in one file; the tables are :mod:`~vmreplica.storage.catalog_schema`, the
event log and statistics :mod:`~vmreplica.storage.history`, the mailbox
:mod:`~vmreplica.storage.mailbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import aiosqlite

from vmreplica.domain.clock import HOUR_MS, now_ms
from vmreplica.domain.events import EventId, EventLevel
from vmreplica.domain.model import (
    Consistency,
    DiskRecord,
    Position,
    RecoveryPoint,
    Rewind,
    Role,
    VmRecord,
    VmSettings,
)
from vmreplica.domain.states import LastHeartbeat, ReplicationState
from vmreplica.errors import (
    ConfigurationError,
    PositionRegressedError,
    ReplicationError,
    StateRefused,
)
from vmreplica.service import Service
from vmreplica.storage import history
from vmreplica.storage.catalog_schema import ADDED_COLUMNS, SCHEMA
from vmreplica.storage.sqlite import open_database

log = logging.getLogger(__name__)

CYCLE_STATS_HOURS: Final = 2
"""Cycle statistics are kept this long: health, `vmreplica status` and the metrics read one
hour back at most (the monitoring window), so twice that never finds a window's start pruned,
while a busy continuous VM (3,600 cycles an hour) keeps a bounded table."""


class Catalog(Service):
    """Async access to the site catalog. ``async with Catalog(path) as catalog: ...``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._writing = asyncio.Lock()
        """One connection serves every task: transactions must not interleave on it."""

    async def start(self) -> None:
        self._db = await open_database(self.path, SCHEMA + history.SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            async with self._db.execute(f"PRAGMA table_info({table})") as cursor:
                columns = {row[1] for row in await cursor.fetchall()}
            if column not in columns:
                await self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    async def stop(self) -> None:
        async with self._writing:  # a shielded transaction still running finishes first
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Every row of a query, read in one call on the connection's thread.

        Every read goes through here. A query executed in one call and fetched in another
        leaves its statement, and so a read transaction, open on this connection while other
        tasks' calls run in between; a transaction one of them begins then fails at once with
        "database is locked" if the mailbox's connection wrote since (SQLite's BUSY_SNAPSHOT:
        the busy timeout does not wait for it). With a hundred VMs' workers reading the
        catalog, that stopped a VM's worker every few minutes.
        """
        return list(await self.db.execute_fetchall(sql, parameters))

    async def first_row(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        """The first row of a query (see :meth:`rows`), or None."""
        return next(iter(await self.rows(sql, parameters)), None)

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("catalog is not open")
        return self._db

    async def _transaction(
        self,
        statements: Sequence[tuple[str, Sequence[Any]]],
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run ``statements`` atomically: all of them are durable, or none.

        ``before`` runs first inside the transaction, so what it reads cannot change before the
        statements run; it refuses them by raising.

        Shielded: a caller cancelled while its transaction runs (an agent stopping its workers)
        must not leave the shared connection inside an open transaction. The caller sees its
        cancellation at once; the transaction runs to its COMMIT or ROLLBACK, and the write lock
        keeps the next one (and :meth:`stop`) behind it.
        """
        await asyncio.shield(self._run_transaction(statements, before))

    async def _run_transaction(
        self,
        statements: Sequence[tuple[str, Sequence[Any]]],
        before: Callable[[], Awaitable[None]] | None,
    ) -> None:
        async with self._writing:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                if before is not None:
                    await before()
                for sql, parameters in statements:
                    await self.db.execute(sql, parameters)
                # A COMMIT that fails (SQLITE_FULL: the disk is full) leaves the transaction
                # open; it is rolled back like any other failure, or the next BEGIN would fail.
                await self.db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self.db.execute("ROLLBACK")
                raise

    async def add_vm(
        self,
        name: str,
        role: Role,
        trust_group: str,
        partner_site: str,
        settings: VmSettings,
        disks: Sequence[DiskRecord],
        state: ReplicationState,
        epoch: int = 1,
    ) -> None:
        """Record a new relationship. :raises ConfigurationError: the VM is already known."""
        if await self.find_vm(name) is not None:
            raise ConfigurationError(
                f"VM {name!r} is already enabled for replication at this site "
                "(`vmreplica status` shows it)"
            )
        statements: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO vm (name, role, trust_group, partner_site, settings, epoch, state,"
                " state_changed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    role,
                    trust_group,
                    partner_site,
                    settings.to_json(),
                    epoch,
                    state.value,
                    now_ms(),
                ),
            )
        ]
        statements += [
            (
                "INSERT INTO disk (vm, name, path, size_bytes, position) VALUES (?, ?, ?, ?, ?)",
                (name, d.name, d.path, d.size_bytes, i),
            )
            for i, d in enumerate(disks)
        ]
        statements.append(("DELETE FROM removed_vm WHERE name = ?", (name,)))
        statements += history.event(
            name,
            EventId.REPLICATION_ENABLED,
            EventLevel.INFORMATION,
            f"replication enabled: {role} here, partner site {partner_site}, {state.value}",
        )
        await self._transaction(statements)

    async def remove_vm(self, name: str, message: str = "replication removed at this site") -> None:
        """Forget a relationship at this site (its images and folders stay where they are), and
        remember that it was removed: discovery does not adopt the VM from its journal again."""
        await self._transaction(
            [
                ("DELETE FROM vm WHERE name = ?", (name,)),
                (
                    "INSERT OR REPLACE INTO removed_vm (name, removed_ms) VALUES (?, ?)",
                    (name, now_ms()),
                ),
                *history.event(name, EventId.REPLICATION_REMOVED, EventLevel.WARNING, message),
            ]
        )

    async def removed_vms(self) -> set[str]:
        """VMs removed at this site (`vmreplica remove`) and not enabled here since."""
        return {str(row[0]) for row in await self.rows("SELECT name FROM removed_vm")}

    async def change_settings(
        self,
        name: str,
        settings: VmSettings,
        message: str,
        *,
        generation: int,
        partner_site: str | None = None,
        disks: Sequence[DiskRecord] | None = None,
    ) -> None:
        """Set a primary VM's settings (Set-VMReplication), in one transaction: the settings,
        the replica site and disks when given, an event, a bumped generation (the agent
        restarts the VM's worker with them) and a mark that a ``VmConfig`` saying them is
        still to be published (:meth:`config_pending`).

        :raises ReplicationError: the VM changed meanwhile (its generation is not ``generation``:
            a failover, another `set`); nothing was written.
        """
        statements: list[tuple[str, Sequence[Any]]] = [
            (
                "UPDATE vm SET settings = ?, partner_site = COALESCE(?, partner_site),"
                " generation = generation + 1, config_pending = 1 WHERE name = ?",
                (settings.to_json(), partner_site, name),
            ),
            *history.event(name, EventId.SETTINGS_CHANGED, EventLevel.INFORMATION, message),
        ]
        if disks is not None:
            statements.append(("DELETE FROM disk WHERE vm = ?", (name,)))
            statements += [
                (
                    "INSERT INTO disk (vm, name, path, size_bytes, position)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, d.name, d.path, d.size_bytes, i),
                )
                for i, d in enumerate(disks)
            ]

        async def unchanged() -> None:
            if await self.generation(name) != generation:
                raise ReplicationError(
                    f"VM {name!r} changed while its settings were being set (a failover or "
                    "another `vmreplica set`); nothing was changed. Operator action: look at "
                    f"`vmreplica status {name}` and run the command again"
                )

        await self._transaction(statements, unchanged)

    async def adopt_settings(self, name: str, settings: VmSettings, message: str) -> None:
        """A replica takes the settings its primary published in a ``VmConfig`` (the worker
        already runs with them: no generation bump)."""
        await self._transaction(
            [
                ("UPDATE vm SET settings = ? WHERE name = ?", (settings.to_json(), name)),
                *history.event(name, EventId.SETTINGS_CHANGED, EventLevel.INFORMATION, message),
            ]
        )

    async def config_pending(self, name: str) -> bool:
        """The VM's settings changed here and no ``VmConfig`` in the journal says so yet."""
        row = await self.first_row("SELECT config_pending FROM vm WHERE name = ?", (name,))
        return row is not None and bool(row[0])

    async def config_published(self, name: str) -> None:
        await self._transaction([("UPDATE vm SET config_pending = 0 WHERE name = ?", (name,))])

    async def find_vm(self, name: str) -> VmRecord | None:
        row = await self.first_row(
            "SELECT name, role, trust_group, partner_site, settings, epoch, state,"
            " state_message, state_changed_ms FROM vm WHERE name = ?",
            (name,),
        )
        if row is None:
            return None
        rows = await self.rows(
            "SELECT name, path, size_bytes FROM disk WHERE vm = ? ORDER BY position", (name,)
        )
        disks = tuple(DiskRecord(*d) for d in rows)
        return VmRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            VmSettings.from_json(row[4]),
            row[5],
            ReplicationState(row[6]),
            row[7],
            row[8],
            disks,
        )

    async def vm(self, name: str) -> VmRecord:
        """:raises ConfigurationError: the VM is not enabled at this site."""
        record = await self.find_vm(name)
        if record is None:
            raise ConfigurationError(
                f"VM {name!r} is not replicated at this site; `vmreplica status` lists the VMs"
            )
        return record

    async def vms(self) -> list[VmRecord]:
        names = [row[0] for row in await self.rows("SELECT name FROM vm ORDER BY name")]
        return [await self.vm(name) for name in names]

    async def set_state(
        self,
        name: str,
        state: ReplicationState,
        message: str = "",
        *,
        expected: ReplicationState | None = None,
    ) -> None:
        """Set the VM's state; entering another state than its current one is logged as an
        event in the same transaction (:func:`history.state_event`).

        :raises StateRefused: ``expected`` is given and the VM is in another state (checked in
            the writing transaction, so no other change slips in between); nothing is written.
        """

        async def check() -> None:
            if expected is not None:
                current = (await self.vm(name)).state
                if current is not expected:
                    raise StateRefused(name, current, expected)

        await self._transaction(
            [
                *history.state_event(name, state, message),
                (
                    "UPDATE vm SET state = ?, state_message = ?, state_changed_ms = ?"
                    " WHERE name = ?",
                    (state.value, message, now_ms(), name),
                ),
            ],
            check,
        )

    async def hold_seed(self, name: str, message: str) -> None:
        """Stop-VMInitialReplication: the VM is ready for initial replication again and its
        agent does not seed it until :meth:`release_seed`; in one transaction, with the state
        event, and a bumped generation so the agent starts the VM's worker at once (held).

        :raises StateRefused: the VM's initial replication is not running or ready (checked in
            the transaction); nothing was written.
        """
        ready = ReplicationState.READY_FOR_INITIAL_REPLICATION

        async def check() -> None:
            current = (await self.vm(name)).state
            if current not in (ready, ReplicationState.INITIAL_REPLICATION_IN_PROGRESS):
                raise StateRefused(name, current, ready)

        await self._transaction(
            [
                *history.state_event(name, ready, message),
                (
                    "UPDATE vm SET state = ?, state_message = ?, state_changed_ms = ?,"
                    " seed_held = 1, generation = generation + 1 WHERE name = ?",
                    (ready.value, message, now_ms(), name),
                ),
            ],
            check,
        )

    async def release_seed(self, name: str) -> None:
        await self._transaction([("UPDATE vm SET seed_held = 0 WHERE name = ?", (name,))])

    async def seed_held(self, name: str) -> bool:
        """`vmreplica initial stop` holds the VM's initial replication."""
        row = await self.first_row("SELECT seed_held FROM vm WHERE name = ?", (name,))
        return row is not None and bool(row[0])

    async def set_epoch(self, name: str, epoch: int) -> None:
        await self._transaction([("UPDATE vm SET epoch = ? WHERE name = ?", (epoch, name))])

    async def position(self, name: str) -> Position | None:
        row = await self.first_row(
            "SELECT epoch, cycle, cycle_hash, next_offset, at_ms FROM position WHERE vm = ?",
            (name,),
        )
        return None if row is None else Position(row[0], row[1], bytes(row[2]), row[3], row[4])

    async def advance_position(
        self,
        name: str,
        position: Position,
        *,
        point: RecoveryPoint | None = None,
        cut_at_ms: int | None = None,
        size_bytes: int = 0,
        started_at_ms: int | None = None,
        consistency: Consistency = Consistency.CRASH,
    ) -> None:
        """Durably move a VM's position forward: a cycle shipped (primary) or applied (replica),
        or more of the journal read at the same cycle.

        With ``cut_at_ms``, ``position.cycle`` has just been done and its statistics (start and
        cut time, ``size_bytes``) are recorded, statistics older than :data:`CYCLE_STATS_HOURS`
        are pruned, and what the last heartbeat said about waiting writes is superseded by the
        cycle (an application-consistent cut is remembered as the last one); with ``point``,
        the cycle's recovery point. All of it lands in one SQLite
        transaction.

        :raises PositionRegressedError: ``position`` is behind the recorded one (see
            :class:`Position`); nothing is written.
        """
        statements = [self._position_statement(name, position)]
        if point is not None:
            statements.append(
                (
                    "INSERT OR REPLACE INTO recovery_point (vm, cycle, epoch, journal_offset,"
                    " cut_at_ms, consistency, cycle_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        point.cycle,
                        point.epoch,
                        point.journal_offset,
                        point.cut_at_ms,
                        point.consistency.value,
                        point.cycle_hash,
                    ),
                )
            )
        if cut_at_ms is not None and position.cycle > 0:
            statements += [
                (
                    "INSERT OR REPLACE INTO cycle_stat (vm, cycle, cut_at_ms, done_at_ms, bytes,"
                    " started_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, position.cycle, cut_at_ms, position.at_ms, size_bytes, started_at_ms),
                ),
                (
                    "DELETE FROM cycle_stat WHERE vm = ? AND done_at_ms < ? AND cycle <> ?",
                    (name, position.at_ms - CYCLE_STATS_HOURS * HOUR_MS, position.cycle),
                ),
                ("UPDATE heartbeat SET idle_at_ms = NULL, idle = 0 WHERE vm = ?", (name,)),
            ]
            if consistency is Consistency.APPLICATION:
                statements.append(history.statistic(name, "last_app_consistent_ms", cut_at_ms))
        await self._transaction(statements, self._forward_only(name, position))

    async def rewind_position(self, name: str, position: Position, reason: str) -> None:
        """Set a VM's position even if that moves it back; ``reason`` says why (logged).

        Only failover goes back: cancelling an unplanned failover, an old primary following
        the new one, promoting at an older recovery point.
        """
        await self._rewind(name, Rewind(position, reason), [])

    @staticmethod
    def _position_statement(name: str, position: Position) -> tuple[str, Sequence[Any]]:
        return (
            "INSERT INTO position (vm, epoch, cycle, cycle_hash, next_offset, at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(vm) DO UPDATE SET epoch = excluded.epoch,"
            " cycle = excluded.cycle, cycle_hash = excluded.cycle_hash,"
            " next_offset = excluded.next_offset, at_ms = excluded.at_ms",
            (
                name,
                position.epoch,
                position.cycle,
                position.cycle_hash,
                position.next_offset,
                position.at_ms,
            ),
        )

    def _forward_only(self, name: str, position: Position) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            current = await self.position(name)
            if current is not None and position.moves_back_from(current):
                raise PositionRegressedError(name, current, position)

        return check

    async def _rewind(
        self, name: str, rewind: Rewind, statements: list[tuple[str, Sequence[Any]]]
    ) -> None:
        """Run ``statements`` and the rewind in one transaction, then log what moved back."""
        before: list[Position | None] = []

        async def remember() -> None:
            before.append(await self.position(name))

        await self._transaction(
            [*statements, self._position_statement(name, rewind.position)], remember
        )
        log.warning(
            "VM %s: position rewound from (%s) to (%s): %s",
            name,
            before[0] if before[0] is not None else "none",
            rewind.position,
            rewind.reason,
        )

    async def points(self, name: str, cut_before_ms: int | None = None) -> list[RecoveryPoint]:
        """The VM's recovery points, oldest first; only those cut before ``cut_before_ms``
        when given."""
        where, parameters = "vm = ?", list[Any]([name])
        if cut_before_ms is not None:
            where += " AND cut_at_ms < ?"
            parameters.append(cut_before_ms)
        rows = await self.rows(
            "SELECT cycle, epoch, journal_offset, cut_at_ms, consistency, cycle_hash"
            f" FROM recovery_point WHERE {where} ORDER BY cycle",
            parameters,
        )
        return [
            RecoveryPoint(r[0], r[1], r[2], r[3], Consistency.parse(r[4]), bytes(r[5]))
            for r in rows
        ]

    async def count_points(self, name: str) -> int:
        row = await self.first_row("SELECT COUNT(*) FROM recovery_point WHERE vm = ?", (name,))
        return 0 if row is None else int(row[0])

    async def oldest_point(self, name: str) -> int | None:
        """The cycle of the VM's oldest recovery point, None without any."""
        row = await self.first_row("SELECT MIN(cycle) FROM recovery_point WHERE vm = ?", (name,))
        return None if row is None or row[0] is None else int(row[0])

    async def keep_points(
        self, name: str, cycles: Sequence[int], *, cut_before_ms: int | None = None
    ) -> None:
        """Forget every recovery point of ``name`` but ``cycles``; with ``cut_before_ms``, only
        among the points cut before it (the others stay whatever ``cycles`` says).

        One ranged DELETE per gap between kept cycles, never one parameter per cycle: a
        continuous VM keeps tens of thousands of points, beyond SQLite's parameter limit, and
        they are kept in long runs of consecutive cycles, which cost one statement each.
        """
        kept = sorted(set(cycles))
        statements: list[tuple[str, Sequence[Any]]] = []
        for low, high in pairwise([None, *kept, None]):
            if low is not None and high is not None and high - low <= 1:
                continue
            sql, parameters = "DELETE FROM recovery_point WHERE vm = ?", list[Any]([name])
            if low is not None:
                sql += " AND cycle > ?"
                parameters.append(low)
            if high is not None:
                sql += " AND cycle < ?"
                parameters.append(high)
            if cut_before_ms is not None:
                sql += " AND cut_at_ms < ?"
                parameters.append(cut_before_ms)
            statements.append((sql, parameters))
        if statements:
            await self._transaction(statements)

    async def drop_points_after(self, name: str, cycle: int) -> None:
        await self._transaction(
            [("DELETE FROM recovery_point WHERE vm = ? AND cycle > ?", (name, cycle))]
        )

    async def seed_progress(self, name: str) -> dict[str, int]:
        rows = await self.rows("SELECT disk, next_offset FROM seed_progress WHERE vm = ?", (name,))
        return {row[0]: row[1] for row in rows}

    async def set_seed_progress(self, name: str, disk: str, next_offset: int) -> None:
        await self._transaction(
            [
                (
                    "INSERT OR REPLACE INTO seed_progress (vm, disk, next_offset) VALUES (?, ?, ?)",
                    (name, disk, next_offset),
                )
            ]
        )

    async def cycle_stats(
        self,
        name: str,
        since_ms: int,
        *,
        previous: bool = False,
    ) -> list[tuple[int, int, int, int, int | None]]:
        """(cycle, cut_at_ms, done_at_ms, bytes, started_at_ms) of cycles done since
        ``since_ms``, oldest first; with ``previous``, the last cycle done before it first.

        ``started_at_ms`` is None for cycles recorded before it was kept.
        """
        query = (
            "SELECT cycle, cut_at_ms, done_at_ms, bytes, started_at_ms FROM cycle_stat"
            " WHERE vm = ? AND done_at_ms {} ? ORDER BY {} LIMIT ?"
        )
        rows: list[Any] = []
        if previous:
            rows += await self.rows(
                query.format("<", "done_at_ms DESC, cycle DESC"), (name, since_ms, 1)
            )
        rows += await self.rows(query.format(">=", "done_at_ms, cycle"), (name, since_ms, -1))
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # Events and statistics -------------------------------------------------------------------

    async def record_failure(self, name: str, reason: str, message: str) -> None:
        """Log a failed cycle or replication attempt (``reason``: a ``reason`` label of
        ``vmreplica_cycles_failed_total``); the statistics count these events."""
        await self._transaction(history.failure_event(name, reason, message))

    async def record_event(
        self, name: str, event_id: EventId, level: EventLevel, message: str
    ) -> None:
        """Log one event that goes with no other change (a status record refused)."""
        await self._transaction(history.event(name, event_id, level, message))

    async def record_initial_replication(self, name: str, size_bytes: int) -> None:
        """The initial replication ended, having sent ``size_bytes``: remember and log it."""
        at = now_ms()
        await self._transaction(
            [
                history.statistic(name, "initial_replication_bytes", size_bytes),
                history.statistic(name, "initial_replication_at_ms", at),
                *history.event(
                    name,
                    EventId.INITIAL_REPLICATION_COMPLETED,
                    EventLevel.INFORMATION,
                    f"initial replication completed: {size_bytes} bytes sent",
                ),
            ]
        )

    async def reset_statistics(self, name: str) -> int:
        """Start the VM's monitoring window now (Reset-VMReplicationStatistics); return now."""
        at = now_ms()
        await self._transaction(
            [
                history.statistic(name, "reset_at_ms", at),
                *history.event(
                    name, EventId.STATISTICS_RESET, EventLevel.INFORMATION, "statistics reset"
                ),
            ]
        )
        return at

    # Heartbeats --------------------------------------------------------------------------------

    async def record_heartbeat(
        self, name: str, at_ms: int, idle_at_ms: int | None, *, from_primary_site: bool = False
    ) -> None:
        """Remember a heartbeat of the VM's primary: when it was sent and, if nothing waited to
        ship, the instant it says so (``idle_at_ms``). A later cycle supersedes the latter
        (:meth:`advance_position`).

        ``from_primary_site``: a replica read it in the journal; it is then also what an
        unplanned failover checks (:meth:`primary_seen_ms`). A primary records its own.
        """
        statements: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO heartbeat (vm, at_ms, idle_at_ms, idle) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(vm) DO UPDATE SET at_ms = excluded.at_ms,"
                " idle_at_ms = COALESCE(excluded.idle_at_ms, heartbeat.idle_at_ms),"
                " idle = excluded.idle",
                (name, at_ms, idle_at_ms, int(idle_at_ms is not None)),
            )
        ]
        if from_primary_site:
            statements.append(("UPDATE vm SET primary_seen_ms = ? WHERE name = ?", (at_ms, name)))
        await self._transaction(statements)

    async def last_heartbeat(self, name: str) -> LastHeartbeat | None:
        """What the VM's primary last said in a heartbeat, None before any (in this role)."""
        row = await self.first_row(
            "SELECT at_ms, idle_at_ms, idle FROM heartbeat WHERE vm = ?", (name,)
        )
        return None if row is None else LastHeartbeat(int(row[0]), row[1], bool(row[2]))

    # Role changes (failover) -------------------------------------------------------------------

    async def change_role(
        self,
        name: str,
        role: Role,
        partner_site: str,
        epoch: int,
        state: ReplicationState,
        message: str,
        disks: Sequence[DiskRecord] | None = None,
        position: Position | Rewind | None = None,
        failover_point: int | None = None,
        settings: VmSettings | None = None,
        pending_epoch: bytes | None = None,
    ) -> None:
        """Switch a VM's role in one transaction; bumps its generation so running workers stop.

        A ``position`` must move forward (as :meth:`advance_position`); a :class:`Rewind` may go
        back, for its reason (as :meth:`rewind_position`). ``pending_epoch``: the encoded
        EpochStart of the new role, still to be published (:meth:`pending_epoch`); a role
        change without one drops any still pending (that epoch no longer stands).

        :raises PositionRegressedError: a plain ``position`` is behind the recorded one.
        """
        statements: list[tuple[str, Sequence[Any]]] = [
            *history.state_event(name, state, message),
            *history.event(
                name,
                EventId.BECAME_PRIMARY if role == "primary" else EventId.BECAME_REPLICA,
                EventLevel.WARNING,
                f"now {role} in epoch {epoch}, partner site {partner_site}"
                + (f": {message}" if message else ""),
            ),
            (
                "UPDATE vm SET role = ?, partner_site = ?, epoch = ?, state = ?, state_message = ?,"
                " state_changed_ms = ?, generation = generation + 1, failover_point = ?"
                " WHERE name = ?",
                (role, partner_site, epoch, state.value, message, now_ms(), failover_point, name),
            ),
            ("DELETE FROM heartbeat WHERE vm = ?", (name,)),  # the old primary's words
            ("DELETE FROM pending_epoch WHERE vm = ?", (name,)),
        ]
        if pending_epoch is not None:
            statements.append(
                (
                    "INSERT INTO pending_epoch (vm, event, recorded_ms) VALUES (?, ?, ?)",
                    (name, pending_epoch, now_ms()),
                )
            )
        if settings is not None:  # who the VM's other sites are changes with its primary
            statements.append(
                ("UPDATE vm SET settings = ? WHERE name = ?", (settings.to_json(), name))
            )
        if disks is not None:
            statements.append(("DELETE FROM disk WHERE vm = ?", (name,)))
            statements += [
                (
                    "INSERT INTO disk (vm, name, path, size_bytes, position)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, d.name, d.path, d.size_bytes, i),
                )
                for i, d in enumerate(disks)
            ]
        if isinstance(position, Rewind):
            await self._rewind(name, position, statements)
        elif position is not None:
            statements.append(self._position_statement(name, position))
            await self._transaction(statements, self._forward_only(name, position))
        else:
            await self._transaction(statements)

    async def pending_epoch(self, name: str) -> bytes | None:
        """The encoded EpochStart a failover recorded here but has not published yet (no
        broker answered), or None."""
        row = await self.first_row("SELECT event FROM pending_epoch WHERE vm = ?", (name,))
        return None if row is None else bytes(row[0])

    async def epoch_published(self, name: str, position: Position | Rewind) -> None:
        """The pending EpochStart is in the journal: forget it and record ``position`` (its
        offset + 1 as the next offset), in one transaction; a :class:`Rewind` when that
        journal is another cluster's, whose offsets start afresh.

        :raises PositionRegressedError: a plain ``position`` is behind the recorded one.
        """
        forget = ("DELETE FROM pending_epoch WHERE vm = ?", (name,))
        if isinstance(position, Rewind):
            await self._rewind(name, position, [forget])
            return
        await self._transaction(
            [forget, self._position_statement(name, position)],
            self._forward_only(name, position),
        )

    async def generations(self) -> dict[str, int]:
        """Every VM's name and generation, in one query: the agent reads them four times a
        second, and hundreds of VMs must not cost hundreds of queries each time."""
        rows = await self.rows("SELECT name, generation FROM vm ORDER BY name")
        return {str(row[0]): int(row[1]) for row in rows}

    async def generation(self, name: str) -> int:
        row = await self.first_row("SELECT generation FROM vm WHERE name = ?", (name,))
        return -1 if row is None else int(row[0])

    async def failover_point(self, name: str) -> int | None:
        row = await self.first_row("SELECT failover_point FROM vm WHERE name = ?", (name,))
        return None if row is None or row[0] is None else int(row[0])

    async def set_reverse_wanted(self, name: str, wanted: bool) -> None:
        await self._transaction(
            [("UPDATE vm SET reverse_wanted = ? WHERE name = ?", (int(wanted), name))]
        )

    async def reverse_wanted(self, name: str) -> bool:
        row = await self.first_row("SELECT reverse_wanted FROM vm WHERE name = ?", (name,))
        return bool(row and row[0])

    async def set_failover_point(self, name: str, cycle: int | None) -> None:
        await self._transaction(
            [("UPDATE vm SET failover_point = ? WHERE name = ?", (cycle, name))]
        )

    async def primary_seen_ms(self, name: str) -> int | None:
        row = await self.first_row("SELECT primary_seen_ms FROM vm WHERE name = ?", (name,))
        return None if row is None or row[0] is None else int(row[0])

    async def cancel_epoch(self, name: str, epoch: int) -> None:
        await self._transaction(
            [("INSERT OR IGNORE INTO canceled_epoch (vm, epoch) VALUES (?, ?)", (name, epoch))]
        )

    async def canceled_epochs(self, name: str) -> set[int]:
        rows = await self.rows("SELECT epoch FROM canceled_epoch WHERE vm = ?", (name,))
        return {int(row[0]) for row in rows}

    # Test failover -----------------------------------------------------------------------------

    async def set_test_failover(self, name: str, point: int, status: str, detail: str = "") -> None:
        """Record the VM's test failover; ``ready`` (its disks are served) and ``failed`` are
        logged as events, and ``ready`` is the last test failover's time."""
        statements: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT OR REPLACE INTO test_failover (vm, point, status, detail, created_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, point, status, detail, now_ms()),
            )
        ]
        if status == "ready":
            statements += [
                history.statistic(name, "last_test_failover_ms", now_ms()),
                *history.event(
                    name,
                    EventId.TEST_FAILOVER_STARTED,
                    EventLevel.INFORMATION,
                    f"test failover at point {point}: {detail}",
                ),
            ]
        elif status == "failed":
            statements += history.event(
                name,
                EventId.TEST_FAILOVER_FAILED,
                EventLevel.ERROR,
                f"test failover at point {point} failed: {detail}",
            )
        await self._transaction(statements)

    async def test_failover(self, name: str) -> tuple[int, str, str] | None:
        """(point, status, detail) of the VM's test failover, if one exists."""
        row = await self.first_row(
            "SELECT point, status, detail FROM test_failover WHERE vm = ?", (name,)
        )
        return None if row is None else (int(row[0]), str(row[1]), str(row[2]))

    async def clear_test_failover(self, name: str) -> None:
        """Forget the VM's test failover; one that was served is logged as stopped."""
        await self._transaction(
            [
                (
                    "INSERT INTO event (vm, at_ms, event_id, level, message)"
                    " SELECT vm, ?, ?, ?, 'test failover stopped' FROM test_failover"
                    " WHERE vm = ? AND status IN ('ready', 'stopping')",
                    (
                        now_ms(),
                        int(EventId.TEST_FAILOVER_STOPPED),
                        EventLevel.INFORMATION.value,
                        name,
                    ),
                ),
                ("DELETE FROM test_failover WHERE vm = ?", (name,)),
            ]
        )

    # Extended replication ----------------------------------------------------------------------

    async def add_extension(
        self,
        vm: str,
        to_site: str,
        trust_group: str,
        bootstrap_servers: str,
        frequency_seconds: int,
    ) -> None:
        await self._transaction(
            [
                (
                    "INSERT INTO extension (vm, to_site, trust_group, bootstrap_servers,"
                    " frequency_seconds) VALUES (?, ?, ?, ?, ?)",
                    (vm, to_site, trust_group, bootstrap_servers, frequency_seconds),
                )
            ]
        )

    async def extension(self, vm: str) -> tuple[str, str, str, int] | None:
        """(to_site, trust_group, bootstrap_servers, frequency_seconds) of ``vm``'s hop."""
        row = await self.first_row(
            "SELECT to_site, trust_group, bootstrap_servers, frequency_seconds"
            " FROM extension WHERE vm = ?",
            (vm,),
        )
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]), int(row[3]))

    async def set_extension_offset(self, vm: str, offset: int) -> None:
        await self._transaction(
            [("UPDATE extension SET upstream_offset = ? WHERE vm = ?", (offset, vm))]
        )

    async def extension_offset(self, vm: str) -> int | None:
        row = await self.first_row("SELECT upstream_offset FROM extension WHERE vm = ?", (vm,))
        return None if row is None or row[0] is None else int(row[0])
