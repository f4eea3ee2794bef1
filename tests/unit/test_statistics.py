"""Measure-VMReplication's statistics and the health they make (``vmreplica.domain.statistics``),
with the clock passed in: an hour of cycles, an outage, a reset, a silent primary, in
microseconds of test time.
"""

from __future__ import annotations

from typing import Final

from vmreplica.domain.events import EventId
from vmreplica.domain.model import VmRecord, VmSettings
from vmreplica.domain.states import (
    Health,
    HealthReport,
    LastHeartbeat,
    ReplicationState,
    WindowStats,
    assess,
    rpo_bound_seconds,
)
from vmreplica.domain.statistics import (
    MONITORING_WINDOW_MS,
    CycleRow,
    DurableStatistics,
    SiteFacts,
    WindowInputs,
    measure,
)

NOW_MS: Final = 1_800_000_000_000
MINUTE_MS: Final = 60_000
HEARTBEAT_SECONDS: Final = 30.0


def record(
    role: str = "primary",
    state: ReplicationState = ReplicationState.REPLICATING,
    frequency: int = 30,
    changed_ms: int = 0,
) -> VmRecord:
    return VmRecord(
        "web",
        role,  # type: ignore[arg-type]
        "tg",
        "site-b",
        VmSettings(frequency_seconds=frequency),
        1,
        state,
        "",
        changed_ms,
        (),
    )


def cycles(first_done_ms: int, count: int, every_ms: int = 30_000) -> list[CycleRow]:
    """``count`` cycles, one every ``every_ms``; cycle n is n KiB, cut n seconds before done."""
    return [
        CycleRow(
            n,
            first_done_ms + (n - 1) * every_ms - n * 1000,
            first_done_ms + (n - 1) * every_ms,
            n * 1024,
            first_done_ms + (n - 2) * every_ms - (n - 1) * 1000,
        )
        for n in range(1, count + 1)
    ]


def inputs(
    rows: list[CycleRow],
    vm: VmRecord | None = None,
    *,
    heartbeat: LastHeartbeat | None = None,
    failures: dict[int, int] | None = None,
    durable: DurableStatistics | None = None,
    since_ms: int = NOW_MS - MONITORING_WINDOW_MS,
) -> WindowInputs:
    return WindowInputs(
        vm or record(),
        since_ms,
        rows,
        None,
        heartbeat,
        failures or {},
        durable or DurableStatistics(),
    )


def test_the_figures_of_a_steady_window() -> None:
    rows = cycles(NOW_MS - 10 * 30_000, 10)  # the last one 30 s ago
    measured = measure(
        inputs(
            rows,
            failures={
                EventId.FAILED_NETWORK: 2,
                EventId.FAILED_APPLICATION_CONSISTENT: 1,
                EventId.FAILED_JOURNAL: 1,
                EventId.FAILED_FENCED: 1,
                9999: 7,  # an id of a newer version is not a failure kind
            },
            durable=DurableStatistics(None, 123, NOW_MS - 2 * MINUTE_MS, NOW_MS - MINUTE_MS, 5),
        ),
        SiteFacts(pending_bytes=4096, unsent_seed_bytes=100),
        NOW_MS,
        HEARTBEAT_SECONDS,
    )
    s = measured.statistics
    assert (s.monitoring_start_ms, s.monitoring_end_ms) == (NOW_MS - MONITORING_WINDOW_MS, NOW_MS)
    assert (s.average_size_bytes, s.maximum_size_bytes) == (5632, 10240)  # 5.5 KiB, 10 KiB
    assert (s.average_latency_seconds, s.maximum_latency_seconds) == (5.5, 10.0)
    assert (s.successful_cycles, s.missed_cycles) == (10, 0)
    assert s.failed_cycles == {"network": 2, "replication": 2, "application_consistent": 1}
    assert s.errors == 5
    assert s.pending_bytes == 4196  # the change log and the unsent part of the seed
    assert s.last_replication_ms == rows[-1].done_ms
    assert (s.initial_replication_bytes, s.last_app_consistent_ms, s.last_test_failover_ms) == (
        123,
        NOW_MS - MINUTE_MS,
        5,
    )
    assert measured.report == HealthReport(Health.NORMAL, ())
    assert measured.rpo_seconds == 40.0  # the last cut was 10 s before its cycle was done


def test_a_replica_has_no_pending_bytes() -> None:
    vm = record("replica")
    measured = measure(
        inputs(cycles(NOW_MS - 30_000, 1), vm), SiteFacts(), NOW_MS, HEARTBEAT_SECONDS
    )
    assert measured.statistics.pending_bytes is None


