"""Prometheus metrics on ``/metrics``, by Prometheus's conventions.

Two kinds of numbers, from two places:

- **Counters and histograms count events.** Cycles shipped (primary) and applied (replica), with
  their latency from cut to shipped or applied and their bytes, come from the catalog's cycle
  statistics: durable rows written in the same transaction as the position, so each cycle is
  counted once whichever code path did it (the agent's loop, a planned failover's last cycle).
  Missed cycles are intervals in which writes waited without a cycle: an idle VM ships none and
  misses none (:func:`missed_intervals`, :func:`~vmreplica.domain.states.waiting_ms`). Failures,
  failover actions, written bytes and apply times are reported by the agent as they happen.
  Like every Prometheus counter they start at zero when the agent starts.
- **Gauges say where each VM stands now**, from the catalog, refreshed every few seconds and
  served as one snapshot, so a VM removed or failed over leaves no stale series behind: state
  and health as labels with 0/1 values, last cycle and when it was done, the RPO (worked out at
  scrape time from when the site was last in sync, by :func:`~vmreplica.domain.states.rpo_seconds`:
  an idle VM whose primary heartbeats stays within one interval), pending bytes, recovery
  points.

Base units throughout (seconds, bytes), ``_total`` on counters, ``_timestamp_seconds`` on
instants; ``promtool check metrics`` accepts the exposition (``tests/integration/test_metrics.py``).
The alert rules and the Grafana dashboard in ``deploy/`` use these names, and a test runs every
one of their queries against series named like these.

About 650 lines: every series the agent exposes is declared here, beside the one place that
updates it, so the names the alerts and the dashboard use are all in one file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vmreplica.config import cannot_listen
from vmreplica.domain.model import Position
from vmreplica.domain.states import (
    CYCLES_EXPECTED_STATES,
    Health,
    ReplicationState,
    missed_intervals,
    rpo_seconds,
    waiting_ms,
)
from vmreplica.errors import (
    BrokerError,
    DecodeError,
    FencedError,
    HookError,
    JournalIntegrityError,
    ReplicationError,
)
from vmreplica.failover.requests import REQUEST_TYPES
from vmreplica.runtime.status import PrimaryProgress, VmStatus, interval_seconds

# ``_created`` series double every counter and histogram and only OpenMetrics scrapers use them;
# the agent serves the Prometheus text format.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX: Final = "vmreplica"
LATENCY_BUCKETS_SECONDS: Final = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
)
"""Cut to shipped or applied: well under a second on a quiet link, up to Hyper-V's one-hour
warning when replication stalls."""
APPLY_BUCKETS_SECONDS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Applying one cycle: milliseconds for a few blocks, a minute for a cycle of gigabytes."""
FAILURE_REASONS: Final = ("network", "fenced", "hook", "freeze", "journal", "replication")
"""Why a cycle failed, counted apart as Hyper-V counts network, replication and
application-consistency failures apart."""
FAILOVER_ACTIONS: Final = (
    *((kind, outcome) for kind in REQUEST_TYPES for outcome in ("done", "refused", "failed")),
    ("takeover", "done"),
    ("follow", "done"),
    ("stand_down", "done"),
)
"""(action, outcome) of failover actions: what the CLI asks the agent (each done, refused as
not allowed now, or failed as a mistake), and the role changes the agent makes by itself."""


def failure_reason(error: ReplicationError) -> str:
    """The ``reason`` label of a failed cycle (one of :data:`FAILURE_REASONS`)."""
    if isinstance(error, FencedError):
        return "fenced"
    if isinstance(error, BrokerError):
        return "network"
    if isinstance(error, HookError):
        return "hook"
    if isinstance(error, JournalIntegrityError | DecodeError):
        return "journal"
    return "replication"


def _wall_clock() -> float:
    """Unix time in seconds (looked up at each call, so a test can freeze it)."""
    return time.time()


