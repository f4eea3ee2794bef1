"""A site: its catalog, its Kafka connection, and the VMs it is primary or replica for.

The Python API and every CLI command go through :class:`Site`; the agent is a :class:`Site` that
keeps running. It is the one place that composes both roles (``producers`` for the VMs it is
primary of, ``consumers`` for those it is replica of); neither role imports the other.

About 450 lines: enabling, opening either role and discovery (the configs topic, journals,
adoption) are what a site is; each part is short and they share its catalog, keys and topics.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.consumers.configured import replica_settings
from vmreplica.consumers.replica import ReplicaVm, image_path
from vmreplica.domain import names
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.events import EventId, EventLevel
from vmreplica.domain.model import DiskRecord, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import (
    ConfigurationError,
    DecodeError,
    JournalViolation,
    UntrustedStatusError,
)
from vmreplica.journal import topics
from vmreplica.journal.kafka import KafkaConnection, StatusPublisher, TopicAdmin, read_to_end
from vmreplica.producers.primary import PrimaryVm
from vmreplica.schemas.codec import decode_journal, decode_status
from vmreplica.schemas.events import StatusEvent, VmConfig, WrappedKey
from vmreplica.schemas.validation import check_event
from vmreplica.security.authorization import AuthorizationStore, JournalVerifier, StatusVerifier
from vmreplica.security.encryption import VmKeyRing
from vmreplica.security.signing import SiteKey, load_site_key, parse_public_key
from vmreplica.service import Service
from vmreplica.storage.catalog import Catalog

log = logging.getLogger(__name__)

REFUSED_STATUS_REMEMBERED: Final = 10_000
"""Refused status records a site remembers, to log each once however many readers meet it."""


class Site(Service):
    """One site's view of replication. ``async with Site(config) as site: ...``."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.connection = KafkaConnection(
            config.bootstrap_servers, client_id=config.site, security=config.client_security()
        )
        self.catalog = Catalog(config.catalog_path)
        self._status: StatusPublisher | None = None
        self.authorization = AuthorizationStore(config.root)
        """Which primaries this site accepts and their keys (:mod:`vmreplica.security`)."""
        self._key: SiteKey | None = None
        self._configs_ready = False
        """The trust group's configs topic is known to exist (this process made sure)."""
        self.refused: dict[str, str] = {}
        """Journals whose VM :meth:`discover` did not adopt, with the reason (topic → reason)."""
        self._refused_status: set[tuple[str, int]] = set()
        """Status records refused and logged already (VM, offset): several readers meet them."""

    async def start(self) -> None:
        self.config.root.mkdir(parents=True, exist_ok=True)
        self._key = load_site_key(self.config.root)
        await self.catalog.start()

    async def stop(self) -> None:
        if self._status is not None:
            status, self._status = self._status, None
            await status.stop()
        await self.catalog.stop()

    @property
    def key(self) -> SiteKey:
        """This site's signing key (created on the site's first start)."""
        if self._key is None:
            self._key = load_site_key(self.config.root)
        return self._key

    def verifier(self, vm: str, primary_site: str) -> JournalVerifier:
        """Checks the signatures of ``vm``'s journal against this site's authorization entries."""
        return JournalVerifier(self.authorization, self.config.trust_group, vm, primary_site)

    def status_verifier(self, vm: str) -> StatusVerifier:
        """Checks the signatures of ``vm``'s status records against this site's entries."""
        return StatusVerifier(self.authorization, self.config.trust_group, vm)

    async def trusted_status(
        self, vm: str, offset: int, value: bytes, *, note: bool = True
    ) -> StatusEvent | None:
        """The record ``value`` at ``offset`` of ``vm``'s status topic, decoded, when this site
        may use it; None when no key it trusts for the reporting site signed it (logged, and
        with ``note`` written to the VM's event log, once per record: a forged position,
        digest map or resync request is never acted on).

        :raises DecodeError: ``value`` is not a status record this release reads.
        """
        event = decode_status(value)
        try:
            self.status_verifier(vm).check(event, offset, value)
        except UntrustedStatusError as refusal:
            if (vm, offset) in self._refused_status:
                return None
            log.warning("%s", refusal)
            if note:
                if len(self._refused_status) >= REFUSED_STATUS_REMEMBERED:
                    self._refused_status.clear()
                self._refused_status.add((vm, offset))
                await self.catalog.record_event(
                    vm, EventId.UNTRUSTED_STATUS_REFUSED, EventLevel.WARNING, str(refusal)
                )
            return None
        return event

    def key_recipients(self, vm: str, sites: Sequence[str]) -> dict[str, bytes]:
        """The public key of each replica site of ``vm``, from this site's authorization
        entries, to wrap the VM's payload keys for.

        :raises ConfigurationError: a site has no entry here.
        """
        recipients = {}
        for site in sites:
            entries = self.authorization.for_primary(site, self.config.trust_group)
            if not entries:
                raise ConfigurationError(
                    f"VM {vm!r} encrypts its payloads, but this site has no authorization entry "
                    f"for replica site {site!r} to wrap the key for. Add one (reverse replication "
                    f"needs it too): vmreplica authorization add --primary {site} --storage DIR "
                    f"--key KEY, with KEY from `vmreplica key show` on {site}"
                )
            recipients[site] = parse_public_key(entries[0].keys[-1])
        return recipients

    def key_ring(self, vm: str) -> VmKeyRing:
        """``vm``'s payload keys at this site (:mod:`vmreplica.security.encryption`)."""
        return VmKeyRing(self.config.root, vm, self.key)

    def journal_topic(self, vm: str) -> str:
        return names.journal_topic(vm, self.config.trust_group, self.config.topic_prefix)

    def status_topic(self, vm: str) -> str:
        return names.status_topic(vm, self.config.trust_group, self.config.topic_prefix)

    @property
    def configs_topic(self) -> str:
        """The trust group's compacted topic of VM configurations (:func:`names.configs_topic`)."""
        return names.configs_topic(self.config.trust_group, self.config.topic_prefix)

    async def enable(
        self,
        vm: str,
        disks: Mapping[str, Path],
        replica_site: str,
        settings: VmSettings,
        sizes: Mapping[str, int] | None = None,
    ) -> VmRecord:
        """Start replicating ``vm`` to ``replica_site`` (Enable-VMReplication).

        Disk images must exist, unless ``sizes`` gives a size to create them with.

        :raises ConfigurationError: a bad name, a missing disk, bad settings
            (:meth:`VmSettings.validate`), a duplicate.
        """
        names.check_name("VM", vm)
        names.check_name("site", replica_site)
        for target in (replica_site, *settings.also_replicate_to):
            names.check_name("site", target)
            if target == self.config.site:
                raise ConfigurationError(
                    f"VM {vm!r} cannot replicate to its own site {target!r}; name the replica site"
                )
        settings.validate()
        if settings.encrypt:  # refused now, not at the first cycle
            self.key_recipients(vm, (replica_site, *settings.also_replicate_to))
        records = []
        for name, path in disks.items():
            if name in settings.excluded_disks:
                continue
            names.check_name("disk", name)
            image = path.expanduser().resolve()
            size = (sizes or {}).get(name)
            if size is None:
                if not image.is_file():
                    raise ConfigurationError(
                        f"disk {name!r} of VM {vm!r}: {image} is not a file. Give the path of "
                        "the VM's raw disk image"
                    )
                size = image.stat().st_size
            records.append(DiskRecord(name, str(image), size))
        if not records:
            raise ConfigurationError(f"VM {vm!r} has no disk left to replicate")
        if len({r.path for r in records}) != len(records):
            raise ConfigurationError(f"VM {vm!r}: two disks name the same image file")
        await self.ensure_topics(vm)
        await self.catalog.add_vm(
            vm,
            "primary",
            self.config.trust_group,
            replica_site,
            settings,
            records,
            ReplicationState.READY_FOR_INITIAL_REPLICATION,
        )
        return await self.catalog.vm(vm)

    async def ensure_topics(self, vm: str) -> None:
        history = await self.catalog.find_vm(vm)
        hours = history.settings.recovery_history if history else 0
        async with TopicAdmin(self.connection) as admin:
            await admin.ensure_topic(
                topics.journal_spec(
                    self.journal_topic(vm), self.config.replication_factor, hours + 1
                )
            )
            await admin.ensure_topic(
                topics.status_spec(self.status_topic(vm), self.config.replication_factor)
            )
            await admin.ensure_topic(
                topics.configs_spec(self.configs_topic, self.config.replication_factor)
            )
        self._configs_ready = True

    async def ensure_configs_topic(self) -> None:
        """Create the trust group's configs topic unless this process made sure of it already:
        VMs enabled by an earlier release, whose topics were made without it, publish there
        too."""
        if self._configs_ready:
            return
        async with TopicAdmin(self.connection) as admin:
            await admin.ensure_topic(
                topics.configs_spec(self.configs_topic, self.config.replication_factor)
            )
        self._configs_ready = True

    def primary(self, record: VmRecord, *, connect: bool = True) -> PrimaryVm:
        """The primary-side worker of a VM this site is primary for (not yet started);
        ``connect=False``: it captures but joins the journal only on ``connect()``."""
        if record.role != "primary":
            raise ConfigurationError(
                f"VM {record.name!r} is a replica at site {self.config.site!r}, not its primary"
            )
        cipher: VmKeyRing | None = None
        wrapped: tuple[WrappedKey, ...] = ()
        announce = False
        if record.settings.encrypt:
            ring = self.key_ring(record.name)
            hours = max(record.settings.recovery_history + 1, topics.JOURNAL_MIN_RETENTION_HOURS)
            ring.prune(hours * HOUR_MS)  # no record on the topic needs them any more
            if ring.needs_rotation():
                announce = ring.current() is not None
                ring.rotate()
            sites = (record.partner_site, *record.settings.also_replicate_to)
            wrapped = ring.wrap_for(self.key_recipients(record.name, sites))
            cipher = ring
        return PrimaryVm(
            record,
            self.config.site,
            self.config.vm_folder(record.name),
            self.connection,
            self.catalog,
            self.journal_topic(record.name),
            names.transactional_id(record.name, self.config.trust_group, self.config.topic_prefix),
            self.key.encode,
            cipher,
            wrapped,
            announce,
            self.verifier(record.name, self.config.site),
            connect=connect,
            configs_topic=self.configs_topic,
            ensure_configs_topic=self.ensure_configs_topic,
        )

    async def replica(self, record: VmRecord, *, connect: bool = True) -> ReplicaVm:
        """The replica-side worker of a VM this site is replica for (not yet started);
        ``connect=False``: it opens the images but joins the journal only on ``connect()``."""
        if record.role != "replica":
            raise ConfigurationError(
                f"VM {record.name!r} is primary at site {self.config.site!r}, not a replica"
            )
        if self._status is None:
            self._status = StatusPublisher(self.connection)
        return ReplicaVm(
            record,
            self.config.site,
            self.config.vm_folder(record.name),
            self.connection,
            self.catalog,
            self.journal_topic(record.name),
            self.status_topic(record.name),
            self._status,
            self.verifier(record.name, record.partner_site),
            self.key_ring(record.name),
            self.config.heartbeat_seconds,
            connect=connect,
            encode_status=self.key.encode,
        )

    async def discover(self) -> list[VmRecord]:
        """Adopt VMs whose journal names this site's trust group and an accepted primary.

        What a VM is comes from the newest VmConfig its primary keeps on the trust group's
        compacted configs topic (:attr:`configs_topic`), republished at every epoch and every
        start of the primary: a site added long after the seed, or back after the journal's
        retention deleted the seed, finds the VM and its current settings there. A VM with
        none there (a primary of an older release) is described by the first VmConfig of its
        journal.

        Both topics are untrusted input: a VM whose topic name or VmConfig is refused (a
        name that could escape the storage root, an absurd size, a record that does not decode,
        a VmConfig naming another VM, a signature no entry trusts) is not adopted and nothing is
        created for it. The reason is logged once and kept in :attr:`refused` (topic → message
        naming the offset); the other VMs are adopted as usual.
        """
        prefix = f"{self.config.topic_prefix}.{self.config.trust_group}."
        async with TopicAdmin(self.connection) as admin:
            listed = await admin.topics()
        if not self.config.replica_enabled:  # `vmreplica server set --no-replica`
            return []  # (Kafka was asked all the same: the agent learns it answers)
        known = await self.catalog.generations()  # every VM of this site, in one query
        journals = [
            t
            for t in listed
            if t.startswith(prefix)
            and t.endswith(".journal")
            and t.removeprefix(prefix).removesuffix(".journal") not in known
        ]
        # Read only when a journal's VM is new here: an agent discovers every few seconds.
        published = (
            await self._published_configs() if journals and self.configs_topic in listed else {}
        )
        adopted = []
        removed = await self.catalog.removed_vms()  # `vmreplica remove` here: not again
        for topic in sorted(journals):
            vm = topic.removeprefix(prefix).removesuffix(".journal")
            try:
                names.check_name("VM", vm)
                if vm in removed or await self.catalog.find_vm(vm) is not None:
                    continue
                config = published.get(vm) or await self._first_config(topic, vm)
            except (ConfigurationError, JournalViolation) as error:
                self._refuse(topic, str(error))
                continue
            if config is None or config.primary_site == self.config.site:
                continue
            if config.replica_sites and self.config.site not in config.replica_sites:
                continue
            if not self.config.accepts(config.primary_site):
                continue
            if self.authorization.entries() and not self.authorization.for_primary(
                config.primary_site, self.config.trust_group
            ):
                continue
            adopted.append(await self.adopt(config))
            self.refused.pop(topic, None)
        return adopted

    def _refuse(self, topic: str, reason: str) -> None:
        if self.refused.get(topic) != reason:
            log.warning("not adopting the VM of journal %s: %s", topic, reason)
        self.refused[topic] = reason

    async def adopt(self, config: VmConfig) -> VmRecord:
        """Become a replica of the VM ``config`` describes.

        The record keeps the VM's settings as its primary published them — how it captures
        writes among them — so that this site, if it takes over, captures the disks the way
        the old primary did (a scan's cut hooks, being commands, are this site's to set);
        ``also_replicate_to`` holds the VM's other replica sites, which follow whichever of
        them takes over.

        :raises InvalidEventError: a name, size or setting in ``config`` is refused
            (:func:`~vmreplica.schemas.validation.check_vm_config`); nothing was created.
        """
        check_event(config)
        if config.wrapped_keys:  # the journal may no longer hold the VmConfig that wraps them
            try:
                self.key_ring(config.vm).learn(config, self.config.site)
            except DecodeError as error:
                log.warning("VM %s: the payload keys of its VmConfig: %s", config.vm, error)
        storage = self.authorization.storage_for(config.primary_site, self.config.trust_group)
        storage = storage or self.config.replica_storage
        folder = self.config.vm_folder(config.vm) if storage is None else storage / config.vm
        disks = [
            DiskRecord(d.name, str(image_path(folder, d.name)), d.size_bytes) for d in config.disks
        ]
        settings = replica_settings(config, self.config.site)
        await self.catalog.add_vm(
            config.vm,
            "replica",
            self.config.trust_group,
            config.primary_site,
            settings,
            disks,
            ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
            config.epoch,
        )
        if config.initial == "export":
            await self.catalog.set_state(
                config.vm,
                ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
                f"waiting for its seed on external media: `vmreplica initial import {config.vm} "
                "DIR` with the folder `vmreplica initial export` wrote at "
                f"{config.primary_site}",
            )
        return await self.catalog.vm(config.vm)

    async def _published_configs(self) -> dict[str, VmConfig]:
        """The newest VmConfig of each VM on the configs topic whose signature and values
        pass; one refused is logged and passed over (an older one of the VM, or its journal's,
        describes it then). A tombstone (no value) forgets the VM's."""
        configs: dict[str, VmConfig] = {}
        async with contextlib.aclosing(read_to_end(self.connection, self.configs_topic)) as found:
            async for record in found:
                if not record.value:  # a tombstone: the VM's replication was removed
                    configs.pop((record.key or b"").decode(errors="replace"), None)
                    continue
                try:
                    event = decode_journal(record.value)
                    if not isinstance(event, VmConfig) or record.key != event.vm.encode():
                        continue
                    self.verifier(event.vm, "").check(event, record.offset, record.value)
                except (DecodeError, JournalViolation) as error:
                    self._refuse(self.configs_topic, f"offset {record.offset}: {error}")
                    continue
                configs[event.vm] = event
        return configs

    async def _first_config(self, topic: str, vm: str) -> VmConfig | None:
        """The first VmConfig of ``vm``'s journal, checked, or None when there is none yet.

        :raises JournalViolation: a record before it, or it, is refused (naming its offset), or
            it describes another VM.
        """
        verifier = self.verifier(vm, "")
        async with contextlib.aclosing(read_to_end(self.connection, topic)) as records:
            async for record in records:
                try:
                    event = decode_journal(record.value)
                    if isinstance(event, VmConfig):
                        verifier.check(event, record.offset, record.value)
                except JournalViolation:
                    raise
                except DecodeError as error:
                    raise JournalViolation(
                        vm, record.offset, str(error), ReplicationState.ERROR
                    ) from error
                if isinstance(event, VmConfig):
                    if event.vm != vm:
                        raise JournalViolation(
                            vm,
                            record.offset,
                            f"VmConfig describes VM {event.vm!r}, not the journal's VM",
                            ReplicationState.ERROR,
                        )
                    return event
        return None


def parse_disks(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=PATH`` arguments of ``vmreplica enable --disk``.

    :raises ConfigurationError: a spec without ``=``, or a name given twice.
    """
    disks: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigurationError(
                f"--disk {spec!r}: expected NAME=PATH, e.g. --disk disk0=/var/lib/vms/web.img"
            )
        if name in disks:
            raise ConfigurationError(f"--disk {name!r} is given twice")
        disks[names.check_name("disk", name)] = Path(os.path.expanduser(path))
    return disks