def test_an_outage_turns_missed_cycles_into_a_warning_and_a_reset_clears_it() -> None:
    # Cycles every 30 s until 20.5 minutes ago, then writes waited: 41 intervals, the first
    # one due, 40 missed (a cycle counts as missed once half an interval overdue).
    rows = cycles(NOW_MS - 40 * MINUTE_MS, 40)
    outage = measure(inputs(rows), SiteFacts(), NOW_MS, HEARTBEAT_SECONDS)
    assert outage.statistics.missed_cycles == 40
    assert outage.report.health is Health.WARNING
    assert outage.report.reasons[0] == "40 of 80 cycles missed"
    # reset-statistics two minutes ago: only what waited since then counts
    reset = NOW_MS - 2 * MINUTE_MS
    later = measure(
        inputs(rows, since_ms=reset, durable=DurableStatistics(reset_at_ms=reset)),
        SiteFacts(),
        NOW_MS,
        HEARTBEAT_SECONDS,
    )
    assert (later.statistics.successful_cycles, later.statistics.missed_cycles) == (0, 3)
    assert later.statistics.monitoring_start_ms == reset
    # the RPO is a fact, not a statistic: still over its bound after the reset
    assert later.report.reasons == (
        "3 of 3 cycles missed",
        "RPO 1270 s, above 210 s (three intervals of 30 s and two minutes)",
    )


def test_an_idle_heartbeating_vm_misses_nothing() -> None:
    rows = cycles(NOW_MS - 50 * MINUTE_MS, 1)
    beat = LastHeartbeat(NOW_MS - 10_000, NOW_MS - 10_000, idle=True)
    measured = measure(inputs(rows, heartbeat=beat), SiteFacts(), NOW_MS, HEARTBEAT_SECONDS)
    assert (measured.statistics.missed_cycles, measured.idle) == (0, True)
    assert measured.report == HealthReport(Health.NORMAL, ())


def test_a_silent_primary_makes_its_replica_critical_after_fifteen_minutes() -> None:
    vm = record("replica")
    beat = LastHeartbeat(NOW_MS - 14 * MINUTE_MS, NOW_MS - 14 * MINUTE_MS, idle=True)
    rows = cycles(NOW_MS - 20 * MINUTE_MS, 1)
    before = measure(inputs(rows, vm, heartbeat=beat), SiteFacts(), NOW_MS, HEARTBEAT_SECONDS)
    assert before.report.health is Health.WARNING  # 14 minutes behind: over three intervals
    after = measure(
        inputs(rows, vm, heartbeat=beat), SiteFacts(), NOW_MS + 2 * MINUTE_MS, HEARTBEAT_SECONDS
    )
    assert after.report == HealthReport(
        Health.CRITICAL, ("nothing heard from the primary for 16 minutes",)
    )
    # a primary is not judged by this rule, nor a replica that failed over
    for other in (record("primary"), record("replica", ReplicationState.FAILED_OVER)):
        measured = measure(
            inputs(rows, other, heartbeat=beat),
            SiteFacts(),
            NOW_MS + 2 * MINUTE_MS,
            HEARTBEAT_SECONDS,
        )
        assert measured.report.health is not Health.CRITICAL


def test_storage_and_budget_rules() -> None:
    rows = cycles(NOW_MS - 30_000, 1)
    low = measure(inputs(rows), SiteFacts(storage_free_ratio=0.04), NOW_MS, HEARTBEAT_SECONDS)
    assert low.report == HealthReport(Health.WARNING, ("storage root 4.0% free",))
    full = measure(inputs(rows), SiteFacts(storage_free_ratio=0.01), NOW_MS, HEARTBEAT_SECONDS)
    assert full.report == HealthReport(Health.CRITICAL, ("storage root 1.0% free",))
    budget = measure(inputs(rows), SiteFacts(over_budget=True), NOW_MS, HEARTBEAT_SECONDS)
    assert budget.report == HealthReport(
        Health.WARNING, ("change log over its budget: tracking dirty blocks until the cut",)
    )


def test_the_rpo_bound_is_three_intervals_and_two_minutes() -> None:
    assert [rpo_bound_seconds(i) for i in (1, 30, 300, 900)] == [123, 210, 1020, 2820]
    at = WindowStats(1, 1, 210.0, 1.0, 30.0)
    over = WindowStats(1, 1, 210.5, 1.0, 30.0)
    assert assess(ReplicationState.REPLICATING, at) == HealthReport(Health.NORMAL, ())
    assert assess(ReplicationState.REPLICATING, over).reasons == (
        "RPO 210 s, above 210 s (three intervals of 30 s and two minutes)",
    )


def test_a_critical_reason_hides_the_warnings_but_not_the_other_critical_ones() -> None:
    stats = WindowStats(10, 0, 7200.0, 900.0, 30.0, 3600.0, 0.001, True)
    assert assess(ReplicationState.ERROR, stats) == HealthReport(
        Health.CRITICAL,
        (
            "state is error",
            "nothing heard from the primary for 60 minutes",
            "storage root 0.1% free",
        ),
    )