@dataclass(frozen=True)
class CycleStat:
    """One row of the catalog's cycle statistics (:meth:`Catalog.cycle_stats`)."""

    cycle: int
    cut_at_ms: int
    done_at_ms: int
    """When the cycle was shipped (primary) or applied and durable (replica)."""
    size_bytes: int
    """Bytes on the wire (primary) or payload bytes applied (replica)."""
    started_at_ms: int | None = None
    """When the cycle started on the primary: the previous cut, or a later instant at which
    the primary found nothing waiting (None: recorded before this was kept)."""

    @property
    def latency_seconds(self) -> float:
        return max(0.0, (self.done_at_ms - self.cut_at_ms) / 1000)


def _order(stat: CycleStat) -> tuple[int, int]:
    return stat.done_at_ms, stat.cycle


@dataclass
class CycleTally:
    """What the metrics have counted of one VM's cycles: turns durable statistics into events.

    ``seen`` is the (done time, cycle) of the newest cycle counted; rows after it are new (a
    failover may restart the numbering lower, never the clock). ``last`` is the newest cycle
    known: writes that wait now have waited since it was done, less the time the primary then
    showed nothing waited (:func:`~vmreplica.domain.states.waiting_ms`). ``anchor_ms`` is since
    when a cycle can be missed at all (the tally's start, or the end of a state that expects no
    cycle), and ``missed`` how many cycles of the current wait were already counted.
    """

    seen: tuple[int, int]
    anchor_ms: int
    last: CycleStat | None = None
    missed: int = 0

    @classmethod
    def starting(cls, now_ms: int) -> CycleTally:
        """A tally that counts cycles done from ``now_ms`` on."""
        return cls((now_ms, -1), now_ms)

    @property
    def since_ms(self) -> int:
        """The catalog rows :meth:`new_cycles` needs are those done at or after this."""
        return self.seen[0]

    def new_cycles(self, stats: Iterable[CycleStat]) -> list[CycleStat]:
        """The rows of ``stats`` not counted yet, oldest first; they are counted from now on.

        An older row, the first time, only tells where the next cycle's wait begins.
        """
        ordered = sorted(stats, key=_order)
        new = [s for s in ordered if _order(s) > self.seen]
        if self.last is None:
            self.last = max(
                (s for s in ordered if _order(s) <= self.seen), key=_order, default=None
            )
        if new:
            self.seen = _order(new[-1])
        return new

    def missed_cycles(
        self,
        new: Sequence[CycleStat],
        now_ms: int,
        interval: float,
        expected: bool,
        idle: bool = False,
        idle_at_ms: int | None = None,
        idle_known_within_ms: int = 0,
    ) -> int:
        """Cycles missed since the last call, given the ``new`` cycles done meanwhile.

        ``expected``: the VM's state is one where waiting writes are due every ``interval``;
        while it is not, no interval counts as missed. ``idle``: the primary is live and said
        nothing waits, so none is overdue now; ``idle_at_ms``: the last instant it said so
        since the newest cycle (the time before it was not waiting). A cycle after none known
        adds nothing of its own: how long writes waited for it is not known, and an outage
        before it was counted while it went on.

        A counter never goes back, so the cycle not yet done counts only the wait that is
        certain. When that wait starts at an idle heartbeat, the writes may have begun up to
        ``idle_known_within_ms`` (one heartbeat interval) after it: the idle time is known
        only to the nearest heartbeat. The cycle, when it comes, carries its own start (moved
        forward by every idle check of the primary) and settles the count exactly.
        """
        counted = 0
        for stat in new:
            if expected and self.last is not None:  # after no cycle, the wait is not known
                waited = waiting_ms(
                    self.last.done_at_ms,
                    self.last.cut_at_ms,
                    stat.started_at_ms,
                    stat.done_at_ms,
                    self.anchor_ms,
                )
                counted += max(0, missed_intervals(waited / 1000, interval) - self.missed)
            self.last, self.missed = stat, 0
        if not expected:
            self.anchor_ms = max(now_ms, self.seen[0])
            self.missed = 0
            return 0
        if idle:
            return counted
        last = self.last
        if last is None:
            waited = now_ms - self.anchor_ms
        else:
            waited = waiting_ms(last.done_at_ms, last.cut_at_ms, idle_at_ms, now_ms, self.anchor_ms)
            if idle_at_ms is not None and idle_at_ms > last.cut_at_ms:
                waited = max(0, waited - idle_known_within_ms)
        overdue = missed_intervals(waited / 1000, interval)
        if overdue > self.missed:
            counted += overdue - self.missed
            self.missed = overdue
        return counted


