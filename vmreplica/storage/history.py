"""The event log and the durable statistics, in the site's catalog file.

Two tables beside the catalog's (:mod:`vmreplica.storage.catalog` creates them with its own):

- ``event``: one row per event (:mod:`vmreplica.domain.events`), numbered by ``seq``. The catalog
  adds the rows in the same transaction as the change they tell of (a state, a role, a test
  failover), so the log never says something happened that did not, nor misses a change that
  did. Rows outlive their VM (its removal is an event too) and are pruned by age
  (:data:`EVENTS_KEPT_DAYS`) and count (:data:`EVENTS_KEPT`), as each is added.
- ``vm_statistic``: the statistics that cycle rows cannot give once pruned — when they were
  last reset, the initial replication's size, the last application-consistent cycle, the last
  test failover.

:func:`window_inputs` reads everything :func:`vmreplica.domain.statistics.measure` needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.events import (
    FAILURE_EVENT_IDS,
    STATE_EVENT_IDS,
    Event,
    EventId,
    EventLevel,
    state_level,
)
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.domain.statistics import (
    MONITORING_WINDOW_MS,
    CycleRow,
    DurableStatistics,
    WindowInputs,
)

if TYPE_CHECKING:
    from vmreplica.storage.catalog import Catalog

Statement = tuple[str, Sequence[Any]]

EVENTS_KEPT_DAYS: Final = 30
"""Events older than this are pruned: a month of history for an incident review."""
EVENTS_KEPT: Final = 100_000
"""At most this many events per site (a failing VM retried every 30 s logs 120 an hour)."""
_DAY_MS: Final = 86_400_000

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS event_vm ON event (vm, seq);
CREATE INDEX IF NOT EXISTS event_at ON event (at_ms);
CREATE TABLE IF NOT EXISTS vm_statistic (
    vm TEXT PRIMARY KEY REFERENCES vm(name) ON DELETE CASCADE,
    reset_at_ms INTEGER,
    initial_replication_bytes INTEGER,
    initial_replication_at_ms INTEGER,
    last_app_consistent_ms INTEGER,
    last_test_failover_ms INTEGER
);
"""


def _pruning(at_ms: int) -> list[Statement]:
    return [
        ("DELETE FROM event WHERE at_ms < ?", (at_ms - EVENTS_KEPT_DAYS * _DAY_MS,)),
        ("DELETE FROM event WHERE seq <= (SELECT MAX(seq) FROM event) - ?", (EVENTS_KEPT,)),
    ]


def event(vm: str, event_id: EventId, level: EventLevel, message: str) -> list[Statement]:
    """Statements that log one event (and prune the log)."""
    at = now_ms()
    return [
        (
            "INSERT INTO event (vm, at_ms, event_id, level, message) VALUES (?, ?, ?, ?, ?)",
            (vm, at, int(event_id), level.value, message),
        ),
        *_pruning(at),
    ]


def state_event(vm: str, state: ReplicationState, message: str) -> list[Statement]:
    """Statements that log the VM entering ``state``, only if it is in another state now: run
    them before the statement that changes it, in the same transaction."""
    at = now_ms()
    return [
        (
            "INSERT INTO event (vm, at_ms, event_id, level, message)"
            " SELECT name, ?, ?, ?, 'state changed from ' || state || ' to ' || ? || ?"
            " FROM vm WHERE name = ? AND state <> ?",
            (
                at,
                int(STATE_EVENT_IDS[state]),
                state_level(state).value,
                state.value,
                f": {message}" if message else "",
                vm,
                state.value,
            ),
        ),
        *_pruning(at),
    ]


def failure_event(vm: str, reason: str, message: str) -> list[Statement]:
    """Statements that log a failed cycle or replication attempt for ``reason``."""
    return event(
        vm, FAILURE_EVENT_IDS.get(reason, EventId.FAILED_REPLICATION), EventLevel.ERROR, message
    )


def statistic(vm: str, column: str, value: int | None) -> Statement:
    """A statement that sets one column of the VM's ``vm_statistic`` row."""
    if column not in DurableStatistics.__dataclass_fields__:
        raise ValueError(f"no statistic column {column!r}")
    return (
        f"INSERT INTO vm_statistic (vm, {column}) VALUES (?, ?)"
        f" ON CONFLICT(vm) DO UPDATE SET {column} = excluded.{column}",
        (vm, value),
    )


async def events(
    catalog: Catalog, vm: str | None = None, after_seq: int | None = None, limit: int = 1000
) -> list[Event]:
    """Events oldest first: the newest ``limit`` of them, or with ``after_seq`` the next
    ``limit`` after it; only ``vm``'s when given."""
    where, parameters = "seq > ?", list[Any]([after_seq or 0])
    if vm is not None:
        where += " AND vm = ?"
        parameters.append(vm)
    order = "DESC" if after_seq is None else "ASC"
    rows = await catalog.rows(
        f"SELECT seq, vm, at_ms, event_id, level, message FROM event WHERE {where}"
        f" ORDER BY seq {order} LIMIT ?",
        [*parameters, limit],
    )
    found = [Event(r[0], r[1], r[2], r[3], EventLevel(r[4]), r[5]) for r in rows]
    return sorted(found, key=lambda e: e.seq)


async def durable_statistics(catalog: Catalog, vm: str) -> DurableStatistics:
    row = await catalog.first_row(
        "SELECT reset_at_ms, initial_replication_bytes, initial_replication_at_ms,"
        " last_app_consistent_ms, last_test_failover_ms FROM vm_statistic WHERE vm = ?",
        (vm,),
    )
    return DurableStatistics() if row is None else DurableStatistics(*row)


async def failures(catalog: Catalog, vm: str, since_ms: int) -> dict[int, int]:
    """Failure events of ``vm`` since ``since_ms``, counted by event id."""
    rows = await catalog.rows(
        "SELECT event_id, COUNT(*) FROM event WHERE vm = ? AND at_ms >= ?"
        " AND event_id BETWEEN ? AND ? GROUP BY event_id",
        (vm, since_ms, min(FAILURE_EVENT_IDS.values()), max(FAILURE_EVENT_IDS.values())),
    )
    return {int(r[0]): int(r[1]) for r in rows}


def storage_free_ratio(root: Path) -> float | None:
    """The free share of the file system holding ``root`` (None: it cannot be read)."""
    try:
        stat = os.statvfs(root)
    except OSError:
        return None
    return stat.f_bavail / stat.f_blocks if stat.f_blocks else None


async def window_inputs(catalog: Catalog, record: VmRecord, now: int) -> WindowInputs:
    """Everything the catalog holds for ``record``'s monitoring window ending at ``now``."""
    name = record.name
    durable = await durable_statistics(catalog, name)
    since = max(now - MONITORING_WINDOW_MS, durable.reset_at_ms or 0)
    rows = [CycleRow(*row) for row in await catalog.cycle_stats(name, since, previous=True)]
    return WindowInputs(
        record,
        since,
        rows,
        await catalog.position(name),
        await catalog.last_heartbeat(name),
        await failures(catalog, name, since),
        durable,
    )
