"""Configurations of a VM's topics, created by vmreplica with explicit settings rather than
inherited broker defaults. Their names come from :mod:`vmreplica.domain.names`."""

from __future__ import annotations

from typing import Final

from vmreplica.domain.clock import HOUR_MS
from vmreplica.journal.kafka import MAX_RECORD_BYTES, TopicSpec

JOURNAL_MIN_RETENTION_HOURS: Final = 25
"""24 hourly recovery points plus the cycle in flight must stay replayable from the journal."""


def journal_spec(
    name: str, replication_factor: int, retention_hours: int = JOURNAL_MIN_RETENTION_HOURS
) -> TopicSpec:
    """The journal topic: never compacted, kept at least as long as the recovery history."""
    hours = max(retention_hours, JOURNAL_MIN_RETENTION_HOURS)
    return TopicSpec(
        name,
        replication_factor,
        {
            "cleanup.policy": "delete",
            "retention.ms": str(hours * HOUR_MS),
            "retention.bytes": "-1",
            "min.insync.replicas": str(max(1, replication_factor - 1)),
            "max.message.bytes": str(MAX_RECORD_BYTES + 64 * 1024),
            "compression.type": "producer",
            "unclean.leader.election.enable": "false",
            "message.timestamp.type": "CreateTime",
        },
    )


def status_spec(name: str, replication_factor: int) -> TopicSpec:
    """The status topic: small records, a week of history for statistics."""
    return TopicSpec(
        name,
        replication_factor,
        {
            "cleanup.policy": "delete",
            "retention.ms": str(7 * 24 * HOUR_MS),
            "min.insync.replicas": str(max(1, replication_factor - 1)),
            "max.message.bytes": str(MAX_RECORD_BYTES + 64 * 1024),
        },
    )


def configs_spec(name: str, replication_factor: int) -> TopicSpec:
    """The trust group's VM configurations: compacted, so the newest VmConfig of every VM stays
    however long ago it was published (a site added a year later still discovers the VM)."""
    return TopicSpec(
        name,
        replication_factor,
        {
            "cleanup.policy": "compact",
            "min.insync.replicas": str(max(1, replication_factor - 1)),
            "max.message.bytes": str(MAX_RECORD_BYTES + 64 * 1024),
            "unclean.leader.election.enable": "false",
        },
    )
