"""A VM's journal as failover reads and writes it: its events, its epochs, a new EpochStart.

Failover reads the journal to its current end (the epochs it holds decide who is primary) and
writes to it only to start an epoch: with the VM's shared ``transactional_id``, so that
initialising the publisher fences the old primary's producer at the broker.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from vmreplica.domain.model import VmRecord
from vmreplica.domain.names import transactional_id
from vmreplica.journal.kafka import JournalPublisher, read_to_end
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import EpochStart, JournalEvent


async def journal_events(
    site: Site,
    vm: str,
    start: int = 0,
) -> AsyncGenerator[tuple[int, JournalEvent], None]:
    """Every committed journal event of ``vm`` from offset ``start`` to the current end."""
    async for record in read_to_end(site.connection, site.journal_topic(vm), start):
        yield record.offset, decode_journal(record.value)


async def newest_epoch(site: Site, vm: str, start: int) -> tuple[int, EpochStart] | None:
    """The last EpochStart in the journal from ``start`` on, with its offset."""
    found = None
    async for offset, event in journal_events(site, vm, start):
        if isinstance(event, EpochStart):
            found = (offset, event)
    return found


async def publish_epoch(site: Site, record: VmRecord, start: EpochStart) -> int:
    """Publish an EpochStart with the VM's shared transactional id (fencing the old primary);
    returns its offset."""
    publisher = JournalPublisher(
        site.connection,
        transactional_id(record.name, site.config.trust_group, site.config.topic_prefix),
        site.key.encode,
    )
    async with publisher:
        offsets = await publisher.publish(
            site.journal_topic(record.name), record.name.encode(), [publisher.encode(start)]
        )
    return offsets[-1]
