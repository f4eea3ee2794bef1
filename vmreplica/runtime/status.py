"""What `vmreplica status`, its `--json` and the Prometheus metrics say about a VM.

State and health by name (Hyper-V's rules over a one-hour monitoring window), position, seconds
behind, pending bytes, and on a primary the position its replica last reported.
"""

from __future__ import annotations

import time
from typing import Any

from vmreplica.config import SiteConfig
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import WindowStats, assess
from vmreplica.errors import ConfigurationError
from vmreplica.journal.kafka import read_to_end
from vmreplica.producers.changelog import pending_bytes
from vmreplica.producers.nbd_exports import nbd_uris, socket_path
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status
from vmreplica.schemas.events import ReplicaPosition


def vm_json(record: VmRecord) -> dict[str, Any]:
    return {"vm": record.name, "role": record.role, "state": record.state.value,
            "message": record.state_message, "epoch": record.epoch,
            "partner_site": record.partner_site,
            "disks": [{"name": d.name, "path": d.path, "size_bytes": d.size_bytes}
                      for d in record.disks]}


def capture_json(config: SiteConfig, record: VmRecord) -> dict[str, Any]:
    """How the VM's writes are captured, and for NBD the URIs the hypervisor attaches to."""
    details: dict[str, Any] = {"capture": record.settings.capture}
    if record.role == "primary" and record.settings.capture == "nbd":
        try:
            details["nbd_socket"] = str(socket_path(config, record.name))
            details["nbd"] = nbd_uris(config, record)
        except ConfigurationError as error:  # the agent refuses to serve it for this reason
            details["nbd_error"] = str(error)
    return details


async def _latest_replica_position(site: Site, vm: str) -> ReplicaPosition | None:
    latest: ReplicaPosition | None = None
    async for record in read_to_end(site.connection, site.status_topic(vm), last=20):
        event = decode_status(record.value)
        if isinstance(event, ReplicaPosition):
            latest = event
    return latest


async def vm_status(site: Site, record: VmRecord, with_replica: bool = True,
                    ) -> dict[str, Any]:
    """Everything `vmreplica status` shows for one VM."""
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
    status = vm_json(record) | capture_json(site.config, record) | {
        "health": report.health.value, "health_reasons": list(report.reasons),
        "cycle": position.cycle if position else None,
        "seconds_behind": None if position is None else round((now_ms - position.at_ms) / 1000,
                                                               1),
        "cycles_in_window": len(stats),
    }
    if record.role == "primary":
        changelog = site.config.vm_folder(record.name) / "changelog"
        status["pending_bytes"] = pending_bytes(changelog)
        replica = await _latest_replica_position(site, record.name) if with_replica else None
        status["replica_cycle"] = replica.cycle if replica else None
        status["replica_applied_at_ms"] = replica.applied_at_ms if replica else None
        status["last_sent_cycle"] = status.pop("cycle")
    else:
        status["last_applied_cycle"] = status.pop("cycle")
        status["recovery_points"] = len(await site.catalog.points(record.name))
    return status
