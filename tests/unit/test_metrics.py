"""The agent's metrics without an agent: counters from the catalog's cycle statistics, missed
cycles from the gaps between them, gauges from the status, and the listener's errors."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import DiskRecord, Position, Role, VmRecord, VmSettings
from vmreplica.domain.states import Health, HealthReport, ReplicationState, missed_intervals
from vmreplica.errors import (
    BrokerError,
    ConfigurationError,
    CorruptEventError,
    FencedError,
    HookError,
    JournalViolation,
    ReplicationError,
)
from vmreplica.runtime.metrics import CycleStat, CycleTally, SiteMetrics, failure_reason
from vmreplica.runtime.status import CaptureStatus, PrimaryProgress, ReplicaProgress, VmStatus

START_MS = 1_800_000_000_000
SECOND_MS = 1000


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def record(
    role: Role = "primary",
    state: ReplicationState = ReplicationState.REPLICATING,
    frequency: int = 30,
    epoch: int = 1,
) -> VmRecord:
    return VmRecord(
        "web",
        role,
        "tg",
        "site-b",
        VmSettings(frequency_seconds=frequency),
        epoch,
        state,
        "",
        START_MS,
        (DiskRecord("disk0", "/d.img", 4096),),
    )


def status(
    vm: VmRecord,
    cycle: int | None = None,
    health: Health = Health.NORMAL,
    synced_ms: int | None = None,
    idle: bool = False,
) -> VmStatus:
    """``synced_ms``: when the site last held every write; ``idle``: the primary heartbeats
    and says nothing waits (what :func:`vm_status` works out from the catalog)."""
    progress: PrimaryProgress | ReplicaProgress = (
        PrimaryProgress(cycle, 512, None, None)
        if vm.role == "primary"
        else ReplicaProgress(cycle, 3)
    )
    return VmStatus(
        vm, CaptureStatus("api"), HealthReport(health, ()), None, 0, progress, synced_ms, idle
    )


def stat(cycle: int, done_ms: int, latency_ms: int = 400, size: int = 1000) -> CycleStat:
    return CycleStat(cycle, done_ms - latency_ms, done_ms, size)


@pytest.mark.parametrize(
    ("gap", "missed"),
    [(0.0, 0), (30.0, 0), (44.9, 0), (45.0, 1), (60.0, 1), (74.0, 1), (75.0, 2), (3600.0, 119)],
)
def test_a_cycle_is_missed_once_it_is_half_an_interval_overdue(gap: float, missed: int) -> None:
    assert missed_intervals(gap, 30.0) == missed


def test_the_tally_counts_each_row_once_and_survives_a_lower_cycle_number() -> None:
    tally = CycleTally.starting(START_MS)
    old = stat(7, START_MS - 1)
    first = [old, stat(8, START_MS + 30_000), stat(9, START_MS + 60_000)]
    assert tally.new_cycles(first) == first[1:]
    assert tally.new_cycles(first) == []
    assert tally.since_ms == START_MS + 60_000
    rewound = stat(5, START_MS + 61_000)  # a failover went back to cycle 4 and applied 5 again
    assert tally.new_cycles([first[2], rewound]) == [rewound]


def test_missed_cycles_are_counted_during_an_outage_and_not_again_after_it() -> None:
    tally = CycleTally.starting(START_MS)
    interval = 30.0
    assert tally.missed_cycles([], START_MS + 40_000, interval, expected=True) == 0
    assert tally.missed_cycles([], START_MS + 46_000, interval, expected=True) == 1
    assert tally.missed_cycles([], START_MS + 50_000, interval, expected=True) == 0
    assert tally.missed_cycles([], START_MS + 80_000, interval, expected=True) == 1
    # the cycle that finally comes at 90 s ends a gap of three intervals: two missed, both
    # already counted
    done = stat(1, START_MS + 90_000)
    assert tally.missed_cycles([done], START_MS + 91_000, interval, expected=True) == 0
    # a refresh that sees two cycles at once counts the skipped one between them
    late = [stat(2, START_MS + 120_000), stat(3, START_MS + 180_000)]
    assert tally.missed_cycles(late, START_MS + 181_000, interval, expected=True) == 1


def test_no_cycle_is_missed_while_none_is_due() -> None:
    tally = CycleTally.starting(START_MS)
    assert tally.missed_cycles([], START_MS + 3_600_000, 30.0, expected=False) == 0
    assert tally.missed_cycles([], START_MS + 3_630_000, 30.0, expected=True) == 0
    assert tally.missed_cycles([], START_MS + 3_650_000, 30.0, expected=True) == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (BrokerError("broker away"), "network"),
        (FencedError("a newer primary"), "fenced"),
        (HookError("pre-cut hook exited 1"), "hook"),
        (JournalViolation("web", 7, "gap", ReplicationState.ERROR), "journal"),
        (CorruptEventError("bad CRC"), "journal"),
        (ReplicationError("something else"), "replication"),
    ],
)
def test_failures_are_counted_by_reason(error: ReplicationError, reason: str) -> None:
    assert failure_reason(error) == reason


def test_shipped_cycles_count_once_with_latency_bytes_and_rpo() -> None:
    clock = Clock(START_MS)
    metrics = SiteMetrics("site-a", clock)
    vm = record()
    rows = [
        stat(1, START_MS - 10_000),
        stat(2, START_MS + 20_000, latency_ms=1500, size=700),
        stat(3, START_MS + 50_000, size=300),
    ]
    clock.ms = START_MS + 52_000
    position = Position(1, 3, bytes(32), 40, START_MS + 50_000)
    synced = rows[-1].cut_at_ms
    metrics.update(status(vm, 3, synced_ms=synced), rows, position)
    metrics.update(status(vm, 3, synced_ms=synced), rows, position)  # the same rows: nothing new
    metrics.written("web", 8192)
    labels = {"site": "site-a", "vm": "web"}
    sample = metrics.registry.get_sample_value
    assert sample("vmreplica_cycles_shipped_total", labels) == 2
    assert sample("vmreplica_cycles_applied_total", labels) == 0
    assert sample("vmreplica_sent_bytes_total", labels) == 1000
    assert sample("vmreplica_written_bytes_total", labels) == 8192
    assert sample("vmreplica_cycle_ship_latency_seconds_count", labels) == 2
    assert sample("vmreplica_cycle_ship_latency_seconds_sum", labels) == 1.9
    assert sample("vmreplica_cycle_ship_latency_seconds_bucket", {**labels, "le": "0.5"}) == 1
    assert sample("vmreplica_cycles_missed_total", labels) == 0
    assert sample("vmreplica_cycles_failed_total", {**labels, "reason": "network"}) == 0
    assert (
        sample(
            "vmreplica_failover_actions_total",  # at 0 before its first event
            {**labels, "action": "planned", "outcome": "done"},
        )
        == 0
    )
    with_role = {**labels, "role": "primary"}
    assert sample("vmreplica_last_cycle", with_role) == 3
    assert (
        sample("vmreplica_last_successful_cycle_timestamp_seconds", with_role)
        == (START_MS + 50_000) / 1000
    )
    assert sample("vmreplica_rpo_seconds", with_role) == pytest.approx(2.4)
    assert sample("vmreplica_pending_bytes", with_role) == 512
    assert sample("vmreplica_recovery_points", with_role) is None
    assert sample("vmreplica_cycle_interval_seconds", with_role) == 30
    assert sample("vmreplica_epoch", with_role) == 1
    clock.ms += 100_000  # the RPO is worked out when Prometheus scrapes
    assert sample("vmreplica_rpo_seconds", with_role) == pytest.approx(102.4)
    assert sample("vmreplica_cycles_missed_total", labels) == 0  # counted at the next update
    metrics.update(status(vm, 3, synced_ms=synced), rows, position)
    assert sample("vmreplica_cycles_missed_total", labels) == 2  # due at 80 s and 110 s


def test_applied_cycles_apply_time_failures_and_failovers() -> None:
    clock = Clock(START_MS)
    metrics = SiteMetrics("site-b", clock)
    vm = record("replica")
    clock.ms += 31_000
    rows = [stat(1, START_MS + 30_000, latency_ms=2_000, size=4096)]
    metrics.update(
        status(vm, 1, synced_ms=rows[0].cut_at_ms),
        rows,
        Position(1, 1, bytes(32), 9, START_MS + 30_000),
    )
    metrics.applied("web", 0.3, 3)
    metrics.failed("web", "network")
    metrics.failover("web", "unplanned", "refused")
    labels = {"site": "site-b", "vm": "web"}
    sample = metrics.registry.get_sample_value
    assert sample("vmreplica_cycles_applied_total", labels) == 1
    assert sample("vmreplica_applied_bytes_total", labels) == 4096
    assert sample("vmreplica_cycle_apply_latency_seconds_sum", labels) == 2.0
    assert sample("vmreplica_cycle_apply_duration_seconds_count", labels) == 3
    assert sample("vmreplica_cycle_apply_duration_seconds_sum", labels) == pytest.approx(0.3)
    assert sample("vmreplica_cycles_failed_total", {**labels, "reason": "network"}) == 1
    assert (
        sample(
            "vmreplica_failover_actions_total",
            {**labels, "action": "unplanned", "outcome": "refused"},
        )
        == 1
    )
    with_role = {**labels, "role": "replica"}
    assert sample("vmreplica_recovery_points", with_role) == 3
    assert sample("vmreplica_pending_bytes", with_role) is None
    assert sample("vmreplica_rpo_seconds", with_role) == pytest.approx(3.0)


def test_state_and_health_are_labels_and_a_role_change_leaves_no_stale_series() -> None:
    metrics = SiteMetrics("site-a", Clock(START_MS))
    vm = record(state=ReplicationState.RESYNCHRONIZATION_REQUIRED)
    metrics.update(status(vm, health=Health.CRITICAL))
    sample = metrics.registry.get_sample_value
    primary = {"site": "site-a", "vm": "web", "role": "primary"}
    states = {
        s.value: sample("vmreplica_vm_state", {**primary, "state": s.value})
        for s in ReplicationState
    }
    assert states == {
        s.value: float(s is ReplicationState.RESYNCHRONIZATION_REQUIRED) for s in ReplicationState
    }
    assert sample("vmreplica_vm_health", {**primary, "health": "critical"}) == 1
    assert sample("vmreplica_vm_health", {**primary, "health": "normal"}) == 0
    assert sample("vmreplica_rpo_seconds", primary) is None  # no cycle yet: no RPO
    metrics.update(status(replace(vm, role="replica", epoch=2)))
    replica = {**primary, "role": "replica"}
    assert sample("vmreplica_epoch", replica) == 2
    assert sample("vmreplica_epoch", primary) is None
    assert sample("vmreplica_vm_state", {**primary, "state": "replicating"}) is None


def test_a_vm_removed_from_the_catalog_loses_every_series() -> None:
    metrics = SiteMetrics("site-a", Clock(START_MS))
    metrics.update(status(record()))
    metrics.failover("web", "planned")
    metrics.failover("ghost", "unplanned", "failed")  # a request for a VM never in the catalog
    metrics.retain([])
    names = {
        sample.labels.get("vm")
        for family in metrics.registry.collect()
        for sample in family.samples
    }
    assert names & {"web", "ghost"} == set()


def test_a_taken_metrics_port_is_one_line_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = SiteMetrics("site-a")
        with pytest.raises(ConfigurationError) as raised:
            metrics.serve(port, "127.0.0.1")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot listen on 127.0.0.1 port {port} (`metrics_port`): "
        "Address already in use. Operator action: stop the process"
    )
    assert "set `metrics_port` to a free port" in message


def test_metrics_are_served_on_the_configured_address_and_stop() -> None:
    metrics = SiteMetrics("site-a")
    url = metrics.serve(0, "127.0.0.1")
    try:
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
    finally:
        metrics.stop()
        metrics.stop()  # a second stop does nothing


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "::1", "192.0.2.7"])
def test_the_metrics_address_is_any_ip_address(address: str) -> None:
    assert SiteConfig(metrics_address=address).metrics_address == address


@pytest.mark.parametrize("address", ["localhost", "0.0.0.0:9100", "", "300.1.1.1"])
def test_a_metrics_address_that_is_not_an_ip_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        SiteConfig(metrics_address=address)


def test_writes_after_an_idle_stretch_are_not_counted_missed_before_their_cycle() -> None:
    """The replica knows the primary's idle time only to the nearest heartbeat (30 s): after
    ten idle minutes, writes begin 29 s after the last idle heartbeat and ship at the next cut,
    30 s after the primary's last idle check. No cycle was missed, and none may be counted in
    the meantime: a counter cannot take it back when the cycle comes."""
    interval, beat = 30.0, 30_000
    cycle_1 = CycleStat(1, START_MS - 500, START_MS, 1000, START_MS - 30_500)
    idle_beat = START_MS + 600_000  # "nothing waits", ten minutes later
    for heartbeat_ms, counted_before in ((beat, 0), (0, 1)):  # the fix, and what it fixes
        tally = CycleTally.starting(START_MS - HOUR_MS)
        tally.missed_cycles(tally.new_cycles([cycle_1]), START_MS + 1_000, interval, True)
        # 50.4 s after the idle heartbeat, the cycle not arrived yet; writes wait since 29 s
        before = tally.missed_cycles(
            [], idle_beat + 50_400, interval, True, False, idle_beat, heartbeat_ms
        )
        assert before == counted_before
        # the cycle: its start is the primary's last idle check, 20 s after the heartbeat
        cycle_2 = CycleStat(2, idle_beat + 50_000, idle_beat + 50_500, 1000, idle_beat + 20_000)
        after = tally.missed_cycles(
            tally.new_cycles([cycle_1, cycle_2]), idle_beat + 51_000, interval, True
        )
        assert after == 0  # exact: nothing was missed (the old count could not be taken back)


def test_a_real_outage_after_an_idle_stretch_is_still_counted_exactly() -> None:
    interval, beat = 30.0, 30_000
    cycle_1 = CycleStat(1, START_MS - 500, START_MS, 1000, START_MS - 30_500)
    idle_beat = START_MS + 600_000
    tally = CycleTally.starting(START_MS - HOUR_MS)
    tally.missed_cycles(tally.new_cycles([cycle_1]), START_MS + 1_000, interval, True)
    during = tally.missed_cycles([], idle_beat + 330_000, interval, True, False, idle_beat, beat)
    assert during == 9  # certain: writes waited 300 s at least (10 intervals, the first due)
    late = CycleStat(2, idle_beat + 334_500, idle_beat + 335_000, 1000, idle_beat + 20_000)
    settled = tally.missed_cycles(
        tally.new_cycles([cycle_1, late]), idle_beat + 336_000, interval, True
    )
    assert during + settled == 9  # 314.5 s waited for the cycle: nine missed, counted once


def test_site_metrics_take_the_heartbeat_interval_into_account() -> None:
    clock = Clock(START_MS)
    metrics = SiteMetrics("site-b", clock, heartbeat_seconds=30.0)
    vm = record("replica")
    rows = [CycleStat(1, START_MS - 500, START_MS, 1000, START_MS - 30_500)]
    position = Position(1, 1, bytes(32), 9, START_MS)
    metrics.update(status(vm, 1, synced_ms=START_MS - 500), rows, position)
    idle_beat = START_MS + 600_000
    clock.ms = idle_beat + 50_400
    metrics.update(status(vm, 1, synced_ms=idle_beat), rows, position)
    labels = {"site": "site-b", "vm": "web"}
    assert metrics.registry.get_sample_value("vmreplica_cycles_missed_total", labels) == 0
