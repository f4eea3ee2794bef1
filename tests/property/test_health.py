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


@st.composite
def windows(draw: st.DrawFn) -> WindowStats:
    expected = draw(st.integers(0, 10_000))
    return WindowStats(expected, draw(st.integers(0, expected + 100)), draw(seconds), draw(seconds))


@given(states, windows())
def test_health_follows_the_rule(state: ReplicationState, window: WindowStats) -> None:
    report = assess(state, window)
    if state in CRITICAL_STATES:
        assert (report.health, report.reasons) == (Health.CRITICAL, (f"state is {state.value}",))
        return
    missed = max(0, window.expected_cycles - window.successful_cycles)
    warnings = [
        state in NEEDS_ATTENTION,
        5 * missed > window.expected_cycles,  # more than 20 %, in integers
        (window.seconds_behind or 0) > 3600,
        (window.average_latency_seconds or 0) > 300,
    ]
    assert len(report.reasons) == sum(warnings)
    assert report.health is (Health.WARNING if any(warnings) else Health.NORMAL)


@given(states, windows(), st.integers(0, 1_000), st.floats(0, 86_400), st.floats(0, 3_600))
def test_a_worse_window_never_gives_better_health(
    state: ReplicationState, window: WindowStats, more_missed: int, older: float, slower: float
) -> None:
    worse = WindowStats(
        window.expected_cycles + more_missed,
        window.successful_cycles,
        None if window.seconds_behind is None else window.seconds_behind + older,
        None if window.average_latency_seconds is None else window.average_latency_seconds + slower,
    )
    assert RANK[assess(state, worse).health] >= RANK[assess(state, window).health]
    assert len(assess(state, worse).reasons) >= len(assess(state, window).reasons)
