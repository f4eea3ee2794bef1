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
RPO_WARNING_INTERVALS: Final = 3
RPO_WARNING_GRACE_SECONDS: Final = 120
"""An RPO above three intervals plus two minutes is a warning well before Hyper-V's hour: a
cycle is due every interval, so three overdue are no hiccup (the `VmReplicationRpoExceeded`
alert uses the same bound)."""
PARTNER_UNREACHABLE_CRITICAL_SECONDS: Final = 900
"""A replica that has heard nothing from its primary (no heartbeat, no cycle) for 15 minutes is
critical: Hyper-V's "the primary cannot send"."""
STORAGE_FREE_WARNING_RATIO: Final = 0.05
STORAGE_FREE_CRITICAL_RATIO: Final = 0.02
"""Free space of the site's storage root below 5 % is a warning, below 2 % critical: change
logs, undo logs and images all grow there, and a write that finds it full stops replication."""

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
    interval_seconds: float | None = None
    """The VM's replication interval: with it, an RPO beyond :data:`RPO_WARNING_INTERVALS`
    intervals (plus the grace) is a warning."""
    partner_silent_seconds: float | None = None
    """A replica: how long since it last heard from its primary (None: not judged)."""
    storage_free_ratio: float | None = None
    """Free share of the file system holding the site's storage root (None: not known)."""
    over_budget: bool = False
    """The primary's open cycle outgrew its change-log budget: capture tracks dirty blocks."""
    silence: str | None = None
    """Why the primary's heartbeats stopped coming, while cycles are due (:func:`silence`)."""

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


def assess(
    state: ReplicationState, stats: WindowStats, message: str = "", cut: CutOff | None = None
) -> HealthReport:
    """Health by the rules of the README's table (Hyper-V's, and what this system adds), with
    the reasons an operator needs to act on it.

    Critical when any critical rule holds, naming only the critical reasons; otherwise Warning
    with every warning reason, in a fixed order; otherwise Normal. ``message`` is what the
    state's last change said; a critical state gives it as its reason (what failed, and what to
    do), since the state's name alone does not say. ``cut``: the site cannot reach Kafka
    (:func:`cut_off`): its reason comes first, and makes the health critical once it lasted.
    """
    critical: list[str] = []
    if state in _CRITICAL_STATES:
        critical.append(f"state is {state.value}" + (f": {message}" if message else ""))
    if (
        stats.partner_silent_seconds is not None
        and stats.partner_silent_seconds > PARTNER_UNREACHABLE_CRITICAL_SECONDS
    ):
        critical.append(
            f"nothing heard from the primary for {stats.partner_silent_seconds / 60:.0f} minutes"
        )
    free = stats.storage_free_ratio
    if free is not None and free < STORAGE_FREE_CRITICAL_RATIO:
        critical.append(f"storage root {free:.1%} free")
    if critical:
        return HealthReport(
            Health.CRITICAL, tuple(critical if cut is None else [cut.reason, *critical])
        )
    reasons: list[str] = [] if cut is None else [cut.reason]
    if stats.silence is not None and cut is None:  # cut off, the silence is no news
        reasons.append(stats.silence)
    if state in _WARNING_STATES:
        reasons.append(f"state is {state.value}")
    if stats.expected_cycles and stats.missed_cycles / stats.expected_cycles > (
        MISSED_CYCLES_WARNING_RATIO
    ):
        reasons.append(f"{stats.missed_cycles} of {stats.expected_cycles} cycles missed")
    behind = stats.seconds_behind
    if behind is not None and behind > STALE_CYCLE_WARNING_SECONDS:
        reasons.append(f"{behind / 60:.0f} minutes behind the primary")
    elif (
        behind is not None
        and stats.interval_seconds is not None
        and behind > rpo_bound_seconds(stats.interval_seconds)
    ):
        reasons.append(
            f"RPO {behind:.0f} s, above {rpo_bound_seconds(stats.interval_seconds):.0f} s "
            f"(three intervals of {stats.interval_seconds:.0f} s and two minutes)"
        )
    if (
        stats.average_latency_seconds is not None
        and stats.average_latency_seconds > LATENCY_WARNING_SECONDS
    ):
        reasons.append(f"average latency {stats.average_latency_seconds:.0f} s")
    if free is not None and free < STORAGE_FREE_WARNING_RATIO:
        reasons.append(f"storage root {free:.1%} free")
    if stats.over_budget:
        reasons.append("change log over its budget: tracking dirty blocks until the cut")
    if cut is not None and cut.critical:
        return HealthReport(Health.CRITICAL, tuple(reasons))
    return HealthReport(Health.WARNING if reasons else Health.NORMAL, tuple(reasons))


def rpo_bound_seconds(interval_seconds: float) -> float:
    """The RPO above which a VM is no longer Normal (:data:`RPO_WARNING_INTERVALS`)."""
    return RPO_WARNING_INTERVALS * interval_seconds + RPO_WARNING_GRACE_SECONDS


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


def silence(
    role: str, partner_site: str, heard_at_ms: int | None, now_ms: int, heartbeat_seconds: float
) -> str | None:
    """Why no heartbeat came for :data:`LIVENESS_HEARTBEATS` intervals, or None while the
    primary is live (or was never heard: nothing was expected yet).

    On a replica the primary, its link to Kafka or Kafka itself is down; on the primary, the
    heartbeats it publishes are not acknowledged (the brokers or the link to them are down, or
    the agent is not running).
    """
    if heard_at_ms is None or primary_live(heard_at_ms, now_ms, heartbeat_seconds):
        return None
    seconds = (now_ms - heard_at_ms) / 1000
    if role == "primary":
        return (
            f"no heartbeat acknowledged by Kafka for {seconds:.0f} s: the brokers or this "
            "site's link to them are down, or the agent is not running"
        )
    return (
        f"no heartbeat from primary site {partner_site} for {seconds:.0f} s: the primary, its "
        "link to Kafka, or Kafka itself is down"
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
