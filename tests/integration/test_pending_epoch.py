"""An unplanned failover with no broker reachable, and the publication of its epoch later.

Site B fails over while pointed at a cluster that does not answer: the takeover is recorded
with its EpochStart pending, the images are at the chosen point, and the outcome says the old
primary was not fenced. Pointed back at the real cluster, the epoch is published once — also
when a crash came between publishing it and recording that (the journal already holds it) —
and the old primary is fenced by it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tests.e2e.test_failover import DISK_BYTES, Pair, write_some
from tests.fixtures import SitePair, VmFactory, catch_up, digests
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import BrokerUnreachable, SupersededError
from vmreplica.failover import journal_events
from vmreplica.failover.journal import pending_start, publish_epoch, publish_pending
from vmreplica.failover.requests import CancelFailover, UnplannedFailover, carry_out
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import EpochStart

pytestmark = pytest.mark.integration


async def make_pair(site_pair: SitePair, vm: VmFactory) -> Pair:
    """A two-disk VM enabled on A, seeded at B, two cycles applied there."""
    enabled = await vm(
        site_pair.a, {"disk0": DISK_BYTES, "disk1": DISK_BYTES}, VmSettings(frequency_seconds=30)
    )
    a = site_pair.a
    async with a.primary(await a.catalog.vm(enabled.name)) as primary:
        await primary.initial_replication()
    return Pair(enabled.name, a, site_pair.b, enabled.disks)


def cut_off(site: Site) -> Site:
    """The same site (root, catalog, images) pointed at a cluster where nothing listens."""
    dead = f"127.0.0.1:{free_base_port()}"
    return Site(site.config.model_copy(update={"bootstrap_servers": dead}))


async def epoch_starts(site: Site, vm: str) -> list[tuple[int, EpochStart]]:
    """The journal's EpochStarts, without the writer's signature (the copy a site keeps
    pending in its catalog is the unsigned event)."""
    return [
        (o, dataclasses.replace(e, signature=None))
        async for o, e in journal_events(site, vm)
        if isinstance(e, EpochStart)
    ]


async def test_failover_without_a_broker_is_published_once_and_fences_the_old_primary(
    site_pair: SitePair, vm: VmFactory
) -> None:
    pair = await make_pair(site_pair, vm)
    name, a, b = pair.vm, pair.a, pair.b
    for seed in (1, 2):
        await write_some(a, name, seed)
    await catch_up(b, name)
    at_primary = await digests(a, name)
    await b.stop()  # one catalog connection at a time, as one agent at a time

    async with cut_off(b) as lonely:
        said = await carry_out(lonely, UnplannedFailover(name, force=True))
        assert "the old primary (site-a) was not fenced: no broker reachable" in said, said
        assert "by epoch 2" in said, said
        record = await lonely.catalog.vm(name)
        assert (record.role, record.epoch) == ("primary", 2)
        assert record.state is ReplicationState.FAILED_OVER_WAITING_COMPLETION
        pending = await pending_start(lonely, name)
        assert pending is not None
        assert (pending.epoch, pending.primary_site) == (2, "site-b")
        assert await digests(lonely, name) == at_primary
        with pytest.raises(BrokerUnreachable, match="cannot reach Kafka"):  # none answers
            await publish_pending(lonely, name)

    async with Site(b.config) as back:  # the cluster answers again
        before = len(await epoch_starts(back, name))
        # A crash after step 2 (published) before step 3 (recorded): the journal holds it.
        offset = await publish_epoch(back, await back.catalog.vm(name), pending)
        assert await publish_pending(back, name) == offset
        assert await publish_pending(back, name) is None  # nothing pending any more
        starts = await epoch_starts(back, name)
        assert len(starts) == before + 1
        assert starts[-1] == (offset, pending)
        position = await back.catalog.position(name)
        assert position is not None
        assert position.next_offset == offset + 1

    with pytest.raises(SupersededError, match="site-b became primary in epoch 2"):
        async with a.primary(await a.catalog.vm(name)):
            pass


async def test_a_failover_cancelled_before_its_epoch_was_published_publishes_nothing(
    site_pair: SitePair, vm: VmFactory
) -> None:
    pair = await make_pair(site_pair, vm)
    name, a, b = pair.vm, pair.a, pair.b
    await write_some(a, name, 1)
    await catch_up(b, name)
    await b.stop()
    async with cut_off(b) as lonely:
        await carry_out(lonely, UnplannedFailover(name, force=True))
        await carry_out(lonely, CancelFailover(name))
        assert await lonely.catalog.pending_epoch(name) is None
        assert (await lonely.catalog.vm(name)).role == "replica"
    async with Site(b.config) as back:
        assert await publish_pending(back, name) is None
        assert [e.epoch for _, e in await epoch_starts(back, name) if e.epoch > 1] == []
    await write_some(a, name, 2)  # the primary was never fenced: it ships on


async def test_an_epoch_pending_is_published_in_the_cluster_the_site_is_pointed_at(
    site_pair: SitePair, vm: VmFactory, unique: Callable[[str], str]
) -> None:
    """Another cluster (here: the same broker under another topic prefix, where the VM has no
    topics yet): the topics are created, the epoch is its journal's first record, and the
    position takes that journal's offsets."""
    pair = await make_pair(site_pair, vm)
    name, a, b = pair.vm, pair.a, pair.b
    await write_some(a, name, 1)
    await catch_up(b, name)
    await b.stop()
    async with cut_off(b) as lonely:
        await carry_out(lonely, UnplannedFailover(name, force=True))
        pending = await pending_start(lonely, name)
    elsewhere = b.config.model_copy(update={"topic_prefix": unique("other")})
    async with Site(elsewhere) as other:
        assert await publish_pending(other, name) == 0
        assert await epoch_starts(other, name) == [(0, pending)]
        position = await other.catalog.position(name)
        assert position is not None
        assert (position.epoch, position.next_offset) == (2, 1)
        assert await other.catalog.pending_epoch(name) is None
