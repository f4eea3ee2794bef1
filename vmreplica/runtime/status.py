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

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import HealthReport, KafkaOutage, ReplicationState, cut_off
from vmreplica.domain.statistics import (
    CONTINUOUS_INTERVAL_SECONDS,
    MONITORING_WINDOW_MS,
    ReplicationStatistics,
    SiteFacts,
    interval_seconds,
    measure,
)
from vmreplica.errors import BrokerError, ConfigurationError
from vmreplica.failover.resync import job_or_none
from vmreplica.failover.resync_job import ResyncJob
from vmreplica.journal.kafka import read_to_end
from vmreplica.producers.changelog import pending_bytes
from vmreplica.producers.dirtymap import DIRTY_MAP_NAME
from vmreplica.producers.nbd_exports import nbd_uris, socket_path
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import ReplicaPosition
from vmreplica.storage.history import storage_free_ratio, window_inputs

__all__ = [
    "CONTINUOUS_INTERVAL_SECONDS",
    "MONITORING_WINDOW_MS",
    "CaptureStatus",
    "PrimaryProgress",
    "ReplicaProgress",
    "VmStatus",
    "capture_status",
    "interval_seconds",
    "vm_status",
]

REPLICA_POSITION_TIMEOUT_SECONDS: Final = 5.0
"""How long `status` waits for the status topic, on a primary, before it shows no replica
position: Kafka may be down, which is when the rest of what `status` says matters most."""

_SEEDING_STATES = (
    ReplicationState.READY_FOR_INITIAL_REPLICATION,
    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
)


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
class InitialProgress:
    """A primary's initial replication while it is to come or runs: how, when, how far."""

    mode: str
    """``network``, ``export`` or ``existing`` (``enable --initial``)."""
    examined_bytes: int
    """Bytes of the disks the network seed has read and sent (recorded per transaction)."""
    total_bytes: int
    scheduled_at_ms: int | None
    """``--initial-at``: not before then."""

    def summary(self, vm: str) -> str:
        """One line for `vmreplica status`."""
        head = f"initial replication of {vm} ({self.mode})"
        if self.scheduled_at_ms is not None and self.scheduled_at_ms > time.time() * 1000:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.scheduled_at_ms / 1000))
            return f"{head}: scheduled at {when}"
        share = 100 * self.examined_bytes / self.total_bytes if self.total_bytes else 100.0
        return f"{head}: {self.examined_bytes} of {self.total_bytes} bytes examined ({share:.0f} %)"


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
    statistics: ReplicationStatistics | None = None
    """Measure-VMReplication's figures over the window (:mod:`vmreplica.domain.statistics`)."""
    initial: InitialProgress | None = None
    """A primary's initial replication, while it is to come or runs."""

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


async def latest_replica_position(site: Site, vm: str) -> ReplicaPosition | None:
    """What the replica last said on the status topic; None when Kafka does not answer within
    :data:`REPLICA_POSITION_TIMEOUT_SECONDS` (status must work while Kafka is away)."""
    latest: ReplicaPosition | None = None
    try:
        async with asyncio.timeout(REPLICA_POSITION_TIMEOUT_SECONDS):
            async for record in read_to_end(site.connection, site.status_topic(vm), last=20):
                event = await site.trusted_status(vm, record.offset, record.value, note=False)
                if isinstance(event, ReplicaPosition):
                    latest = event
    except (TimeoutError, BrokerError):
        return latest
    return latest


async def site_facts(site: Site, record: VmRecord) -> SiteFacts:
    """What the site's files say of ``record`` beside the catalog: a primary's pending
    change-log bytes, the part of its disks a seed has not examined yet, whether its open
    cycle outgrew the change-log budget; the storage root's free space."""
    free = storage_free_ratio(site.config.root)
    if record.role != "primary":
        return SiteFacts(storage_free_ratio=free)
    changelog = site.config.vm_folder(record.name) / "changelog"
    unsent = 0
    if record.state in _SEEDING_STATES:
        done = await site.catalog.seed_progress(record.name)
        unsent = sum(max(0, d.size_bytes - done.get(d.name, 0)) for d in record.disks)
    return SiteFacts(pending_bytes(changelog), unsent, (changelog / DIRTY_MAP_NAME).exists(), free)


async def vm_status(
    site: Site,
    record: VmRecord,
    with_replica: bool = True,
    outage: KafkaOutage | None = None,
) -> VmStatus:
    """Everything `vmreplica status` and `vmreplica measure` show for one VM.

    ``with_replica`` reads the position the replica last reported on the status topic (a
    primary only); the agent's metrics loop leaves it out. ``outage``: the site's agent cannot
    reach Kafka (:meth:`~vmreplica.storage.mailbox.Mailbox.kafka_outage`), which the health
    says rather than a bare error.
    """
    now_ms = int(time.time() * 1000)
    catalog = site.catalog
    inputs = await window_inputs(catalog, record, now_ms)
    facts = await site_facts(site, record)
    cut = None
    if outage is not None:
        heard = await catalog.primary_seen_ms(record.name) if record.role == "replica" else None
        cut = cut_off(outage, now_ms, site.config.heartbeat_seconds, record.partner_site, heard)
    measured = measure(inputs, facts, now_ms, site.config.heartbeat_seconds, cut)
    statistics = measured.statistics
    position = inputs.position
    cycle = position.cycle if position else None
    progress: PrimaryProgress | ReplicaProgress
    if record.role == "primary":
        replica = await latest_replica_position(site, record.name) if with_replica else None
        progress = PrimaryProgress(
            cycle,
            statistics.pending_bytes or 0,
            replica.cycle if replica else None,
            replica.applied_at_ms if replica else None,
        )
    else:
        progress = ReplicaProgress(cycle, await catalog.count_points(record.name))
    rpo = measured.rpo_seconds
    return VmStatus(
        record,
        capture_status(site.config, record),
        measured.report,
        None if rpo is None else round(rpo, 1),
        statistics.successful_cycles,
        progress,
        measured.synced_at_ms,
        measured.idle,
        job_or_none(site, record.name) if record.role == "primary" else None,
        statistics,
        await initial_progress(site, record),
    )


async def initial_progress(site: Site, record: VmRecord) -> InitialProgress | None:
    """How far a primary's initial replication is, from the seed's recorded progress."""
    if record.role != "primary" or record.state not in _SEEDING_STATES:
        return None
    done = await site.catalog.seed_progress(record.name)
    return InitialProgress(
        record.settings.initial,
        sum(min(done.get(d.name, 0), d.size_bytes) for d in record.disks),
        sum(d.size_bytes for d in record.disks),
        record.settings.initial_at_ms,
    )
