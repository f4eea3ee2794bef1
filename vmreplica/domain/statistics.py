"""Replication statistics over the monitoring window, as Measure-VMReplication gives them, and
the health they make — one computation for `vmreplica measure`, `vmreplica status`, the status
records a replica publishes and the Prometheus gauges.

Pure: :func:`measure` takes what the catalog holds for a VM (:class:`WindowInputs`, read by
:func:`vmreplica.storage.history.window_inputs`), what only the site's files tell
(:class:`SiteFacts`: pending change-log bytes, the unsent part of a seed, free space) and the
time, and returns a :class:`Measurement`. Tests pass any clock.

The window runs from :data:`MONITORING_WINDOW_MS` ago, or from the last `reset-statistics` if
later, to now. Missed cycles follow :mod:`vmreplica.domain.states`: a cycle is due only while
writes wait, so an idle VM misses none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Final

from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.events import FAILURE_KINDS, EventId
from vmreplica.domain.model import Position, VmRecord
from vmreplica.domain.states import (
    CYCLES_EXPECTED_STATES,
    CutOff,
    HealthReport,
    LastHeartbeat,
    ReplicationState,
    WindowStats,
    assess,
    missed_intervals,
    primary_live,
    rpo_seconds,
    silence,
    synced_at_ms,
    waiting_ms,
)

MONITORING_WINDOW_MS: Final = HOUR_MS
"""Hyper-V's monitoring window: health and statistics count the cycles of the last hour."""
CONTINUOUS_INTERVAL_SECONDS: Final = 1.0
"""Continuous replication looks for writes to ship every second (or sooner, by size)."""
FAILURE_COUNTS: Final = ("network", "replication", "application_consistent")
"""Measure-VMReplication's failure counts, in this order."""
_PARTNER_JUDGED_STATES: Final = frozenset(
    {
        ReplicationState.REPLICATING,
        ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
        ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
    }
)
"""States in which a replica expects to hear from its primary."""


def interval_seconds(frequency_seconds: int) -> float:
    """Seconds between cycles for a VM's ``frequency_seconds`` (0: continuous)."""
    return float(frequency_seconds) or CONTINUOUS_INTERVAL_SECONDS


@dataclass(frozen=True)
class CycleRow:
    """A cycle statistics row of the catalog (:meth:`Catalog.cycle_stats`)."""

    cycle: int
    cut_ms: int
    done_ms: int
    size_bytes: int
    started_ms: int | None

    @property
    def latency_seconds(self) -> float:
        """From the primary's cut to shipped (primary) or applied (replica)."""
        return max(0.0, (self.done_ms - self.cut_ms) / 1000)


@dataclass(frozen=True)
class DurableStatistics:
    """What the catalog keeps of a VM's statistics beyond its cycle rows (never pruned)."""

    reset_at_ms: int | None = None
    initial_replication_bytes: int | None = None
    initial_replication_at_ms: int | None = None
    last_app_consistent_ms: int | None = None
    last_test_failover_ms: int | None = None


@dataclass(frozen=True)
class WindowInputs:
    """What the catalog holds for one VM's monitoring window."""

    record: VmRecord
    since_ms: int
    """The window's start: an hour ago, or the last reset if later."""
    rows: Sequence[CycleRow]
    """Cycles done from ``since_ms`` on, after the last one done before it (if any)."""
    position: Position | None
    heartbeat: LastHeartbeat | None
    failures: Mapping[int, int]
    """Failure events in the window, by event id."""
    durable: DurableStatistics = field(default_factory=DurableStatistics)


@dataclass(frozen=True)
class SiteFacts:
    """What the site's files say, beside the catalog (the shell measures it)."""

    pending_bytes: int | None = None
    """Change-log bytes not yet shipped (a primary)."""
    unsent_seed_bytes: int = 0
    """Bytes of the disks an initial replication has not examined yet (a primary)."""
    over_budget: bool = False
    storage_free_ratio: float | None = None


@dataclass(frozen=True)
class ReplicationStatistics:
    """Measure-VMReplication's figures for one VM over the window."""

    monitoring_start_ms: int
    monitoring_end_ms: int
    average_size_bytes: int | None
    maximum_size_bytes: int | None
    average_latency_seconds: float | None
    maximum_latency_seconds: float | None
    successful_cycles: int
    missed_cycles: int
    failed_cycles: Mapping[str, int]
    """By kind: ``network``, ``replication``, ``application_consistent``."""
    pending_bytes: int | None
    """A primary: change-log bytes not shipped plus the part of a seed not sent yet."""
    last_replication_ms: int | None
    """When the last cycle was shipped (primary) or applied (replica)."""
    initial_replication_bytes: int | None
    last_app_consistent_ms: int | None
    last_test_failover_ms: int | None

    @property
    def errors(self) -> int:
        return sum(self.failed_cycles.values())


@dataclass(frozen=True)
class Measurement:
    """Statistics, health and how far behind, from one reading of the catalog."""

    statistics: ReplicationStatistics
    report: HealthReport
    rpo_seconds: float | None
    synced_at_ms: int | None
    idle: bool
    """The primary is live and its last heartbeat said nothing waited to ship."""


