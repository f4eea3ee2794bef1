"""Extended replication: a replica site becomes the primary of a further hop.

``vmreplica extend <vm> --to SITE`` on a replica site B publishes what B applied to another
journal — its own topic in another trust group, possibly on another Kafka cluster — which a third
site C replicates like any other. Two steps:

1. **Seed** (once, holding the VM's apply lock so no cycle lands meanwhile): EpochStart and
   VmConfig naming C, then B's images at its applied cycle K as SeedChunks, then ``done``, sent
   by the primary's own seeder (:class:`vmreplica.producers.seed.Seeder`).
2. **Relay** (every ``frequency`` seconds, 300 or 900 like Hyper-V): copy each complete cycle
   B has applied after K from the upstream journal to the hop journal, one transaction per
   cycle, records unchanged, so numbers and the hash chain carry through. Epoch starts are
   relayed too. Before relaying, the hop journal's tail is read, so a crash between publishing
   a cycle and recording it never relays that cycle twice.

Only cycles B has applied (and therefore checked) are relayed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from vmreplica.consumers.points import apply_lock
from vmreplica.domain import names
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import check_extended_frequency
from vmreplica.errors import ConfigurationError
from vmreplica.journal import topics
from vmreplica.journal.kafka import (
    JournalPublisher,
    JournalReader,
    KafkaConnection,
    TopicAdmin,
    read_to_end,
)
from vmreplica.producers.seed import Seeder
from vmreplica.runtime.pacing import DISCOVERY_SECONDS
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import (
    CycleCommit,
    DiskSize,
    EpochStart,
    VmConfig,
    WriteBatch,
)
from vmreplica.storage.image import DiskImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extension:
    """Where a replica VM is extended to."""

    vm: str
    to_site: str
    trust_group: str
    bootstrap_servers: str
    frequency_seconds: int


async def extend(
    site: Site,
    vm: str,
    to_site: str,
    frequency_seconds: int = 300,
    trust_group: str | None = None,
    bootstrap_servers: str | None = None,
) -> Extension:
    """Record that this replica site extends ``vm`` to ``to_site`` (the agent then seeds and
    relays). The hop's trust group defaults to ``<trust group>-ext``, so its topic never
    collides with the journal it is fed from.

    :raises ConfigurationError: not a replica here, a bad frequency or name, already extended.
    """
    record = await site.catalog.vm(vm)
    if record.role != "replica":
        raise ConfigurationError(
            f"VM {vm!r} is primary at this site; extended replication runs on a replica site"
        )
    check_extended_frequency(frequency_seconds)
    names.check_name("site", to_site)
    group = names.check_name("trust group", trust_group or f"{site.config.trust_group}-ext")
    servers = bootstrap_servers or site.config.bootstrap_servers
    if group == site.config.trust_group and servers == site.config.bootstrap_servers:
        raise ConfigurationError(
            "the extended hop needs another trust group or another Kafka "
            "cluster: its journal would be the one it is fed from"
        )
    if await site.catalog.extension(vm) is not None:
        raise ConfigurationError(f"VM {vm!r} is already extended from this site")
    await site.catalog.add_extension(vm, to_site, group, servers, frequency_seconds)
    return Extension(vm, to_site, group, servers, frequency_seconds)


async def load_extension(site: Site, vm: str) -> Extension | None:
    row = await site.catalog.extension(vm)
    return None if row is None else Extension(vm, *row)


class ExtendedReplication:
    """Seeds and relays one VM's further hop from this replica site."""

    def __init__(self, site: Site, extension: Extension) -> None:
        self.site = site
        self.extension = extension
        self.connection = KafkaConnection(
            extension.bootstrap_servers, client_id=f"{site.config.site}-extend"
        )
        prefix = site.config.topic_prefix
        self.topic = names.journal_topic(extension.vm, extension.trust_group, prefix)
        self.publisher = JournalPublisher(
            self.connection, names.transactional_id(extension.vm, extension.trust_group, prefix)
        )

    async def __aenter__(self) -> ExtendedReplication:
        async with TopicAdmin(self.connection) as admin:
            await admin.ensure_topic(
                topics.journal_spec(self.topic, self.site.config.replication_factor)
            )
            await admin.ensure_topic(
                topics.status_spec(
                    names.status_topic(
                        self.extension.vm, self.extension.trust_group, self.site.config.topic_prefix
                    ),
                    self.site.config.replication_factor,
                )
            )
        await self.publisher.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.publisher.stop()

    async def seed(self) -> int:
        """Step 1: the hop's initial copy at this replica's applied cycle; returns bytes sent."""
        vm = self.extension.vm
        record = await self.site.catalog.vm(vm)
        key = vm.encode()
        with apply_lock(self.site.config.vm_folder(vm)):
            position = await self.site.catalog.position(vm)
            if position is None:
                raise ConfigurationError(f"VM {vm!r} has no applied cycle to extend from yet")
            disks = tuple(DiskSize(d.name, d.size_bytes) for d in record.disks)
            start = EpochStart(
                vm,
                position.epoch,
                position.epoch,
                self.site.config.site,
                position.cycle + 1,
                "extended replication",
                now_ms(),
                position.cycle_hash,
            )
            config = VmConfig(
                vm,
                position.epoch,
                disks,
                self.extension.frequency_seconds,
                0,
                None,
                self.site.config.site,
                now_ms(),
                (self.extension.to_site,),
            )
            await self.publisher.publish(self.topic, key, [encode(start), encode(config)])
            seeder = Seeder(self.publisher, self.topic, vm, position.epoch, f"{vm}-extend")
            for disk in record.disks:
                with DiskImage.open(disk.path, writable=False) as image:
                    await seeder.send_disk(disk.name, image)
            await seeder.finish()
            await self.site.catalog.set_extension_offset(vm, position.next_offset)
        return seeder.bytes_sent

    async def _relayed_cycle(self) -> int:
        """The last cycle already in the hop journal (-1 if none): never relay one twice."""
        last = -1
        async for message in read_to_end(self.connection, self.topic, last=4096):
            event = decode_journal(message.value)
            if isinstance(event, CycleCommit):
                last = event.cycle
        return last

    async def relay(self) -> list[int]:
        """Step 2: copy the cycles applied here since the last relay; return their numbers."""
        vm = self.extension.vm
        offset = await self.site.catalog.extension_offset(vm)
        applied = await self.site.catalog.position(vm)
        if offset is None or applied is None:
            return []
        already = await self._relayed_cycle()
        relayed: list[int] = []
        pending: list[bytes] = []
        async with JournalReader(self.site.connection, self.site.journal_topic(vm)) as reader:
            reader.seek(offset)
            while await reader.position() < applied.next_offset:
                for message in await reader.fetch(1.0):
                    if message.offset >= applied.next_offset:
                        break
                    event = decode_journal(message.value)
                    if isinstance(event, WriteBatch | EpochStart):
                        pending.append(message.value)
                    if isinstance(event, CycleCommit):
                        if event.cycle > already:
                            await self.publisher.publish(
                                self.topic, vm.encode(), [*pending, message.value]
                            )
                            relayed.append(event.cycle)
                        pending = []
                        await self.site.catalog.set_extension_offset(vm, message.offset + 1)
        return relayed


