"""What `vmreplica status`, its `--json` and the Prometheus metrics say about a VM.

State and health by name (Hyper-V's rules over a one-hour monitoring window), position, seconds
behind, pending bytes, on a primary the position its replica last reported, and a resync's
progress while it runs (and its figures once it ended). :func:`vm_status` returns a
:class:`VmStatus`; the CLI turns it into JSON and tables, the agent into metrics.

An idle VM ships no cycle, so nothing here counts from the last cycle (the rules are in
:mod:`vmreplica.domain.states`): *seconds behind* is the RPO — the time since this site was last
known to hold every write of the primary, at most one interval while the primary heartbeats and
says nothing waits; a cycle is *expected* only while writes wait, so an idle, heartbeating VM
is Normal and up to date however long since its last cycle. Both sites apply the same rules:
the primary records its own heartbeats, the replica those it reads in the journal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import (
    CYCLES_EXPECTED_STATES,
    HealthReport,
    KafkaOutage,
    LastHeartbeat,
    WindowStats,
    assess,
    cut_off,
    missed_intervals,
    primary_live,
    rpo_seconds,
    synced_at_ms,
    waiting_ms,
)
from vmreplica.errors import BrokerUnreachable, ConfigurationError
from vmreplica.failover.resync import job_or_none
from vmreplica.failover.resync_job import ResyncJob
from vmreplica.journal.kafka import read_to_end
from vmreplica.producers.changelog import pending_bytes
from vmreplica.producers.nbd_exports import nbd_uris, socket_path
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status
from vmreplica.schemas.events import ReplicaPosition

MONITORING_WINDOW_MS: Final = HOUR_MS
"""Hyper-V's monitoring window: health counts the cycles of the last hour."""
CONTINUOUS_INTERVAL_SECONDS: Final = 1.0
"""Continuous replication looks for writes to ship every second (or sooner, by size)."""


def interval_seconds(frequency_seconds: int) -> float:
    """Seconds between cycles for a VM's ``frequency_seconds`` (0: continuous)."""
    return float(frequency_seconds) or CONTINUOUS_INTERVAL_SECONDS


@dataclass(frozen=True)
class CaptureStatus:
    """How the VM's writes are captured, and for NBD the URIs the hypervisor attaches to."""

    mode: str
    """``api``, ``nbd`` or ``scan`` (:attr:`VmSettings.capture`)."""
    nbd_socket: str | None = None
    nbd: Mapping[str, Mapping[str, str]] | None = None
    """Per disk, ``{"unix": uri, "tcp": uri}`` (a primary with NBD capture only)."""
    nbd_error: str | None = None
    """Why the agent refuses to serve the disks over NBD (the socket path is too long)."""


@dataclass(frozen=True)
class PrimaryProgress:
    """Where a primary stands: what it shipped, what waits, what its replica last applied."""

    last_sent_cycle: int | None
    pending_bytes: int
    replica_cycle: int | None
    replica_applied_at_ms: int | None


@dataclass(frozen=True)
class ReplicaProgress:
    """Where a replica stands: what it applied, how many points it keeps."""

    last_applied_cycle: int | None
    recovery_points: int


@dataclass(frozen=True)
class VmStatus:
    """Everything `vmreplica status` shows for one VM."""

    record: VmRecord
    capture: CaptureStatus
    report: HealthReport
    seconds_behind: float | None
    """The RPO, to a tenth of a second: how long since this site was last known to hold every
    write of the primary (:func:`~vmreplica.domain.states.rpo_seconds`); None before then."""
    cycles_in_window: int
    progress: PrimaryProgress | ReplicaProgress
    synced_at_ms: int | None = None
    """The newest instant at which this site is known to hold every write of the primary."""
    idle: bool = False
    """The primary is live and its last heartbeat said nothing waited to ship."""
    resync: ResyncJob | None = None
    """The primary's resync: running (its phase and bytes examined, differing, sent), or the
    last one that ended."""

    @property
    def last_cycle(self) -> int | None:
        """The last cycle shipped (primary) or applied (replica)."""
        if isinstance(self.progress, PrimaryProgress):
            return self.progress.last_sent_cycle
        return self.progress.last_applied_cycle


def capture_status(config: SiteConfig, record: VmRecord) -> CaptureStatus:
    """How the VM's writes are captured, and for NBD the URIs the hypervisor attaches to."""
    mode = record.settings.capture
    if record.role == "primary" and mode == "nbd":
        try:
            return CaptureStatus(
                mode, str(socket_path(config, record.name)), nbd_uris(config, record)
            )
        except ConfigurationError as error:  # the agent refuses to serve it for this reason
            return CaptureStatus(mode, nbd_error=str(error))
    return CaptureStatus(mode)


