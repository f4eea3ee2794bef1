"""Names and configurations of a VM's topics.

One journal topic per VM, ``<prefix>.<trust-group>.<vm>.journal``, with a single partition so that
Kafka's order is the write order across every disk of the VM; a ``.status`` topic beside it for
what replicas tell the primary. Both are created by vmreplica with explicit configs rather than
inherited broker defaults.
"""

from __future__ import annotations

import re
from typing import Final

from vmreplica.errors import ConfigurationError
from vmreplica.kafka import MAX_RECORD_BYTES, TopicSpec

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""VM, site and trust-group names: safe as topic parts, file names and NBD export names alike."""
DEFAULT_PREFIX: Final = "vmreplica"
DEFAULT_TRUST_GROUP: Final = "default"
HOUR_MS: Final = 3_600_000
JOURNAL_MIN_RETENTION_HOURS: Final = 25
"""24 hourly recovery points plus the cycle in flight must stay replayable from the journal."""


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid VM, site, disk or trust-group name.

    :raises ConfigurationError: the name could escape a folder, collide or break a topic name.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"{kind} name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit (no dots, slashes or spaces)"
        )
    return name


def journal_topic(vm: str, trust_group: str = DEFAULT_TRUST_GROUP,
                  prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.{check_name('trust group', trust_group)}.{check_name('VM', vm)}.journal"


def status_topic(vm: str, trust_group: str = DEFAULT_TRUST_GROUP,
                 prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}.{check_name('trust group', trust_group)}.{check_name('VM', vm)}.status"


def transactional_id(vm: str, trust_group: str = DEFAULT_TRUST_GROUP,
                     prefix: str = DEFAULT_PREFIX) -> str:
    """The same at every site, so the broker fences a stale primary when a new one starts."""
    return f"{prefix}.{trust_group}.{vm}.primary"


def journal_spec(name: str, replication_factor: int,
                 retention_hours: int = JOURNAL_MIN_RETENTION_HOURS) -> TopicSpec:
    """The journal topic: never compacted, kept at least as long as the recovery history."""
    hours = max(retention_hours, JOURNAL_MIN_RETENTION_HOURS)
    return TopicSpec(name, replication_factor, {
        "cleanup.policy": "delete",
        "retention.ms": str(hours * HOUR_MS),
        "retention.bytes": "-1",
        "min.insync.replicas": str(max(1, replication_factor - 1)),
        "max.message.bytes": str(MAX_RECORD_BYTES + 64 * 1024),
        "compression.type": "producer",
        "unclean.leader.election.enable": "false",
        "message.timestamp.type": "CreateTime",
    })


def status_spec(name: str, replication_factor: int) -> TopicSpec:
    """The status topic: small records, a week of history for statistics."""
    return TopicSpec(name, replication_factor, {
        "cleanup.policy": "delete",
        "retention.ms": str(7 * 24 * HOUR_MS),
        "min.insync.replicas": str(max(1, replication_factor - 1)),
        "max.message.bytes": str(MAX_RECORD_BYTES + 64 * 1024),
    })
