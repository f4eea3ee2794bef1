"""Health by Hyper-V's rules (``vmreplica.domain.states.assess``), at and around each threshold.

Critical: resynchronization required or error, whatever the statistics. Warning: a state that
needs attention, more than 20 % of the window's cycles missed, more than an hour behind the
primary, or an average latency above five minutes — each with the reason an operator reads.
"""

from __future__ import annotations

from typing import Final

import pytest

from vmreplica.domain.states import (
    LATENCY_WARNING_SECONDS,
    MISSED_CYCLES_WARNING_RATIO,
    STALE_CYCLE_WARNING_SECONDS,
    Health,
    HealthReport,
    ReplicationState,
    WindowStats,
    assess,
)

State = ReplicationState
PERFECT: Final = WindowStats(
    expected_cycles=12, successful_cycles=12, seconds_behind=30.0, average_latency_seconds=2.0
)
"""A window in which every cycle arrived, recently and quickly."""
BAD: Final = WindowStats(
    expected_cycles=10,
    successful_cycles=0,
    seconds_behind=86_400.0,
    average_latency_seconds=3_600.0,
)
"""A window in which everything that can be wrong is."""

HEALTH_OF_STATE: Final = {
    State.READY_FOR_INITIAL_REPLICATION: Health.WARNING,
    State.INITIAL_REPLICATION_IN_PROGRESS: Health.WARNING,
    State.WAITING_FOR_INITIAL_REPLICATION: Health.WARNING,
    State.REPLICATING: Health.NORMAL,
    State.SUSPENDED: Health.WARNING,
    State.PREPARED_FOR_PLANNED_FAILOVER: Health.NORMAL,
    State.FAILED_OVER_WAITING_COMPLETION: Health.WARNING,
    State.FAILED_OVER: Health.WARNING,
    State.RESYNCHRONIZATION_REQUIRED: Health.CRITICAL,
    State.RESYNCHRONIZING: Health.WARNING,
    State.ERROR: Health.CRITICAL,
}
"""Each state's health with nothing else wrong."""


def stats(
    expected: int = 12,
    successful: int = 12,
    since: float | None = 30.0,
    latency: float | None = 2.0,
) -> WindowStats:
    """A window; ``since``: seconds behind the primary (the RPO)."""
    return WindowStats(expected, successful, since, latency)


def test_the_thresholds_are_hyper_v_s() -> None:
    assert (MISSED_CYCLES_WARNING_RATIO, STALE_CYCLE_WARNING_SECONDS, LATENCY_WARNING_SECONDS) == (
        0.20,
        3600,
        300,
    )


def test_every_state_has_a_decided_health() -> None:
    assert set(HEALTH_OF_STATE) == set(ReplicationState)


@pytest.mark.parametrize("state", list(ReplicationState), ids=lambda s: s.name.lower())
def test_the_state_alone(state: ReplicationState) -> None:
    health = HEALTH_OF_STATE[state]
    reasons = () if health is Health.NORMAL else (f"state is {state.value}",)
    assert assess(state, PERFECT) == HealthReport(health, reasons)


@pytest.mark.parametrize("state", [State.RESYNCHRONIZATION_REQUIRED, State.ERROR])
def test_a_critical_state_is_critical_whatever_the_window_and_names_only_itself(
    state: ReplicationState,
) -> None:
    assert assess(state, BAD) == HealthReport(Health.CRITICAL, (f"state is {state.value}",))
    assert assess(state, stats(0, 0, None, None)) == HealthReport(
        Health.CRITICAL, (f"state is {state.value}",)
    )


@pytest.mark.parametrize(
    ("expected", "successful", "report"),
    [
        (10, 8, HealthReport(Health.NORMAL, ())),  # exactly 20 %: not more than 20 %
        (5, 4, HealthReport(Health.NORMAL, ())),
        (100, 80, HealthReport(Health.NORMAL, ())),
        (9, 7, HealthReport(Health.WARNING, ("2 of 9 cycles missed",))),  # 22 %
        (100, 79, HealthReport(Health.WARNING, ("21 of 100 cycles missed",))),
        (1, 0, HealthReport(Health.WARNING, ("1 of 1 cycles missed",))),
        (10, 0, HealthReport(Health.WARNING, ("10 of 10 cycles missed",))),
        (0, 0, HealthReport(Health.NORMAL, ())),  # an empty window misses nothing
        (4, 9, HealthReport(Health.NORMAL, ())),  # more cycles than expected (continuous mode)
    ],
)
def test_more_than_a_fifth_of_the_cycles_missed_is_a_warning(
    expected: int, successful: int, report: HealthReport
) -> None:
    assert assess(State.REPLICATING, stats(expected, successful)) == report


def test_missed_cycles_never_go_below_zero() -> None:
    assert stats(4, 9).missed_cycles == 0
    assert stats(9, 4).missed_cycles == 5


@pytest.mark.parametrize(
    ("since", "report"),
    [
        (None, HealthReport(Health.NORMAL, ())),  # nothing replicated yet in this window
        (3600.0, HealthReport(Health.NORMAL, ())),  # exactly an hour: not more than an hour
        (3600.5, HealthReport(Health.WARNING, ("60 minutes behind the primary",))),
        (
            3690.0,
            HealthReport(Health.WARNING, ("62 minutes behind the primary",)),
        ),  # 61.5 rounds even
        (7200.0, HealthReport(Health.WARNING, ("120 minutes behind the primary",))),
        (86_400.0, HealthReport(Health.WARNING, ("1440 minutes behind the primary",))),
    ],
)
def test_more_than_an_hour_behind_the_primary_is_a_warning(
    since: float | None, report: HealthReport
) -> None:
    assert assess(State.REPLICATING, stats(since=since)) == report


@pytest.mark.parametrize(
    ("latency", "report"),
    [
        (None, HealthReport(Health.NORMAL, ())),
        (300.0, HealthReport(Health.NORMAL, ())),  # exactly five minutes
        (300.4, HealthReport(Health.WARNING, ("average latency 300 s",))),
        (301.0, HealthReport(Health.WARNING, ("average latency 301 s",))),
        (1_800.0, HealthReport(Health.WARNING, ("average latency 1800 s",))),
    ],
)
def test_an_average_latency_above_five_minutes_is_a_warning(
    latency: float | None, report: HealthReport
) -> None:
    assert assess(State.REPLICATING, stats(latency=latency)) == report


def test_every_reason_is_listed_in_a_fixed_order() -> None:
    assert assess(State.SUSPENDED, BAD) == HealthReport(
        Health.WARNING,
        (
            "state is suspended",
            "10 of 10 cycles missed",
            "1440 minutes behind the primary",
            "average latency 3600 s",
        ),
    )
    assert assess(State.REPLICATING, BAD).reasons == (
        "10 of 10 cycles missed",
        "1440 minutes behind the primary",
        "average latency 3600 s",
    )
