"""Replication states and health, by name (Hyper-V's three numbering schemes taught that), and
the rules that say how far a site is behind its primary.

Pure functions over frozen values; the agent records states in the catalog and the CLI, the
status topic and the metrics show them.

**Idle VMs.** A cycle is cut only when something waits to ship, so an idle VM publishes no
cycle; its primary's heartbeats carry liveness instead, each saying whether anything waited
(``Heartbeat.idle_at_ms``). The rules below therefore never count time from the last cycle:

- *in sync at*: the newest instant at which a site is known to hold every write the primary had —
  the cut of the last cycle it shipped or applied, or a later instant at which the primary said
  nothing waited (:func:`synced_at_ms`);
- *live*: the primary heartbeated within :data:`LIVENESS_HEARTBEATS` heartbeat intervals
  (:func:`primary_live`);
- *RPO* (seconds behind): the time since the site was last in sync; while the primary is live
  and its last heartbeat said nothing waited, a write made since waits at most one interval for
  its cut, so the RPO is at most one interval (:func:`rpo_seconds`). An idle VM whose primary
  heartbeats is therefore up to date; one whose primary fell silent falls behind from its last
  word on;
- *missed cycles*: a cycle is due only when writes wait. The time between two cycles, less the
  time the primary showed it had nothing waiting in between, is how long writes waited; an
  interval of that beyond the first is missed once half an interval overdue
  (:func:`missed_intervals`, :func:`waiting_ms`).
"""

from __future__ import annotations

import math
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
"""Hyper-V: more than an hour since the last cycle sent or applied is a warning; here, more than
an hour behind the primary (an idle VM sends no cycle, but is not behind)."""
LIVENESS_HEARTBEATS: Final = 3
"""The primary counts as live until this many heartbeat intervals pass without one: one late
heartbeat is a hiccup, three are an outage (an unplanned failover refuses while it is live)."""
LATENCY_WARNING_SECONDS: Final = 300
"""Hyper-V: average latency above five minutes is no longer normal."""

_CRITICAL_STATES: Final = frozenset(
    {ReplicationState.RESYNCHRONIZATION_REQUIRED, ReplicationState.ERROR}
)
CYCLES_EXPECTED_STATES: Final = frozenset({ReplicationState.REPLICATING, ReplicationState.ERROR})
"""States in which writes that wait are due to ship every interval; in the others (initial
replication, suspended, failed over, resync required…) an interval without a cycle is not a
missed cycle."""
_WARNING_STATES: Final = frozenset(
    {
        ReplicationState.READY_FOR_INITIAL_REPLICATION,
        ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
        ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
        ReplicationState.SUSPENDED,
        ReplicationState.FAILED_OVER_WAITING_COMPLETION,
        ReplicationState.FAILED_OVER,
        ReplicationState.RESYNCHRONIZING,
    }
)


@dataclass(frozen=True)
class WindowStats:
    """What the monitoring window saw for one VM.

    ``expected_cycles`` counts the cycles done and those missed while writes waited; an idle
    stretch expects none. ``seconds_behind`` is the RPO (:func:`rpo_seconds`).
    """

    expected_cycles: int
    successful_cycles: int
    seconds_behind: float | None
    average_latency_seconds: float | None

    @property
    def missed_cycles(self) -> int:
        return max(0, self.expected_cycles - self.successful_cycles)


@dataclass(frozen=True)
class HealthReport:
    health: Health
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class KafkaOutage:
    """The site's agent cannot reach Kafka: since when, and what it last met."""

    since_ms: int
    message: str


@dataclass(frozen=True)
class CutOff:
    """What an outage means for one VM's health: the reason to show, and whether it is
    critical yet (:func:`cut_off`)."""

    reason: str
    critical: bool


def cut_off(
    outage: KafkaOutage,
    now_ms: int,
    heartbeat_seconds: float,
    partner: str,
    partner_heard_ms: int | None,
) -> CutOff:
    """A site cut off from Kafka neither sends nor receives: a warning at first, critical once
    it lasted :data:`LIVENESS_HEARTBEATS` heartbeat intervals (what makes a primary count as
    gone). The reason says since when, and when the partner site was last heard of."""
    seconds = max(0.0, (now_ms - outage.since_ms) / 1000)
    heard = (
        f" (last heard {(now_ms - partner_heard_ms) / 1000:.0f} s ago)"
        if partner_heard_ms is not None
        else ""
    )
    return CutOff(
        f"Kafka unreachable for {seconds:.0f} s, and with it partner site {partner}{heard}: "
        f"{outage.message}",
        seconds >= LIVENESS_HEARTBEATS * heartbeat_seconds,
    )


