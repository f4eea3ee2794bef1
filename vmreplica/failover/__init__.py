"""Failover: the one place that drives both roles of a VM and swaps them.

Every action here needs the VM to itself (no worker of the agent running it) and is written to be
re-run after a crash: epochs only move forward, images are rolled back from undo logs that are
deleted last, and the catalog switches role in one transaction.

This package re-exports what its callers use (``from vmreplica.failover import promote``); the
work is in one module per job:

- :mod:`~vmreplica.failover.planned`: ``prepare_planned`` and ``cancel_planned`` (primary), the
  replica's takeover check, ``follow_takeover`` and ``follow_reverse`` (the old primary), the
  hypervisor hooks;
- :mod:`~vmreplica.failover.unplanned`: ``promote`` (the replica's new epoch, planned or at a
  recovery point), ``complete`` and ``cancel``, the roll-back to a point;
- :mod:`~vmreplica.failover.reverse`: ``demote`` (the returning old primary) and ``reverse``
  (the new primary sends what diverged);
- :mod:`~vmreplica.failover.fanout`: a VM on several replica sites — which one takes over, how
  the others follow it;
- :mod:`~vmreplica.failover.divergence`: which ranges diverged (journal, change log, block
  digests) and how the old primary reports them;
- :mod:`~vmreplica.failover.resync`: a replica that diverged (corrupted, or stopped by a
  journal violation) made equal to its primary again by a block-digest compare, ending the way
  a reverse does;
- :mod:`~vmreplica.failover.journal`: the VM's journal as failover reads it, and EpochStart;
- :mod:`~vmreplica.failover.requests`: the typed requests the CLI and the agent pass, and
  ``carry_out``.

(Resynchronization changes no role, but it lives here because it drives both sides and ends
with the same step as a reverse.)
"""

from __future__ import annotations

from vmreplica.failover.fanout import follow_new_primary, regroup
from vmreplica.failover.journal import journal_events, newest_epoch
from vmreplica.failover.planned import (
    cancel_planned,
    follow_reverse,
    follow_takeover,
    prepare_planned,
    takes_over,
)
from vmreplica.failover.requests import (
    CancelFailover,
    CompleteFailover,
    FailoverRequest,
    PlannedFailover,
    Resynchronize,
    ReverseReplication,
    UnplannedFailover,
    carry_out,
)
from vmreplica.failover.resync import ResyncRun, accept_resync, cancel_resync, resync_here
from vmreplica.failover.resync_job import ResyncJob, load_job
from vmreplica.failover.reverse import ReverseResult, demote, reverse
from vmreplica.failover.unplanned import cancel, complete, promote

__all__ = [
    "CancelFailover",
    "CompleteFailover",
    "FailoverRequest",
    "PlannedFailover",
    "ResyncJob",
    "ResyncRun",
    "Resynchronize",
    "ReverseReplication",
    "ReverseResult",
    "UnplannedFailover",
    "accept_resync",
    "cancel",
    "cancel_planned",
    "cancel_resync",
    "carry_out",
    "complete",
    "demote",
    "follow_new_primary",
    "follow_reverse",
    "follow_takeover",
    "journal_events",
    "load_job",
    "newest_epoch",
    "prepare_planned",
    "promote",
    "regroup",
    "resync_here",
    "reverse",
    "takes_over",
]
