"""Set-VMReplication: change a replicating VM's settings at its primary, and make both sites
use them.

The order, each step durable before the next:

1. :func:`change_settings` checks the change (:mod:`vmreplica.domain.settings_change`) and
   writes the new settings in one catalog transaction that also bumps the VM's generation and
   marks a ``VmConfig`` as pending (refused if the VM changed meanwhile: a failover, another
   `set`);
2. the agent, seeing the generation move with other settings, restarts the VM's worker, which
   starts with them (frequency, compression, encryption, application-consistent schedule);
3. before its first cycle, the worker publishes a signed ``VmConfig`` saying them
   (:func:`publish_pending_config`), then clears the mark. A crash between the two publishes it
   again, which the replica takes as it took the first;
4. the replica, meeting the ``VmConfig`` in the journal, keeps the new settings in its catalog
   and its recovery points by the new history (:class:`~vmreplica.consumers.replica.ReplicaVm`).

Without an agent running, steps 2-4 happen when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmreplica.domain import names
from vmreplica.domain.model import DiskRecord, VmRecord
from vmreplica.domain.settings_change import SettingsChange, changed_settings, differences
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.site import Site

log = logging.getLogger(__name__)

FAILOVER_STATES = (
    ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
    ReplicationState.FAILED_OVER_WAITING_COMPLETION,
    ReplicationState.FAILED_OVER,
)
"""While a VM is in one of these its role is changing: its settings stay as they are."""


@dataclass(frozen=True)
class SettingsChanged:
    """What :func:`change_settings` did."""

    before: VmRecord
    after: VmRecord
    changed: dict[str, tuple[Any, Any]]
    """Setting → (before, after); empty when the values given were the current ones."""


async def seeded(site: Site, vm: str) -> bool:
    """Something of the VM is in the journal: its initial replication began."""
    record = await site.catalog.vm(vm)
    return (
        record.state is not ReplicationState.READY_FOR_INITIAL_REPLICATION
        or await site.catalog.position(vm) is not None
        or bool(await site.catalog.seed_progress(vm))
    )


async def change_settings(
    site: Site, vm: str, change: SettingsChange, include: Mapping[str, Path] | None = None
) -> SettingsChanged:
    """Steps 1 of the module docstring. ``include``: the images of ``change.include_disks``.

    :raises ConfigurationError: a mistake: unknown VM, a replica, a bad value (exit 2).
    :raises ReplicationError: refused now: a failover runs, or a disk or replica-site change
        after the seed began (exit 1).
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary":
        raise ConfigurationError(
            f"VM {vm!r} is a replica at site {site.config.site}: its settings are its primary's. "
            f"Run `vmreplica set {vm}` on site {record.partner_site}; this replica takes them "
            "from the journal"
        )
    if record.state in FAILOVER_STATES:
        raise ReplicationError(
            f"VM {vm!r} is {record.state.value}: its settings cannot change while its role "
            f"does. Operator action: complete or cancel the failover first (`vmreplica failover "
            f"complete|cancel {vm}`), or `vmreplica reverse {vm}` on the new primary"
        )
    generation = await site.catalog.generation(vm)
    disk_names = tuple(d.name for d in record.disks)
    settings = changed_settings(
        vm, record.settings, change, disk_names, seeded=await seeded(site, vm)
    )
    if change.replica_site is not None:
        names.check_name("site", change.replica_site)
        if change.replica_site == site.config.site:
            raise ConfigurationError(
                f"VM {vm!r} cannot replicate to its own site {change.replica_site!r}"
            )
    partner = change.replica_site or record.partner_site
    if settings.encrypt:  # refused now, not at the worker's first cycle
        site.key_recipients(vm, (partner, *settings.also_replicate_to))
    disks = _disks(vm, record, change, include or {})
    changed = differences(record.settings, settings)
    if partner != record.partner_site:
        changed["replica_site"] = (record.partner_site, partner)
    if disks is not None:
        changed["disks"] = ([d.name for d in record.disks], [d.name for d in disks])
    if not changed:
        return SettingsChanged(record, record, {})
    said = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
    await site.catalog.change_settings(
        vm,
        settings,
        f"settings changed: {said}",
        generation=generation,
        partner_site=None if partner == record.partner_site else partner,
        disks=disks,
    )
    return SettingsChanged(record, await site.catalog.vm(vm), changed)


def _disks(
    vm: str, record: VmRecord, change: SettingsChange, include: Mapping[str, Path]
) -> list[DiskRecord] | None:
    """The VM's disks after ``change`` (before its seed), or None when they stay."""
    if not (change.exclude_disks or change.include_disks):
        return None
    disks = [d for d in record.disks if d.name not in change.exclude_disks]
    for name in change.include_disks:
        image = include[name].expanduser().resolve()
        if not image.is_file():
            raise ConfigurationError(
                f"--include-disk {name}: {image} is not a file. Give the path of the VM's raw "
                "disk image"
            )
        disks.append(DiskRecord(names.check_name("disk", name), str(image), image.stat().st_size))
    if len({d.path for d in disks}) != len(disks):
        raise ConfigurationError(f"VM {vm!r}: two disks would name the same image file")
    return disks


async def publish_pending_config(site: Site, primary: PrimaryVm) -> bool:
    """Step 3: publish the VM's settings in a signed ``VmConfig`` if `set` changed them since
    the last one; True when one was published. A VM whose seed has not published anything yet
    needs none: its seed's ``VmConfig`` carries the settings."""
    vm = primary.name
    if not primary.connected or not await site.catalog.config_pending(vm):
        return False
    if await site.catalog.position(vm) is not None or await site.catalog.seed_progress(vm):
        await primary.publish(primary.config_event())
        log.info("VM %s: its changed settings are published to the replica", vm)
    await site.catalog.config_published(vm)
    return True
