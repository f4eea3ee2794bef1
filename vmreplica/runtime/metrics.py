"""Prometheus metrics on ``/metrics``: where every VM of a site stands, in base units.

The agent refreshes them from the catalog (the single source of truth) every few seconds, so a
scrape never blocks replication. States and health are label values, never numbers.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from vmreplica.domain.states import Health, ReplicationState

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

    def update(self, status: dict[str, object]) -> None:
        key = (self.site, str(status["vm"]), str(status["role"]))
        for state in ReplicationState:
            self.state.labels(*key, state.value).set(int(state.value == status["state"]))
        for health in Health:
            self.health.labels(*key, health.value).set(int(health.value == status["health"]))
        cycle = status.get("last_sent_cycle", status.get("last_applied_cycle"))
        self.cycle.labels(*key).set(float(cycle) if isinstance(cycle, int) else float("nan"))
        behind = status.get("seconds_behind")
        self.behind.labels(*key).set(float(behind) if isinstance(behind, int | float)
                                     else float("nan"))
        pending = status.get("pending_bytes")
        if isinstance(pending, int):
            self.pending.labels(*key).set(pending)
        points = status.get("recovery_points")
        if isinstance(points, int):
            self.points.labels(*key).set(points)
        cycles = status.get("cycles_in_window")
        if isinstance(cycles, int):
            self.cycles.labels(*key).set(cycles)