def assess(state: ReplicationState, stats: WindowStats, cut: CutOff | None = None) -> HealthReport:
    """Health by Hyper-V's rules, with the reasons an operator needs to act on it; ``cut``:
    the site cannot reach Kafka (:func:`cut_off`), which comes first among the reasons."""
    if state in _CRITICAL_STATES:
        said = (f"state is {state.value}",)
        return HealthReport(Health.CRITICAL, said if cut is None else (cut.reason, *said))
    reasons: list[str] = [] if cut is None else [cut.reason]
    if state in _WARNING_STATES:
        reasons.append(f"state is {state.value}")
    if stats.expected_cycles and stats.missed_cycles / stats.expected_cycles > (
        MISSED_CYCLES_WARNING_RATIO
    ):
        reasons.append(f"{stats.missed_cycles} of {stats.expected_cycles} cycles missed")
    if stats.seconds_behind is not None and stats.seconds_behind > STALE_CYCLE_WARNING_SECONDS:
        reasons.append(f"{stats.seconds_behind / 60:.0f} minutes behind the primary")
    if (
        stats.average_latency_seconds is not None
        and stats.average_latency_seconds > LATENCY_WARNING_SECONDS
    ):
        reasons.append(f"average latency {stats.average_latency_seconds:.0f} s")
    if cut is not None and cut.critical:
        return HealthReport(Health.CRITICAL, tuple(reasons))
    return HealthReport(Health.WARNING if reasons else Health.NORMAL, tuple(reasons))


# How far behind the primary a site is ------------------------------------------------------------


@dataclass(frozen=True)
class LastHeartbeat:
    """What a site last heard from the VM's primary (a replica: read in the journal; the
    primary: what it published itself)."""

    at_ms: int
    """When the primary sent it (the primary's clock)."""
    idle_at_ms: int | None
    """The latest instant, since the last cycle was done, at which the primary said nothing
    waited to ship; None when it has not said so since that cycle."""
    idle: bool
    """The heartbeat itself said nothing waited."""


def primary_live(heard_at_ms: int | None, now_ms: int, heartbeat_seconds: float) -> bool:
    """The primary heartbeated within :data:`LIVENESS_HEARTBEATS` intervals of ``now_ms``."""
    return (
        heard_at_ms is not None
        and now_ms - heard_at_ms < LIVENESS_HEARTBEATS * heartbeat_seconds * 1000
    )


def synced_at_ms(last_cut_ms: int | None, heartbeat: LastHeartbeat | None) -> int | None:
    """The newest instant at which the site is known to hold every write the primary had: the
    cut of the last cycle done, or a later instant at which the primary said nothing waited.
    None before the first of either."""
    known = [
        ms for ms in (last_cut_ms, heartbeat.idle_at_ms if heartbeat else None) if ms is not None
    ]
    return max(known, default=None)


def rpo_seconds(
    now_ms: int, synced_ms: int | None, interval_seconds: float, idle: bool
) -> float | None:
    """Seconds of writes the site may lack: the time since it was last in sync.

    ``idle``: the primary is live and its last heartbeat said nothing waited. A write made since
    then is cut within one interval (and shipped at once), so the RPO stays within one interval
    for as long as the primary keeps heartbeating. None before the site was ever in sync.
    """
    if synced_ms is None:
        return None
    behind = max(0.0, (now_ms - synced_ms) / 1000)
    return min(behind, interval_seconds) if idle else behind


def missed_intervals(gap_seconds: float, interval: float) -> int:
    """Cycles missed in ``gap_seconds`` of writes waiting, at one cycle per ``interval``.

    A gap of about n intervals holds n - 1 missed cycles; a cycle counts as missed once it is
    half an interval overdue, so a cycle that is merely late is not counted, and a skipped one
    is counted while the outage goes on rather than when the next cycle finally comes.
    """
    return max(0, math.floor(gap_seconds / interval - 0.5))


def waiting_ms(
    previous_done_ms: int,
    previous_cut_ms: int,
    idle_at_ms: int | None,
    done_ms: int,
    since_ms: int = 0,
) -> int:
    """How long writes waited for the cycle done at ``done_ms`` (or, for the cycle not yet
    done, until ``done_ms`` = now), counted from ``since_ms`` at the earliest.

    The wait starts when the previous cycle was done, plus the time after its cut during which
    the primary showed it had nothing waiting (``idle_at_ms``: a cycle's start, which an idle
    check moves forward, or an idle heartbeat's instant). That idle time is a duration on the
    primary's clock, so the sites' clocks need not agree.
    """
    idle = 0 if idle_at_ms is None else max(0, idle_at_ms - previous_cut_ms)
    return max(0, done_ms - max(previous_done_ms + idle, since_ms))