@dataclass(frozen=True)
class VmGauges:
    """Where one VM stands: the values of its gauges in the current snapshot."""

    role: str
    state: ReplicationState
    health: Health
    epoch: int
    interval_seconds: float
    last_cycle: int | None
    last_success_ms: int | None
    """When the last cycle was shipped (primary) or applied (replica)."""
    synced_ms: int | None
    """The newest instant at which the site is known to hold every write of the primary."""
    idle: bool
    """The primary is live and said nothing waits: the RPO stays within one interval."""
    pending_bytes: int | None
    recovery_points: int | None
    cycles_in_window: int
    last_app_consistent_ms: int | None = None
    last_test_failover_ms: int | None = None


class VmSnapshot(Collector):
    """The per-VM gauges, served from the latest :class:`VmGauges` of each VM.

    Built at scrape time, in the HTTP server's thread, from a dictionary the agent replaces as
    a whole: a VM no longer in the catalog, or one whose role changed, leaves no stale series.
    """

    def __init__(
        self,
        site: str,
        clock: Callable[[], float] | None = None,
        *,
        heartbeat_seconds: float = 30.0,
    ) -> None:
        """``heartbeat_seconds``: the site's heartbeat interval, how precisely a primary's idle
        time is known (:meth:`CycleTally.missed_cycles`)."""
        self.site = site
        self.heartbeat_ms = int(heartbeat_seconds * 1000)
        self.clock = clock or _wall_clock
        self.vms: dict[str, VmGauges] = {}

    def collect(self) -> Iterable[Metric]:
        labels = ["site", "vm", "role"]
        state = GaugeMetricFamily(
            f"{PREFIX}_vm_state",
            "1 for the VM's current replication state, 0 for the others.",
            labels=[*labels, "state"],
        )
        health = GaugeMetricFamily(
            f"{PREFIX}_vm_health",
            "1 for the VM's current health (Hyper-V's rules), 0 for the others.",
            labels=[*labels, "health"],
        )
        epoch = GaugeMetricFamily(
            f"{PREFIX}_epoch",
            "The VM's epoch: it grows at every failover or role change.",
            labels=labels,
        )
        interval = GaugeMetricFamily(
            f"{PREFIX}_cycle_interval_seconds",
            "Replication interval: a cycle is due this often.",
            labels=labels,
        )
        cycle = GaugeMetricFamily(
            f"{PREFIX}_last_cycle",
            "Number of the last cycle shipped (primary) or applied (replica).",
            labels=labels,
        )
        success = GaugeMetricFamily(
            f"{PREFIX}_last_successful_cycle_timestamp_seconds",
            "When the last cycle was shipped (primary) or applied (replica), Unix time.",
            labels=labels,
        )
        rpo = GaugeMetricFamily(
            f"{PREFIX}_rpo_seconds",
            "Writes the site may lack, in seconds: now minus the last "
            "instant it held every write of the primary (the cut of the last cycle shipped or "
            "applied, or an idle heartbeat); at most one interval while the primary heartbeats "
            "with nothing waiting.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            f"{PREFIX}_pending_bytes", "Change-log bytes not yet shipped (primary).", labels=labels
        )
        points = GaugeMetricFamily(
            f"{PREFIX}_recovery_points", "Recovery points kept (replica).", labels=labels
        )
        window = GaugeMetricFamily(
            f"{PREFIX}_cycles_in_window",
            "Cycles done in the one-hour monitoring window, from the catalog (survives restarts).",
            labels=labels,
        )
        app_consistent = GaugeMetricFamily(
            f"{PREFIX}_last_app_consistent_timestamp_seconds",
            "When the last application-consistent cycle was cut (Unix time).",
            labels=labels,
        )
        test_failover = GaugeMetricFamily(
            f"{PREFIX}_last_test_failover_timestamp_seconds",
            "When the last test failover was started (Unix time, replica).",
            labels=labels,
        )
        now = self.clock()
        now_ms = int(now * 1000)
        for vm, gauges in sorted(self.vms.items()):
            key = [self.site, vm, gauges.role]
            for name in ReplicationState:
                state.add_metric([*key, name.value], float(name is gauges.state))
            for level in Health:
                health.add_metric([*key, level.value], float(level is gauges.health))
            epoch.add_metric(key, gauges.epoch)
            interval.add_metric(key, gauges.interval_seconds)
            window.add_metric(key, gauges.cycles_in_window)
            if gauges.last_cycle is not None:
                cycle.add_metric(key, gauges.last_cycle)
            if gauges.last_success_ms is not None:
                success.add_metric(key, gauges.last_success_ms / 1000)
            behind = rpo_seconds(now_ms, gauges.synced_ms, gauges.interval_seconds, gauges.idle)
            if behind is not None:
                rpo.add_metric(key, behind)
            if gauges.pending_bytes is not None:
                pending.add_metric(key, gauges.pending_bytes)
            if gauges.recovery_points is not None:
                points.add_metric(key, gauges.recovery_points)
            if gauges.last_app_consistent_ms is not None:
                app_consistent.add_metric(key, gauges.last_app_consistent_ms / 1000)
            if gauges.last_test_failover_ms is not None:
                test_failover.add_metric(key, gauges.last_test_failover_ms / 1000)
        return [
            state,
            health,
            epoch,
            interval,
            cycle,
            success,
            rpo,
            pending,
            points,
            window,
            app_consistent,
            test_failover,
        ]


