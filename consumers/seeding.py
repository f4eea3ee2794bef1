"""When a replica must be seeded from what it already holds, by the primary comparing block
digests (a resynchronization, :mod:`vmreplica.failover.resync`) instead of reading a seed from
the journal.

Three cases, each decided when the replica joins the journal:

- the VM is seeded ``existing`` (``vmreplica enable --initial existing``): the replica's images
  are a copy restored from a backup; only the blocks that differ are sent;
- the replica has not been seeded, and the journal no longer holds the seed (a site added after
  the journal's retention passed): its images are empty, so every allocated, non-zero block is
  sent, as a seed would;
- the replica was seeded but was away longer than the retention: the cycles it missed are gone,
  and only what differs is sent.

In every case the replica publishes its block digests and waits for the epoch that names it in
``resync_sites`` (:meth:`~vmreplica.consumers.replica.ReplicaVm.seed_by_compare`); the primary's
agent starts that resynchronization by itself (``auto_resync``) or says the operator must.
"""

from __future__ import annotations

from vmreplica.consumers.materializer import ReplicaCursor
from vmreplica.domain.model import VmRecord


def seed_by_compare_reason(
    record: VmRecord, cursor: ReplicaCursor, journal_start: int
) -> str | None:
    """Why this replica must be brought level by a block compare, or None when the journal
    takes it there. ``journal_start`` is the oldest offset the journal still holds."""
    if cursor.awaiting_resync:
        return None  # asked already: it waits for the resynchronizing epoch
    behind = cursor.next_offset < journal_start
    if cursor.seeding and record.settings.initial == "existing":
        return (
            f"VM {record.name!r} is seeded from the copy this site holds (--initial existing): "
            "its block digests go to the primary, which sends only the blocks that differ"
        )
    if cursor.seeding and behind:
        return (
            f"the journal of VM {record.name!r} no longer holds its seed (it starts at offset "
            f"{journal_start}: its retention deleted the older records); the primary sends "
            "every block this site lacks by comparing block digests"
        )
    if behind:
        return (
            f"this replica is behind the journal's retention: it stands at journal offset "
            f"{cursor.next_offset}, the journal now starts at offset {journal_start}, so the "
            f"cycles after cycle {cursor.cycle} are lost to it and a resynchronization is needed "
            "(the primary sends the blocks that differ by comparing block digests)"
        )
    return None
