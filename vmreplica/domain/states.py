"""Replication states and health, by name (Hyper-V's three numbering schemes taught that).

Pure functions over frozen values; the agent records states in the catalog and the CLI, the
status topic and the metrics show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final


class ReplicationState(Enum):
    """Where a VM's replication relationship stands, with Hyper-V's names."""

    READY_FOR_INITIAL_REPLICATION = "ready for initial replication"
    INITIAL_REPLICATION_IN_PROGRESS = "initial replication in progress"
    WAITING_FOR_INITIAL_REPLICATION = "waiting for initial replication"
    REPLICATING = "replicating"
    SUSPENDED = "suspended"
    PREPARED_FOR_PLANNED_FAILOVER = "prepared for planned failover"
    FAILED_OVER_WAITING_COMPLETION = "failed over waiting completion"
    FAILED_OVER = "failed over"
    RESYNCHRONIZATION_REQUIRED = "resynchronization required"
    RESYNCHRONIZING = "resynchronizing"
    ERROR = "error"


class Health(Enum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


MISSED_CYCLES_WARNING_RATIO: Final = 0.20
"""Hyper-V: more than 20 % of cycles missed in the monitoring window is a warning."""
STALE_CYCLE_WARNING_SECONDS: Final = 3600
"""Hyper-V: more than an hour since the last cycle sent or applied is a warning."""
LATENCY_WARNING_SECONDS: Final = 300
"""Hyper-V: average latency above five minutes is no longer normal."""

_CRITICAL_STATES: Final = frozenset({ReplicationState.RESYNCHRONIZATION_REQUIRED,
                                     ReplicationState.ERROR})
_WARNING_STATES: Final = frozenset({
    ReplicationState.READY_FOR_INITIAL_REPLICATION,
    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
    ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
    ReplicationState.SUSPENDED,
    ReplicationState.FAILED_OVER_WAITING_COMPLETION,
    ReplicationState.FAILED_OVER,
    ReplicationState.RESYNCHRONIZING,
})


@dataclass(frozen=True)
class WindowStats:
    """What the monitoring window saw for one VM."""

    expected_cycles: int
    successful_cycles: int
    seconds_since_last_cycle: float | None
    average_latency_seconds: float | None

    @property
    def missed_cycles(self) -> int:
        return max(0, self.expected_cycles - self.successful_cycles)


@dataclass(frozen=True)
class HealthReport:
    health: Health
    reasons: tuple[str, ...]


def assess(state: ReplicationState, stats: WindowStats) -> HealthReport:
    """Health by Hyper-V's rules, with the reasons an operator needs to act on it."""
    if state in _CRITICAL_STATES:
        return HealthReport(Health.CRITICAL, (f"state is {state.value}",))
    reasons: list[str] = []
    if state in _WARNING_STATES:
        reasons.append(f"state is {state.value}")
    if stats.expected_cycles and stats.missed_cycles / stats.expected_cycles > (
            MISSED_CYCLES_WARNING_RATIO):
        reasons.append(f"{stats.missed_cycles} of {stats.expected_cycles} cycles missed")
    if (stats.seconds_since_last_cycle is not None
            and stats.seconds_since_last_cycle > STALE_CYCLE_WARNING_SECONDS):
        reasons.append(f"last cycle {stats.seconds_since_last_cycle / 60:.0f} minutes ago")
    if (stats.average_latency_seconds is not None
            and stats.average_latency_seconds > LATENCY_WARNING_SECONDS):
        reasons.append(f"average latency {stats.average_latency_seconds:.0f} s")
    return HealthReport(Health.WARNING if reasons else Health.NORMAL, tuple(reasons))
