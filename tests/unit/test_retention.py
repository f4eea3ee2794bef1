"""Retention policies: validation, which points each mode keeps, and what undo may be pruned."""

from __future__ import annotations

import pytest

from vmreplica.consumers.retention import RetentionPolicy, oldest_needed_cycle, select_points
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import Consistency, RecoveryPoint
from vmreplica.errors import ConfigurationError

MINUTE_MS = 60_000
NOW_MS = 1_000 * HOUR_MS + 30 * MINUTE_MS
"""Half past an hour, so the current clock hour is half over."""


def point(cycle: int, cut_at_ms: int, consistency: str = "crash") -> RecoveryPoint:
    return RecoveryPoint(
        cycle=cycle,
        epoch=1,
        journal_offset=cycle * 10,
        cut_at_ms=cut_at_ms,
        consistency=Consistency.parse(consistency),
    )


def every_ten_minutes(hours: int) -> list[RecoveryPoint]:
    """Points cut every 10 minutes for ``hours`` hours up to now, oldest first."""
    count = hours * 6
    return [point(cycle, NOW_MS - (count - cycle) * 10 * MINUTE_MS) for cycle in range(count + 1)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "hourly", "hours": 25}, "recovery history must be 0-24 hours, got 25"),
        ({"mode": "hourly", "hours": -1}, "recovery history must be 0-24 hours, got -1"),
        (
            {"mode": "weekly"},
            "retention mode must be 'latest', 'hourly' or 'every_cycle', got 'weekly'",
        ),
        (
            {"mode": "latest", "hours": 4},
            "retention mode 'latest' keeps no history, but hours is 4: "
            "set hours to 0, or use mode 'hourly' or 'every_cycle'",
        ),
        (
            {"mode": "every_cycle", "hours": 0},
            "retention mode 'every_cycle' needs 1-24 hours of "
            "history; use mode 'latest' to keep only the newest point",
        ),
        (
            {"mode": "latest", "app_consistent_hours": 4},
            "application-consistent points need recovery "
            "history: use mode 'hourly' or 'every_cycle'",
        ),
        (
            {"mode": "hourly", "hours": 24, "app_consistent_hours": 13},
            "application-consistent points must come every 1-12 hours, got 13",
        ),
        (
            {"mode": "hourly", "hours": 4, "app_consistent_hours": 6},
            "application-consistent points every 6 hours would fall outside "
            "a recovery history of 4 hours: raise hours to at least 6",
        ),
    ],
)
def test_invalid_policies_are_refused(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RetentionPolicy(**arguments)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_invalid_consistency_is_refused() -> None:
    with pytest.raises(
        ConfigurationError, match="consistency must be 'crash' or 'application', got 'vss'"
    ):
        point(1, 0, "vss")


def test_no_candidates_keep_nothing() -> None:
    assert select_points([], RetentionPolicy("hourly", 24), NOW_MS) == ()
    assert oldest_needed_cycle(()) is None


def test_latest_keeps_only_the_newest_point() -> None:
    candidates = every_ten_minutes(3)
    assert select_points(candidates[::-1], RetentionPolicy(), NOW_MS) == (candidates[-1],)


def test_latest_is_kept_even_when_older_than_the_history() -> None:
    old = point(5, NOW_MS - 30 * HOUR_MS)
    assert select_points([old], RetentionPolicy("hourly", 2), NOW_MS) == (old,)


def test_hourly_keeps_the_newest_point_of_each_clock_hour() -> None:
    candidates = every_ten_minutes(3)
    kept = select_points(candidates, RetentionPolicy("hourly", 2), NOW_MS)
    # History starts at 998:30; hours 998, 999 and 1000 each keep their :50 point (or the
    # newest, in the hour now running).
    assert [p.cycle for p in kept] == [8, 14, 18]
    assert [(p.cut_at_ms - 998 * HOUR_MS) // MINUTE_MS for p in kept] == [50, 110, 150]


def test_hourly_selection_is_stable_as_time_passes() -> None:
    candidates = every_ten_minutes(30)
    policy = RetentionPolicy("hourly", 24)
    kept = select_points(candidates, policy, NOW_MS)
    assert len(kept) == 25
    later = select_points(kept, policy, NOW_MS + 3 * HOUR_MS)
    again = select_points(candidates, policy, NOW_MS + 3 * HOUR_MS)
    assert later == again
    assert len(later) == 22


def test_hourly_keeps_application_consistent_points_at_their_cadence() -> None:
    candidates = every_ten_minutes(6)
    # Points run from 994:30 to 1000:30. Application-consistent ones at 995:10, 997:10 and
    # 997:20: none is the newest of its hour; per 2-hour slot (994-995, 996-997) the newest
    # application-consistent point is kept, so 997:10 goes and 997:20 stays.
    for cycle in (4, 16, 17):
        candidates[cycle] = point(cycle, candidates[cycle].cut_at_ms, "application")
    kept = select_points(candidates, RetentionPolicy("hourly", 6, app_consistent_hours=2), NOW_MS)
    assert [p.cycle for p in kept] == [2, 4, 8, 14, 17, 20, 26, 32, 36]
    without = select_points(candidates, RetentionPolicy("hourly", 6), NOW_MS)
    assert [p.cycle for p in without] == [2, 8, 14, 20, 26, 32, 36]


def test_every_cycle_keeps_every_point_in_the_history() -> None:
    candidates = every_ten_minutes(4)
    kept = select_points(candidates, RetentionPolicy("every_cycle", 2), NOW_MS)
    assert kept == tuple(candidates[12:])


def test_duplicate_cycles_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="two recovery points claim cycle 3"):
        select_points([point(3, 0), point(3, 1)], RetentionPolicy(), NOW_MS)


def test_oldest_needed_cycle_is_the_oldest_kept_point() -> None:
    kept = select_points(every_ten_minutes(3), RetentionPolicy("hourly", 2), NOW_MS)
    assert oldest_needed_cycle(kept) == 8
