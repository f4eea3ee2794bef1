"""A VM on more than two sites: who takes over, and how every other site follows.

A VM's sites are its primary and its replica sites. Each site records the others the same way
whatever its role: ``partner_site`` is, at the primary, its replica site (the one ``enable``
named) and, at a replica, the primary; ``settings.also_replicate_to`` holds the rest. A failover
names the one site that takes over (``FailoverPrepared.target``; unplanned, the replica that
fails over). Every other site then follows it:

- the old primary becomes its replica (planned with ``--reverse``, or ``reverse`` later);
- the other replicas keep applying the journal: the new epoch continues the hash chain at the
  cycle they all hold, so they follow without a resync (:func:`follow_new_primary` only records
  who their primary is now).

:func:`regroup` is the pure rule both use; :func:`check_target` refuses a target that is not one
of the VM's replica sites before anything changes.
"""

from __future__ import annotations

from dataclasses import replace

from vmreplica.domain.model import VmRecord, VmSettings
from vmreplica.errors import ConfigurationError
from vmreplica.failover.journal import newest_epoch
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import EpochStart


def vm_sites(record: VmRecord, here: str) -> frozenset[str]:
    """Every site of the VM as ``here`` records them: itself, its partner and the others."""
    return frozenset({here, record.partner_site, *record.settings.also_replicate_to})


def replica_sites(record: VmRecord) -> tuple[str, ...]:
    """At the VM's primary: its replica sites, the one ``enable`` named first."""
    return (record.partner_site, *record.settings.also_replicate_to)


def regroup(record: VmRecord, here: str, primary: str) -> tuple[str, VmSettings]:
    """``here``'s partner and settings once ``primary`` is the VM's primary.

    At the new primary the partner is the old primary (its partner as a replica), which
    becomes its reverse replica; at every other site the partner is the new primary. The other
    sites go to ``also_replicate_to``.
    """
    partner = record.partner_site if primary == here else primary
    others = tuple(sorted(vm_sites(record, here) - {here, partner}))
    return partner, replace(record.settings, also_replicate_to=others)


def check_target(record: VmRecord, target: str) -> str:
    """The site a planned failover of ``record`` (at its primary) hands over to.

    :raises ConfigurationError: ``target`` is not one of the VM's replica sites.
    """
    sites = replica_sites(record)
    if not target:
        return sites[0]
    if target not in sites:
        raise ConfigurationError(
            f"site {target!r} is not a replica site of VM {record.name!r}; its replica sites "
            f"are {', '.join(sites)}. The VM stays primary here"
        )
    return target


async def follow_new_primary(site: Site, vm: str, start_offset: int) -> EpochStart | None:
    """A replica applied a newer epoch: when another replica site took over, record that site
    as this replica's primary (and the old primary among the others).

    ``start_offset``: an offset at or before the new EpochStart. Returns the EpochStart acted
    on, or None when the primary did not change.
    """
    found = await newest_epoch(site, vm, start_offset)
    record = await site.catalog.vm(vm)
    here = site.config.site
    if found is None or record.role != "replica":
        return None
    start = found[1]
    if start.primary_site in (record.partner_site, here):
        return None
    partner, settings = regroup(record, here, start.primary_site)
    await site.catalog.change_role(
        vm,
        "replica",
        partner,
        max(record.epoch, start.epoch),
        record.state,
        f"following site {partner}, primary since epoch {start.epoch}",
        settings=settings,
    )
    return start
