"""`vmreplica test-connection` (Test-VMReplicationConnection): can this site replicate a VM
now? Each check says what it found:

- **broker**: the bootstrap servers answer an admin request;
- **journal topic** and **status topic**: the VM's topics exist, with the settings replication
  relies on (never compacted, records as large as a cycle's, no unclean leader election);
- **access**: the broker lets this site's Kafka principal read, write, describe and describe
  the configurations of both topics, and describe the VM's transactional id (asked without
  changing anything: :mod:`vmreplica.journal.authorized`; a broker without ACLs allows all);
- **partner**: on a replica, the primary heartbeats (live by the rule an unplanned failover
  uses); on a primary, what its replica site last reported on the status topic.

Checks that cannot run (the broker is away) say so instead of failing on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from vmreplica.domain import names
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import LIVENESS_HEARTBEATS, primary_live
from vmreplica.errors import ReplicationError
from vmreplica.journal import topics
from vmreplica.journal.authorized import topic_access, transactional_id_error
from vmreplica.journal.kafka import TopicAdmin
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import latest_replica_position
from vmreplica.security.grants import Operation

NEEDED_ON_TOPICS: Final = (
    Operation.READ,
    Operation.WRITE,
    Operation.DESCRIBE,
    Operation.DESCRIBE_CONFIGS,
)
"""What replication does with a VM's topics (CREATE is needed only to enable a VM)."""
CHECKED_SETTINGS: Final = ("cleanup.policy", "max.message.bytes", "unclean.leader.election.enable")
"""Topic settings replication relies on: a compacted journal loses cycles, a smaller record
limit refuses large ones, an unclean election can lose committed ones."""


@dataclass(frozen=True)
class Check:
    """One check of `test-connection`: its name, whether it passed, what it found."""

    name: str
    ok: bool
    detail: str


async def connection_checks(site: Site, record: VmRecord) -> list[Check]:
    """Every check for ``record``, in order (see the module docstring)."""
    checks: list[Check] = []
    journal, status = site.journal_topic(record.name), site.status_topic(record.name)
    try:
        async with TopicAdmin(site.connection) as admin:
            found = set(await admin.topics())
            checks.append(Check("broker", True, f"{site.config.bootstrap_servers} answers"))
            factor = site.config.replication_factor
            for what, name, spec in (
                ("journal topic", journal, topics.journal_spec(journal, factor)),
                ("status topic", status, topics.status_spec(status, factor)),
            ):
                if name not in found:
                    checks.append(Check(what, False, f"{name} does not exist"))
                    continue
                configs = await admin.topic_configs(name)
                wrong = [
                    f"{key} is {configs.get(key)!r}, not {spec.configs[key]!r}"
                    for key in CHECKED_SETTINGS
                    if key in spec.configs and configs.get(key) != spec.configs[key]
                ]
                checks.append(
                    Check(what, not wrong, "; ".join(wrong) or f"{name} exists, settings as made")
                )
    except ReplicationError as error:
        checks.append(Check("broker", False, str(error)))
        return checks
    checks.append(await _access(site, record, (journal, status)))
    checks.append(await _partner(site, record))
    return checks


async def _access(site: Site, record: VmRecord, topic_names: tuple[str, str]) -> Check:
    """What the broker lets this site's principal do with the VM's topics and transactional
    id; a refusal names the resource, what is missing, and how the rights are given."""
    config = site.config
    tid = names.transactional_id(record.name, config.trust_group, config.topic_prefix)
    try:
        found = await topic_access(site.connection, topic_names)
        tid_error = await transactional_id_error(site.connection, tid)
    except ReplicationError as error:
        return Check("access", False, f"could not ask the broker: {error}")
    problems = []
    for access in found:
        if access.error is not None and access.error != "UnknownTopicOrPartitionError":
            problems.append(f"topic {access.topic}: {access.error}")
        elif access.operations is not None:
            missing = [op.name.lower() for op in NEEDED_ON_TOPICS if op not in access.operations]
            if missing:
                problems.append(f"topic {access.topic}: may not {', '.join(missing)}")
    if tid_error is not None:
        problems.append(f"transactional id {tid}: {tid_error}")
    user = config.sasl_username or "this site's principal"
    if problems:
        return Check(
            "access",
            False,
            f"{'; '.join(problems)}. Operator action: grant {user} the rights of trust group "
            f"{config.trust_group!r} (`vmreplica broker add-site {config.site} --trust-group "
            f"{config.trust_group}`, or the ACLs the README lists)",
        )
    return Check(
        "access",
        True,
        f"{user} may read, write and describe both topics and use transactional id {tid}",
    )


async def _partner(site: Site, record: VmRecord) -> Check:
    now = int(time.time() * 1000)
    if record.role == "replica":
        heard = await site.catalog.last_heartbeat(record.name)
        beat = site.config.heartbeat_seconds
        if heard is not None and primary_live(heard.at_ms, now, beat):
            return Check(
                "partner",
                True,
                f"primary site {record.partner_site} heartbeated {(now - heard.at_ms) / 1000:.0f}"
                " s ago",
            )
        since = "never" if heard is None else f"{(now - heard.at_ms) / 1000:.0f} s ago"
        return Check(
            "partner",
            False,
            f"primary site {record.partner_site} last heartbeated {since} (live means within "
            f"{LIVENESS_HEARTBEATS * beat:.0f} s): is its agent running?",
        )
    try:
        position = await latest_replica_position(site, record.name)
    except ReplicationError as error:
        return Check("partner", False, f"cannot read {site.status_topic(record.name)}: {error}")
    if position is None:
        return Check(
            "partner",
            False,
            f"replica site {record.partner_site} has reported nothing on the status topic yet: "
            "is its agent running?",
        )
    return Check(
        "partner",
        True,
        f"replica site {position.site} reported cycle {position.cycle} ({position.state}, "
        f"{position.health}) {(now - position.at_ms) / 1000:.0f} s ago",
    )
