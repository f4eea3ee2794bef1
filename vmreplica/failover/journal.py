"""A VM's journal as failover reads and writes it: its events, its epochs, a new EpochStart.

Failover reads the journal to its current end (the epochs it holds decide who is primary) and
writes to it only to start an epoch: with the VM's shared ``transactional_id``, so that
initialising the publisher fences the old primary's producer at the broker.

A takeover is recorded at its site first and published second (:func:`publish_pending`): the
catalog keeps the EpochStart as *pending* in the same transaction that makes the site primary,
so a failover needs no broker, and the agent publishes the epoch when one answers again. Steps:

1. read the journal after this site's position (creating the VM's topics on a cluster that
   lacks them: the site may have been pointed at another one since). The EpochStart is there
   already (published, then a crash before step 3): go to step 3 with its offset. A newer or
   equal epoch of another site is there: this site lost the race,
   :class:`~vmreplica.errors.SupersededError`;
2. publish it with the VM's ``transactional_id`` (the old primary's producer is fenced);
3. drop the pending row and record the EpochStart's offset as the position, in one transaction
   (moved back when the journal is another cluster's, whose offsets start afresh).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace

from vmreplica.domain.model import Rewind, VmRecord
from vmreplica.domain.names import transactional_id
from vmreplica.errors import SupersededError
from vmreplica.journal.kafka import JournalPublisher, read_to_end
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import EpochStart, JournalEvent


async def journal_events(
    site: Site,
    vm: str,
    start: int = 0,
    *,
    past_end_reads_all: bool = False,
) -> AsyncGenerator[tuple[int, JournalEvent], None]:
    """Every committed journal event of ``vm`` from offset ``start`` to the current end (all
    of them, with ``past_end_reads_all``, when ``start`` is past it: another cluster's copy)."""
    async for record in read_to_end(
        site.connection, site.journal_topic(vm), start, past_end_reads_all=past_end_reads_all
    ):
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


async def pending_start(site: Site, vm: str) -> EpochStart | None:
    """The EpochStart this site recorded for ``vm`` and has not published yet, or None."""
    pending = await site.catalog.pending_epoch(vm)
    if pending is None:
        return None
    event = decode_journal(pending)
    if not isinstance(event, EpochStart):  # written by this site only: never happens
        raise TypeError(f"VM {vm!r}: the pending epoch record is a {type(event).__name__}")
    return event


async def publish_pending(site: Site, vm: str) -> int | None:
    """Publish the EpochStart a failover left pending for ``vm`` (steps in the module's
    docstring); returns its journal offset, or None when nothing was pending.

    :raises BrokerUnreachable: no broker answered; it stays pending (call again later).
    :raises SupersededError: another site started the same or a newer epoch meanwhile.
    """
    start = await pending_start(site, vm)
    if start is None:
        return None
    record = await site.catalog.vm(vm)
    position = await site.catalog.position(vm)
    read_from = position.next_offset if position is not None else 0
    await site.ensure_topics(vm)  # a cluster the site was pointed at since may lack them
    offset = None
    async for at, event in journal_events(site, vm, read_from, past_end_reads_all=True):  # 1
        if not isinstance(event, EpochStart) or event.epoch < start.epoch:
            continue
        if event.primary_site != site.config.site:
            raise SupersededError(vm, event, at)
        if event.epoch == start.epoch:
            offset = at  # published before a crash: only the record is missing
    if offset is None:
        offset = await publish_epoch(site, record, start)  # step 2
    if position is not None:  # step 3
        published = replace(position, next_offset=offset + 1)
        await site.catalog.epoch_published(
            vm,
            published
            if offset >= position.next_offset
            else Rewind(published, f"epoch {start.epoch} published in another cluster's journal"),
        )
    return offset