class HopRelay:
    """Extended replication of one replica VM, if it has been extended: seed once, then relay
    every ``frequency`` seconds (see :mod:`vmreplica.runtime.extension`)."""

    def __init__(self, site: Site, vm: str) -> None:
        self.site = site
        self.vm = vm
        self.relay: ExtendedReplication | None = None
        self.next_relay = 0.0
        self.next_check = 0.0

    async def poll(self) -> None:
        loop = asyncio.get_running_loop()
        if self.relay is None:
            if loop.time() < self.next_check:
                return
            self.next_check = loop.time() + DISCOVERY_SECONDS
            extension = await load_extension(self.site, self.vm)
            if extension is None:
                return
            relay = ExtendedReplication(self.site, extension)
            await relay.__aenter__()
            self.relay = relay
            if await self.site.catalog.extension_offset(self.vm) is None:
                sent = await relay.seed()
                log.info(
                    "VM %s: extended to %s, seed sent %d bytes", self.vm, extension.to_site, sent
                )
        if loop.time() >= self.next_relay:
            self.next_relay = loop.time() + self.relay.extension.frequency_seconds
            cycles = await self.relay.relay()
            if cycles:
                log.info(
                    "VM %s: relayed cycles %s to %s", self.vm, cycles, self.relay.extension.to_site
                )

    async def stop(self) -> None:
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await relay.__aexit__()