class SiteMetrics:
    """The metrics of one site's agent, in their own registry.

    The agent calls :meth:`update` for every VM every few seconds, :meth:`retain` with the VMs
    still in the catalog, and the event methods (:meth:`written`, :meth:`applied`,
    :meth:`failed`, :meth:`failover`) as things happen; :meth:`serve` starts the HTTP endpoint.
    """

    def __init__(
        self,
        site: str,
        clock: Callable[[], float] | None = None,
        *,
        heartbeat_seconds: float = 30.0,
    ) -> None:
        """``heartbeat_seconds``: the site's heartbeat interval, how precisely a primary's idle
        time is known (:meth:`CycleTally.missed_cycles`)."""
        self.site = site
        self.heartbeat_ms = int(heartbeat_seconds * 1000)
        self.clock = clock or _wall_clock
        self.started_ms = int(self.clock() * 1000)
        self.registry = CollectorRegistry()
        self.snapshot = VmSnapshot(site, self.clock)
        self.registry.register(self.snapshot)
        ProcessCollector(registry=self.registry)
        vm = ("site", "vm")
        reg = self.registry
        self.shipped = Counter(
            f"{PREFIX}_cycles_shipped_total",
            "Cycles the primary shipped (committed to the journal).",
            vm,
            registry=reg,
        )
        self.applied_cycles = Counter(
            f"{PREFIX}_cycles_applied_total",
            "Cycles the replica applied, durably.",
            vm,
            registry=reg,
        )
        self.missed = Counter(
            f"{PREFIX}_cycles_missed_total",
            "Replication intervals that passed without a cycle while one was due.",
            vm,
            registry=reg,
        )
        self.failures = Counter(
            f"{PREFIX}_cycles_failed_total",
            "Cycles (or replication attempts) that failed, by reason.",
            [*vm, "reason"],
            registry=reg,
        )
        self.written_bytes = Counter(
            f"{PREFIX}_written_bytes_total",
            "Bytes of the VM's "
            "disks its shipped cycles cover (rewrites within a cycle "
            "once; zeroed and trimmed ranges included).",
            vm,
            registry=reg,
        )
        self.sent_bytes = Counter(
            f"{PREFIX}_sent_bytes_total",
            "Bytes the primary sent to the journal (compressed payload and record framing).",
            vm,
            registry=reg,
        )
        self.applied_bytes = Counter(
            f"{PREFIX}_applied_bytes_total",
            "Payload bytes of the cycles the replica applied (as sent, compressed).",
            vm,
            registry=reg,
        )
        self.failovers = Counter(
            f"{PREFIX}_failover_actions_total",
            "Failover actions this agent carried out, by action and outcome.",
            [*vm, "action", "outcome"],
            registry=reg,
        )
        self.ship_latency = Histogram(
            f"{PREFIX}_cycle_ship_latency_seconds",
            "From a cycle's cut to its commit in the journal (primary).",
            vm,
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.apply_latency = Histogram(
            f"{PREFIX}_cycle_apply_latency_seconds",
            "From a "
            "cycle's cut on the primary to applied and durable on "
            "the replica (the two sites' clocks included).",
            vm,
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.apply_time = Histogram(
            f"{PREFIX}_cycle_apply_duration_seconds",
            "Time the replica spent applying a cycle (check, undo log, write, fsync, record).",
            vm,
            buckets=APPLY_BUCKETS_SECONDS,
            registry=reg,
        )
        info = Gauge(
            f"{PREFIX}_agent_info",
            "Always 1: the agent's site and version.",
            ["site", "version"],
            registry=reg,
        )
        info.labels(site, importlib.metadata.version("vmreplica")).set(1)
        self._tallies: dict[str, CycleTally] = {}
        self._actions: dict[str, set[tuple[str, str]]] = {}
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    # Snapshot and cycles, from the catalog ----------------------------------------------------

    def update(
        self,
        status: VmStatus,
        stats: Sequence[CycleStat] = (),
        position: Position | None = None,
        now_ms: int | None = None,
    ) -> None:
        """Set the VM's gauges from its status and count the cycles in ``stats`` not yet seen.

        ``stats`` are the catalog's cycle statistics from :meth:`since_ms` on, and those of
        ``position``'s cycle (for its cut time); ``position`` is the catalog's.
        """
        now = int(self.clock() * 1000) if now_ms is None else now_ms
        record = status.record
        vm = record.name
        tally = self._tallies.get(vm)
        if tally is None:
            tally = self._tallies[vm] = CycleTally.starting(self.started_ms)
            self._touch(vm)
        interval = interval_seconds(record.settings.frequency_seconds)
        new = tally.new_cycles(stats)
        if tally.last is None and position is not None:  # no cycle yet: none due before it
            tally.anchor_ms = max(tally.anchor_ms, position.at_ms)
        for stat in new:
            if record.role == "primary":
                self.shipped.labels(self.site, vm).inc()
                self.sent_bytes.labels(self.site, vm).inc(stat.size_bytes)
                self.ship_latency.labels(self.site, vm).observe(stat.latency_seconds)
            else:
                self.applied_cycles.labels(self.site, vm).inc()
                self.applied_bytes.labels(self.site, vm).inc(stat.size_bytes)
                self.apply_latency.labels(self.site, vm).observe(stat.latency_seconds)
        missed = tally.missed_cycles(
            new,
            now,
            interval,
            record.state in CYCLES_EXPECTED_STATES,
            status.idle,
            status.synced_at_ms,
            self.heartbeat_ms,
        )
        if missed:
            self.missed.labels(self.site, vm).inc(missed)
        success_ms = None
        if position is not None and position.cycle > 0:
            success_ms = position.at_ms
            last = max(
                (s for s in stats if s.cycle == position.cycle),
                key=lambda s: s.done_at_ms,
                default=None,
            )
            if last is not None:
                success_ms = last.done_at_ms
        progress = status.progress
        vms = dict(self.snapshot.vms)
        vms[vm] = VmGauges(
            record.role,
            record.state,
            status.report.health,
            record.epoch,
            interval,
            status.last_cycle,
            success_ms,
            status.synced_at_ms,
            status.idle,
            progress.pending_bytes if isinstance(progress, PrimaryProgress) else None,
            None if isinstance(progress, PrimaryProgress) else progress.recovery_points,
            status.cycles_in_window,
            status.statistics.last_app_consistent_ms if status.statistics else None,
            status.statistics.last_test_failover_ms if status.statistics else None,
        )
        self.snapshot.vms = vms

    def since_ms(self, vm: str) -> int:
        """The cycle statistics :meth:`update` needs for ``vm`` are those done from here on."""
        tally = self._tallies.get(vm)
        return self.started_ms if tally is None else tally.since_ms

    @property
    def _per_vm(self) -> tuple[Counter | Histogram, ...]:
        """The series labelled by site and VM alone."""
        return (
            self.shipped,
            self.applied_cycles,
            self.missed,
            self.written_bytes,
            self.sent_bytes,
            self.applied_bytes,
            self.ship_latency,
            self.apply_latency,
            self.apply_time,
        )

    def retain(self, vms: Iterable[str]) -> None:
        """Forget every VM not in ``vms`` (removed from the catalog): its series go."""
        keep = set(vms)
        for vm in (set(self._tallies) | set(self._actions)) - keep:
            self._tallies.pop(vm, None)
            for metric in self._per_vm:
                with contextlib.suppress(KeyError):
                    metric.remove(self.site, vm)
            for reason in FAILURE_REASONS:
                with contextlib.suppress(KeyError):
                    self.failures.remove(self.site, vm, reason)
            for action, outcome in {*FAILOVER_ACTIONS, *self._actions.pop(vm, set())}:
                with contextlib.suppress(KeyError):
                    self.failovers.remove(self.site, vm, action, outcome)
        self.snapshot.vms = {vm: g for vm, g in self.snapshot.vms.items() if vm in keep}

    def _touch(self, vm: str) -> None:
        """Create the VM's series at zero, so that ``increase()`` sees their first event (a
        series that first appears at 1 looks to Prometheus as if nothing happened)."""
        for metric in self._per_vm:
            metric.labels(self.site, vm)
        for reason in FAILURE_REASONS:
            self.failures.labels(self.site, vm, reason)
        for action, outcome in FAILOVER_ACTIONS:
            self.failovers.labels(self.site, vm, action, outcome)

    # Events, from the agent --------------------------------------------------------------------

    def written(self, vm: str, bytes_written: int) -> None:
        """A shipped cycle covered ``bytes_written`` bytes of the VM's disks."""
        self.written_bytes.labels(self.site, vm).inc(bytes_written)

    def applied(self, vm: str, seconds: float, cycles: int = 1) -> None:
        """The replica spent ``seconds`` applying ``cycles`` cycles (each gets its share)."""
        for _ in range(cycles):
            self.apply_time.labels(self.site, vm).observe(seconds / cycles)

    def failed(self, vm: str, reason: str) -> None:
        """A cycle, or the VM's replication, failed for ``reason`` (:data:`FAILURE_REASONS`)."""
        self.failures.labels(self.site, vm, reason).inc()

    def failover(self, vm: str, action: str, outcome: str = "done") -> None:
        """A failover action (``planned``, ``unplanned``, ``takeover``…) ended in ``outcome``."""
        self._actions.setdefault(vm, set()).add((action, outcome))
        self.failovers.labels(self.site, vm, action, outcome).inc()

    # The endpoint ------------------------------------------------------------------------------

    def serve(self, port: int, address: str = "127.0.0.1") -> str:
        """Serve ``/metrics`` on ``address``:``port`` (0: any free port); return its URL.

        :raises ConfigurationError: the port cannot be listened on, with what to do.
        """
        try:
            self._server = start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:
            raise cannot_listen("metrics_port", "metrics_address", port, address, error) from None
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{self._server[0].server_port}/metrics"

    def stop(self) -> None:
        """Stop serving (blocks for up to half a second); a second call does nothing."""
        if self._server is not None:
            (server, thread), self._server = self._server, None
            server.shutdown()
            server.server_close()
            thread.join()