async def _latest_replica_position(site: Site, vm: str) -> ReplicaPosition | None:
    """What the replica last reported on the status topic; None when it said nothing yet, or
    Kafka cannot be reached (the health then says so, from the agent's record)."""
    latest: ReplicaPosition | None = None
    try:
        async for record in read_to_end(site.connection, site.status_topic(vm), last=20):
            event = decode_status(record.value)
            if isinstance(event, ReplicaPosition):
                latest = event
    except BrokerUnreachable:
        return None
    return latest


@dataclass(frozen=True)
class _Row:
    """A cycle statistics row (:meth:`Catalog.cycle_stats`) by name."""

    cycle: int
    cut_ms: int
    done_ms: int
    size_bytes: int
    started_ms: int | None


def missed_in_window(
    rows: Sequence[tuple[int, int, int, int, int | None]],
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
    cycles = [_Row(*row) for row in rows]
    missed = 0
    for previous, cycle in pairwise(cycles):
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


async def vm_status(
    site: Site,
    record: VmRecord,
    with_replica: bool = True,
    outage: KafkaOutage | None = None,
) -> VmStatus:
    """Everything `vmreplica status` shows for one VM.

    ``with_replica`` reads the position the replica last reported on the status topic (a
    primary only); the agent's metrics loop leaves it out. ``outage``: the site's agent cannot
    reach Kafka (:meth:`~vmreplica.storage.mailbox.Mailbox.kafka_outage`), which the health
    says rather than a bare error.
    """
    now_ms = int(time.time() * 1000)
    catalog = site.catalog
    position = await catalog.position(record.name)
    window_start = now_ms - MONITORING_WINDOW_MS
    rows = await catalog.cycle_stats(record.name, window_start, previous=True)
    window = [row for row in rows if row[2] >= window_start]
    heartbeat = await catalog.last_heartbeat(record.name)
    interval = interval_seconds(record.settings.frequency_seconds)
    idle = _idle(heartbeat, now_ms, site.config.heartbeat_seconds)
    synced = synced_at_ms(rows[-1][1] if rows else None, heartbeat)
    rpo = rpo_seconds(now_ms, synced, interval, idle)
    waiting_since = None
    if record.state in CYCLES_EXPECTED_STATES and not idle:
        if rows:
            waiting_since = rows[-1][2], rows[-1][1]
        elif position is not None:  # seeded, no cycle yet
            waiting_since = position.at_ms, position.at_ms
    missed = missed_in_window(
        rows,
        max(window_start, record.state_changed_ms),
        now_ms,
        interval,
        waiting_since,
        heartbeat.idle_at_ms if heartbeat else None,
    )
    latencies = [(done - cut) / 1000 for _, cut, done, _, _ in window]
    cut = None
    if outage is not None:
        heard = await catalog.primary_seen_ms(record.name) if record.role == "replica" else None
        cut = cut_off(outage, now_ms, site.config.heartbeat_seconds, record.partner_site, heard)
    report = assess(
        record.state,
        WindowStats(
            len(window) + missed,
            len(window),
            rpo,
            sum(latencies) / len(latencies) if latencies else None,
        ),
        cut,
    )
    cycle = position.cycle if position else None
    progress: PrimaryProgress | ReplicaProgress
    if record.role == "primary":
        changelog = site.config.vm_folder(record.name) / "changelog"
        replica = await _latest_replica_position(site, record.name) if with_replica else None
        progress = PrimaryProgress(
            cycle,
            pending_bytes(changelog),
            replica.cycle if replica else None,
            replica.applied_at_ms if replica else None,
        )
    else:
        progress = ReplicaProgress(cycle, await catalog.count_points(record.name))
    return VmStatus(
        record,
        capture_status(site.config, record),
        report,
        None if rpo is None else round(rpo, 1),
        len(window),
        progress,
        synced,
        idle,
        job_or_none(site, record.name) if record.role == "primary" else None,
    )


def _idle(heartbeat: LastHeartbeat | None, now_ms: int, heartbeat_seconds: float) -> bool:
    return (
        heartbeat is not None
        and heartbeat.idle
        and primary_live(heartbeat.at_ms, now_ms, heartbeat_seconds)
    )
