"""What a site's Kafka principal may do: exactly a replication pair's rights in its trust group.

Every name vmreplica gives a VM's Kafka resources starts with ``<prefix>.<trust-group>.``
(:mod:`vmreplica.domain.names`: the ``.journal`` and ``.status`` topics and the ``.primary``
transactional id), so one prefixed ACL per resource type covers every VM of the group, present
and future, and nothing of any other group (the trailing dot keeps group ``tg`` from matching
``tg2``). Every site of a pair gets the same rights, because roles swap on failover: the
replica of today is the primary of tomorrow, and replicas publish status records too.

========================  =========================================================
resource (prefixed)       operations, and who needs them
========================  =========================================================
topic                     CREATE (``enable``), WRITE (cycles, status), READ (replica,
                          reconciliation), DESCRIBE and DESCRIBE_CONFIGS (checks)
transactional id          WRITE and DESCRIBE (the VM's transactional producer)
consumer group            READ (consumer groups named in the trust group; the agents
                          read without one today)
========================  =========================================================

An idempotent producer without a transactional id (status) needs no cluster-wide
IDEMPOTENT_WRITE: Kafka grants it to any principal that may WRITE some topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from vmreplica.domain.names import DEFAULT_PREFIX, check_name


class ResourceType(IntEnum):
    """Kafka's ``ResourceType`` codes."""

    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class Operation(IntEnum):
    """Kafka's ``AclOperation`` codes."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


class PatternType(IntEnum):
    """Kafka's ``PatternType`` codes."""

    LITERAL = 3
    PREFIXED = 4


@dataclass(frozen=True, order=True)
class Grant:
    """One ALLOW ACL entry for a principal, from any host."""

    resource_type: ResourceType
    resource_name: str
    pattern_type: PatternType
    operation: Operation


SITE_RIGHTS: Final = {
    ResourceType.TOPIC: (
        Operation.CREATE,
        Operation.WRITE,
        Operation.READ,
        Operation.DESCRIBE,
        Operation.DESCRIBE_CONFIGS,
    ),
    ResourceType.TRANSACTIONAL_ID: (Operation.WRITE, Operation.DESCRIBE),
    ResourceType.GROUP: (Operation.READ,),
}
"""The operations a site needs on each kind of its trust group's resources (table above)."""


def trust_group_prefix(trust_group: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>.<trust-group>.``: the start of every Kafka name of the group's VMs."""
    return f"{check_name('topic prefix', prefix)}.{check_name('trust group', trust_group)}."


def site_grants(trust_group: str, prefix: str = DEFAULT_PREFIX) -> tuple[Grant, ...]:
    """The ACL entries a site of ``trust_group`` needs, and no more."""
    start = trust_group_prefix(trust_group, prefix)
    return tuple(
        Grant(resource, start, PatternType.PREFIXED, operation)
        for resource, operations in SITE_RIGHTS.items()
        for operation in operations
    )
