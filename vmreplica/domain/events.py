"""The event log's vocabulary: what happened to a VM, under a stable numeric id.

Hyper-V Replica writes its events under fixed ids (32000-32999 in the Hyper-V-VMMS log) that
monitoring tools match on; vmreplica does the same with its own numbers, listed in the README.
An id, once given, keeps its meaning: new events get new ids, none is reused.

The catalog writes these rows (:mod:`vmreplica.storage.history`) from the few places where a
VM's state changes — its state setter, its role change, the test-failover record, the agent's
failure handler — so every state change, failure, failover and resync is logged without
logging calls scattered through the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from vmreplica.domain.states import ReplicationState


class EventLevel(StrEnum):
    INFORMATION = "information"
    WARNING = "warning"
    ERROR = "error"


class EventId(IntEnum):
    """Every event id; the README's table lists them with their meaning."""

    REPLICATION_ENABLED = 1000
    REPLICATION_REMOVED = 1001
    INITIAL_REPLICATION_COMPLETED = 1002
    STATISTICS_RESET = 1003
    SETTINGS_CHANGED = 1004
    # The VM entered a state (1100 + a fixed number per state: see STATE_EVENT_IDS).
    STATE_REPLICATING = 1101
    STATE_READY_FOR_INITIAL_REPLICATION = 1102
    STATE_INITIAL_REPLICATION_IN_PROGRESS = 1103
    STATE_WAITING_FOR_INITIAL_REPLICATION = 1104
    STATE_SUSPENDED = 1105
    STATE_PREPARED_FOR_PLANNED_FAILOVER = 1106
    STATE_FAILED_OVER_WAITING_COMPLETION = 1107
    STATE_FAILED_OVER = 1108
    STATE_RESYNCHRONIZATION_REQUIRED = 1109
    STATE_RESYNCHRONIZING = 1110
    STATE_ERROR = 1111
    # A cycle, or the VM's replication, failed (one id per reason, as Hyper-V counts
    # network, replication and application-consistency failures apart).
    FAILED_NETWORK = 2001
    FAILED_REPLICATION = 2002
    FAILED_APPLICATION_CONSISTENT = 2003
    FAILED_JOURNAL = 2004
    FAILED_FENCED = 2005
    # Failover and role changes.
    BECAME_PRIMARY = 3001
    BECAME_REPLICA = 3002
    TEST_FAILOVER_STARTED = 3010
    TEST_FAILOVER_STOPPED = 3011
    TEST_FAILOVER_FAILED = 3012
    # Trust.
    UNTRUSTED_STATUS_REFUSED = 4001


STATE_EVENT_IDS: Final = {
    ReplicationState.REPLICATING: EventId.STATE_REPLICATING,
    ReplicationState.READY_FOR_INITIAL_REPLICATION: EventId.STATE_READY_FOR_INITIAL_REPLICATION,
    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS: (
        EventId.STATE_INITIAL_REPLICATION_IN_PROGRESS
    ),
    ReplicationState.WAITING_FOR_INITIAL_REPLICATION: (
        EventId.STATE_WAITING_FOR_INITIAL_REPLICATION
    ),
    ReplicationState.SUSPENDED: EventId.STATE_SUSPENDED,
    ReplicationState.PREPARED_FOR_PLANNED_FAILOVER: EventId.STATE_PREPARED_FOR_PLANNED_FAILOVER,
    ReplicationState.FAILED_OVER_WAITING_COMPLETION: (EventId.STATE_FAILED_OVER_WAITING_COMPLETION),
    ReplicationState.FAILED_OVER: EventId.STATE_FAILED_OVER,
    ReplicationState.RESYNCHRONIZATION_REQUIRED: EventId.STATE_RESYNCHRONIZATION_REQUIRED,
    ReplicationState.RESYNCHRONIZING: EventId.STATE_RESYNCHRONIZING,
    ReplicationState.ERROR: EventId.STATE_ERROR,
}
"""The event logged when a VM enters each state."""

FAILURE_EVENT_IDS: Final = {
    "network": EventId.FAILED_NETWORK,
    "replication": EventId.FAILED_REPLICATION,
    "hook": EventId.FAILED_APPLICATION_CONSISTENT,
    "freeze": EventId.FAILED_APPLICATION_CONSISTENT,
    "journal": EventId.FAILED_JOURNAL,
    "fenced": EventId.FAILED_FENCED,
}
"""The event of each failure reason (the ``reason`` label of ``vmreplica_cycles_failed_total``)."""

FAILURE_KINDS: Final = {
    EventId.FAILED_NETWORK: "network",
    EventId.FAILED_REPLICATION: "replication",
    EventId.FAILED_JOURNAL: "replication",
    EventId.FAILED_FENCED: "replication",
    EventId.FAILED_APPLICATION_CONSISTENT: "application_consistent",
}
"""How Measure-VMReplication's three failure counts group the failure events."""


def state_level(state: ReplicationState) -> EventLevel:
    """How loud entering ``state`` is."""
    if state in (ReplicationState.ERROR, ReplicationState.RESYNCHRONIZATION_REQUIRED):
        return EventLevel.ERROR
    if state in (
        ReplicationState.SUSPENDED,
        ReplicationState.FAILED_OVER_WAITING_COMPLETION,
        ReplicationState.FAILED_OVER,
    ):
        return EventLevel.WARNING
    return EventLevel.INFORMATION


@dataclass(frozen=True)
class Event:
    """One row of the event log."""

    seq: int
    """Position in the site's log: grows by one per event, never reused."""
    vm: str
    at_ms: int
    event_id: int
    level: EventLevel
    message: str

    @property
    def name(self) -> str:
        """The id's name (``state_error``), or ``unknown`` for an id this version lacks."""
        try:
            return EventId(self.event_id).name.lower()
        except ValueError:
            return "unknown"
