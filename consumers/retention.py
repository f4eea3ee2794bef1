"""Which recovery points a replica keeps, and therefore which undo files it may prune.

Pure functions over frozen dataclasses, no I/O. Three policies:

- ``latest``: only the newest point (Hyper-V's default, recovery history 0);
- ``hourly``: the newest point plus, for each clock hour of the last ``hours`` hours, the newest
  point of that hour — Hyper-V's "additional recovery points", up to 24; with
  ``app_consistent_hours`` N, also the newest application-consistent point of every N-hour slot,
  so the points the guest made consistent on purpose (VSS every 1-12 hours) are never lost to a
  newer crash-consistent one;
- ``every_cycle``: every point of the last ``hours`` hours (continuous protection).

Hours are whole UTC clock hours (``cut_at_ms // HOUR_MS``), not hours counted back from now, so a
selection is stable as time passes: a point dropped once is never wanted again. That matters
because dropping a point lets its undo files go, and pruned undo cannot be brought back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, Literal

from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import (
    MAX_HISTORY_HOURS,
    Consistency,
    RecoveryPoint,
    check_app_consistent_hours,
    check_history_hours,
)
from vmreplica.errors import ConfigurationError

RetentionMode = Literal["latest", "hourly", "every_cycle"]
_MODES: Final = ("latest", "hourly", "every_cycle")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How much recovery history a VM keeps; validated when built.

    :raises ConfigurationError: a mode, an hour count or a combination is not allowed.
    """

    mode: RetentionMode = "latest"
    hours: int = 0
    app_consistent_hours: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigurationError(
                f"retention mode must be 'latest', 'hourly' or 'every_cycle', got {self.mode!r}"
            )
        check_history_hours(self.hours)
        if self.mode == "latest" and self.hours:
            raise ConfigurationError(
                f"retention mode 'latest' keeps no history, but hours is {self.hours}: set hours "
                "to 0, or use mode 'hourly' or 'every_cycle'"
            )
        if self.mode != "latest" and not self.hours:
            raise ConfigurationError(
                f"retention mode {self.mode!r} needs 1-{MAX_HISTORY_HOURS} hours of history; "
                "use mode 'latest' to keep only the newest point"
            )
        self._check_app_consistent()

    def _check_app_consistent(self) -> None:
        every = self.app_consistent_hours
        if every is None:
            return
        if self.mode == "latest":
            raise ConfigurationError(
                "application-consistent points need recovery history: use mode 'hourly' or "
                "'every_cycle'"
            )
        check_app_consistent_hours(every, self.hours)


def select_points(
    candidates: Sequence[RecoveryPoint], policy: RetentionPolicy, now_ms: int
) -> tuple[RecoveryPoint, ...]:
    """Return the points to keep, oldest first; the newest point is always among them.

    History covers points cut at or after ``now_ms - hours * HOUR_MS``. Points are ordered by
    cycle, which the journal makes unique and increasing.

    :raises ConfigurationError: two candidates claim the same cycle.
    """
    ordered = sorted(candidates, key=lambda point: point.cycle)
    for before, after in pairwise(ordered):
        if before.cycle == after.cycle:
            raise ConfigurationError(f"two recovery points claim cycle {after.cycle}")
    if not ordered:
        return ()
    kept = {ordered[-1].cycle: ordered[-1]}
    history = [point for point in ordered if point.cut_at_ms >= now_ms - policy.hours * HOUR_MS]
    if policy.mode == "every_cycle":
        kept.update((point.cycle, point) for point in history)
    elif policy.mode == "hourly":
        kept.update(_newest_per_slot(history, HOUR_MS))
        if policy.app_consistent_hours is not None:
            application = [
                point for point in history if point.consistency is Consistency.APPLICATION
            ]
            kept.update(_newest_per_slot(application, policy.app_consistent_hours * HOUR_MS))
    return tuple(kept[cycle] for cycle in sorted(kept))


def _newest_per_slot(points: Iterable[RecoveryPoint], slot_ms: int) -> dict[int, RecoveryPoint]:
    """The newest point of each clock-aligned slot of ``slot_ms``, keyed by cycle."""
    newest: dict[int, RecoveryPoint] = {}
    for point in points:
        slot = point.cut_at_ms // slot_ms
        if slot not in newest or newest[slot].cycle < point.cycle:
            newest[slot] = point
    return {point.cycle: point for point in newest.values()}


def settled_from_ms(policy: RetentionPolicy, now_ms: int) -> int | None:
    """Points cut at or after this instant are kept whatever other points exist, so pruning
    need not look at them: ``every_cycle`` keeps its whole history (thousands of points an hour
    in continuous mode). None for the other policies, which keep the newest point, one per
    hour and one per application-consistent slot — a few dozen, looked at whole."""
    return now_ms - policy.hours * HOUR_MS if policy.mode == "every_cycle" else None


def oldest_needed_cycle(kept: Iterable[RecoveryPoint]) -> int | None:
    """The cycle of the oldest kept point, or None when nothing is kept.

    Rebuilding point P needs the undo files of cycles after P only, so every undo file up to and
    including the returned cycle may be pruned (``UndoLog.discard_through``). None means: prune
    nothing.
    """
    return min((point.cycle for point in kept), default=None)
