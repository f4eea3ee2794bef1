"""Health assessment over any state and window: the rule, and that worse never looks better."""

from __future__ import annotations

from typing import Final

from hypothesis import given
from hypothesis import strategies as st

from vmreplica.domain.states import Health, ReplicationState, WindowStats, assess

CRITICAL_STATES: Final = {ReplicationState.RESYNCHRONIZATION_REQUIRED, ReplicationState.ERROR}
NEEDS_ATTENTION: Final = (
    set(ReplicationState)
    - CRITICAL_STATES
    - {ReplicationState.REPLICATING, ReplicationState.PREPARED_FOR_PLANNED_FAILOVER}
)
RANK: Final = {Health.NORMAL: 0, Health.WARNING: 1, Health.CRITICAL: 2}

states = st.sampled_from(ReplicationState)
seconds = st.one_of(st.none(), st.floats(0, 10 * 86_400, allow_nan=False))
intervals = st.one_of(st.none(), st.sampled_from([1.0, 30.0, 300.0, 900.0]))
ratios = st.one_of(st.none(), st.floats(0, 1, allow_nan=False))


@st.composite
def windows(draw: st.DrawFn) -> WindowStats:
    expected = draw(st.integers(0, 10_000))
    return WindowStats(
        expected,
        draw(st.integers(0, expected + 100)),
        draw(seconds),
        draw(seconds),
        draw(intervals),
        draw(seconds),
        draw(ratios),
        draw(st.booleans()),
    )


@given(states, windows())
def test_health_follows_the_rule(state: ReplicationState, window: WindowStats) -> None:
    report = assess(state, window)
    free = window.storage_free_ratio
    critical = [
        state in CRITICAL_STATES,
        (window.partner_silent_seconds or 0) > 900,
        free is not None and free < 0.02,
    ]
    if any(critical):
        assert (report.health, len(report.reasons)) == (Health.CRITICAL, sum(critical))
        return
    missed = max(0, window.expected_cycles - window.successful_cycles)
    behind = window.seconds_behind or 0
    interval = window.interval_seconds
    warnings = [
        state in NEEDS_ATTENTION,
        5 * missed > window.expected_cycles,  # more than 20 %, in integers
        behind > 3600 or (interval is not None and behind > 3 * interval + 120),
        (window.average_latency_seconds or 0) > 300,
        free is not None and free < 0.05,
        window.over_budget,
    ]
    assert len(report.reasons) == sum(warnings)
    assert report.health is (Health.WARNING if any(warnings) else Health.NORMAL)


@given(
    states,
    windows(),
    st.integers(0, 1_000),
    st.floats(0, 86_400),
    st.floats(0, 3_600),
    st.floats(0, 1),
)
def test_a_worse_window_never_gives_better_health(
    state: ReplicationState,
    window: WindowStats,
    more_missed: int,
    older: float,
    slower: float,
    fuller: float,
) -> None:
    def worse_of(value: float | None, by: float) -> float | None:
        return None if value is None else value + by

    worse = WindowStats(
        window.expected_cycles + more_missed,
        window.successful_cycles,
        worse_of(window.seconds_behind, older),
        worse_of(window.average_latency_seconds, slower),
        window.interval_seconds,
        worse_of(window.partner_silent_seconds, older),
        None if window.storage_free_ratio is None else window.storage_free_ratio * fuller,
        window.over_budget,
    )
    assert RANK[assess(state, worse).health] >= RANK[assess(state, window).health]
    if assess(state, worse).health is assess(state, window).health:
        assert len(assess(state, worse).reasons) >= len(assess(state, window).reasons)
