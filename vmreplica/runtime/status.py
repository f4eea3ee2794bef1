"""What `vmreplica status`, its `--json` and the Prometheus metrics say about a VM.

State and health by name (Hyper-V's rules over a one-hour monitoring window), position, seconds
behind, pending bytes, on a primary the position its replica last reported, and a resync's
progress while it runs (and its figures once it ended). :func:`vm_status` returns a
:class:`VmStatus`; the CLI turns it into JSON and tables, the agent into metrics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from vmreplica.config import SiteConfig
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import HealthReport, WindowStats, assess
from vmreplica.errors import ConfigurationError
from vmreplica.failover.resync import ResyncJob, job_or_none
from vmreplica.journal.kafka import read_to_end
from vmreplica.producers.changelog import pending_bytes
from vmreplica.producers.nbd_exports import nbd_uris, socket_path
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status
from vmreplica.schemas.events import ReplicaPosition


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
    """Since the last cycle was shipped or applied, to a tenth of a second; None before one."""
    cycles_in_window: int
    progress: PrimaryProgress | ReplicaProgress
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
            return CaptureStatus(mode, str(socket_path(config, record.name)),
                                 nbd_uris(config, record))
        except ConfigurationError as error:  # the agent refuses to serve it for this reason
            return CaptureStatus(mode, nbd_error=str(error))
    return CaptureStatus(mode)


async def _latest_replica_position(site: Site, vm: str) -> ReplicaPosition | None:
    latest: ReplicaPosition | None = None
    async for record in read_to_end(site.connection, site.status_topic(vm), last=20):
        event = decode_status(record.value)
        if isinstance(event, ReplicaPosition):
            latest = event
    return latest


async def vm_status(site: Site, record: VmRecord, with_replica: bool = True) -> VmStatus:
    """Everything `vmreplica status` shows for one VM.

    ``with_replica`` reads the position the replica last reported on the status topic (a
    primary only); the agent's metrics loop leaves it out.
    """
    now_ms = int(time.time() * 1000)
    position = await site.catalog.position(record.name)
    window_ms = HOUR_MS
    stats = await site.catalog.cycle_stats(record.name, now_ms - window_ms)
    frequency = record.settings.frequency_seconds or 1
    since_enabled_ms = now_ms - record.state_changed_ms
    expected = min(window_ms, max(since_enabled_ms, 0)) // (frequency * 1000)
    latencies = [(done - cut) / 1000 for _, cut, done, _ in stats]
    last_cycle_ms = stats[-1][2] if stats else None
    report = assess(record.state, WindowStats(
        int(expected), len(stats),
        None if last_cycle_ms is None else (now_ms - last_cycle_ms) / 1000,
        sum(latencies) / len(latencies) if latencies else None))
    cycle = position.cycle if position else None
    progress: PrimaryProgress | ReplicaProgress
    if record.role == "primary":
        changelog = site.config.vm_folder(record.name) / "changelog"
        replica = await _latest_replica_position(site, record.name) if with_replica else None
        progress = PrimaryProgress(cycle, pending_bytes(changelog),
                                   replica.cycle if replica else None,
                                   replica.applied_at_ms if replica else None)
    else:
        progress = ReplicaProgress(cycle, len(await site.catalog.points(record.name)))
    return VmStatus(
        record, capture_status(site.config, record), report,
        None if position is None else round((now_ms - position.at_ms) / 1000, 1),
        len(stats), progress,
        job_or_none(site, record.name) if record.role == "primary" else None)