def missed_in_window(
    rows: Sequence[CycleRow],
    since_ms: int,
    now_ms: int,
    interval: float,
    waiting_since: tuple[int, int] | None,
    idle_at_ms: int | None,
) -> int:
    """Cycles missed from ``since_ms`` to ``now_ms``: while writes waited, an interval without
    a cycle beyond the first (:func:`~vmreplica.domain.states.waiting_ms`).

    ``rows`` are the cycles done from ``since_ms`` on, after the last one done before it (if
    any). ``waiting_since`` is the (done, cut) time from which writes are waiting now, or None
    when nothing is due (the primary is idle, or the state expects no cycle); ``idle_at_ms``
    the primary's last idle instant after it.
    """
    missed = 0
    for previous, cycle in pairwise(rows):
        if cycle.done_ms >= since_ms:
            waited = waiting_ms(
                previous.done_ms, previous.cut_ms, cycle.started_ms, cycle.done_ms, since_ms
            )
            missed += missed_intervals(waited / 1000, interval)
    if waiting_since is not None:
        done, cut = waiting_since
        missed += missed_intervals(
            waiting_ms(done, cut, idle_at_ms, now_ms, since_ms) / 1000, interval
        )
    return missed


def failure_counts(failures: Mapping[int, int]) -> dict[str, int]:
    """Failure events by Measure-VMReplication's kinds (:data:`FAILURE_COUNTS`)."""
    counts = dict.fromkeys(FAILURE_COUNTS, 0)
    for event_id, count in failures.items():
        try:
            kind = FAILURE_KINDS.get(EventId(event_id))
        except ValueError:  # an id of a newer version
            continue
        if kind is not None:
            counts[kind] += count
    return counts


def measure(
    inputs: WindowInputs,
    facts: SiteFacts,
    now_ms: int,
    heartbeat_seconds: float,
    cut: CutOff | None = None,
) -> Measurement:
    """The VM's statistics and health at ``now_ms`` (see the module's docstring); ``cut``: the
    site cannot reach Kafka (:func:`~vmreplica.domain.states.cut_off`)."""
    record, rows, position, heartbeat = (
        inputs.record,
        inputs.rows,
        inputs.position,
        inputs.heartbeat,
    )
    window = [row for row in rows if row.done_ms >= inputs.since_ms]
    interval = interval_seconds(record.settings.frequency_seconds)
    idle = (
        heartbeat is not None
        and heartbeat.idle
        and primary_live(heartbeat.at_ms, now_ms, heartbeat_seconds)
    )
    synced = synced_at_ms(rows[-1].cut_ms if rows else None, heartbeat)
    rpo = rpo_seconds(now_ms, synced, interval, idle)
    waiting_since = None
    if record.state in CYCLES_EXPECTED_STATES and not idle:
        if rows:
            waiting_since = rows[-1].done_ms, rows[-1].cut_ms
        elif position is not None:  # seeded, no cycle yet
            waiting_since = position.at_ms, position.at_ms
    missed = missed_in_window(
        rows,
        max(inputs.since_ms, record.state_changed_ms),
        now_ms,
        interval,
        waiting_since,
        heartbeat.idle_at_ms if heartbeat else None,
    )
    latencies = [row.latency_seconds for row in window]
    sizes = [row.size_bytes for row in window]
    average_latency = sum(latencies) / len(latencies) if latencies else None
    silent = None
    if record.role == "replica" and record.state in _PARTNER_JUDGED_STATES:
        heard = [
            ms
            for ms in (
                heartbeat.at_ms if heartbeat else None,
                rows[-1].cut_ms if rows else None,
                position.at_ms if position else None,
            )
            if ms is not None
        ]
        if heard:
            silent = max(0.0, (now_ms - max(heard)) / 1000)
    silence_reason = None
    if record.state in CYCLES_EXPECTED_STATES and heartbeat is not None:
        silence_reason = silence(
            record.role, record.partner_site, heartbeat.at_ms, now_ms, heartbeat_seconds
        )
    report = assess(
        record.state,
        WindowStats(
            len(window) + missed,
            len(window),
            rpo,
            average_latency,
            interval_seconds=interval,
            partner_silent_seconds=silent,
            storage_free_ratio=facts.storage_free_ratio,
            over_budget=facts.over_budget,
            silence=silence_reason,
        ),
        record.state_message,
        cut,
    )
    durable = inputs.durable
    pending = None
    if record.role == "primary":
        pending = (facts.pending_bytes or 0) + facts.unsent_seed_bytes
    last_done = rows[-1].done_ms if rows else None
    statistics = ReplicationStatistics(
        monitoring_start_ms=inputs.since_ms,
        monitoring_end_ms=now_ms,
        average_size_bytes=round(sum(sizes) / len(sizes)) if sizes else None,
        maximum_size_bytes=max(sizes, default=None),
        average_latency_seconds=None if average_latency is None else round(average_latency, 3),
        maximum_latency_seconds=round(max(latencies), 3) if latencies else None,
        successful_cycles=len(window),
        missed_cycles=missed,
        failed_cycles=failure_counts(inputs.failures),
        pending_bytes=pending,
        last_replication_ms=last_done,
        initial_replication_bytes=durable.initial_replication_bytes,
        last_app_consistent_ms=durable.last_app_consistent_ms,
        last_test_failover_ms=durable.last_test_failover_ms,
    )
    return Measurement(statistics, report, rpo, synced, idle)
