"""Prometheus metrics on ``/metrics``: where every VM of a site stands, in base units.

The agent refreshes them from the catalog (the single source of truth) every few seconds, so a
scrape never blocks replication. States and health are label values, never numbers.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from vmreplica.domain.states import Health, ReplicationState
from vmreplica.runtime.status import PrimaryProgress, VmStatus

PREFIX: Final = "vmreplica"


class SiteMetrics:
    """The gauges of one site; :meth:`update` sets them for one VM from its status."""

    def __init__(self, site: str) -> None:
        self.registry = CollectorRegistry()
        labels = ("site", "vm", "role")
        self.site = site
        self.state = Gauge(f"{PREFIX}_vm_state", "1 for the VM's current replication state.",
                           [*labels, "state"], registry=self.registry)
        self.health = Gauge(f"{PREFIX}_vm_health", "1 for the VM's current health.",
                            [*labels, "health"], registry=self.registry)
        self.cycle = Gauge(f"{PREFIX}_last_cycle", "Last cycle shipped (primary) or applied "
                           "(replica).", labels, registry=self.registry)
        self.behind = Gauge(f"{PREFIX}_seconds_behind", "Seconds since the last cycle was "
                            "shipped or applied.", labels, registry=self.registry)
        self.pending = Gauge(f"{PREFIX}_pending_bytes", "Change-log bytes not yet shipped.",
                             labels, registry=self.registry)
        self.points = Gauge(f"{PREFIX}_recovery_points", "Recovery points kept.", labels,
                            registry=self.registry)
        self.cycles = Gauge(f"{PREFIX}_cycles_in_window", "Cycles done in the monitoring "
                            "window.", labels, registry=self.registry)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def update(self, status: VmStatus) -> None:
        record = status.record
        key = (self.site, record.name, record.role)
        for state in ReplicationState:
            self.state.labels(*key, state.value).set(int(state is record.state))
        for health in Health:
            self.health.labels(*key, health.value).set(int(health is status.report.health))
        cycle = status.last_cycle
        self.cycle.labels(*key).set(float("nan") if cycle is None else float(cycle))
        behind = status.seconds_behind
        self.behind.labels(*key).set(float("nan") if behind is None else behind)
        if isinstance(status.progress, PrimaryProgress):
            self.pending.labels(*key).set(status.progress.pending_bytes)
        else:
            self.points.labels(*key).set(status.progress.recovery_points)
        self.cycles.labels(*key).set(status.cycles_in_window)
