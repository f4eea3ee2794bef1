"""Planned failover: the primary ships its final cycle, the replica takes over with no data loss.

1. On the primary, the VM's hypervisor adapter stops the VM (:func:`stop_vm`) while its writes
   are still captured (the agent stops its worker, and the exports turn read-only, only after
   that); then :func:`prepare_planned` refuses further writes, ships the final cycle and
   publishes FailoverPrepared (with full-disk digests under ``--verify``). A refusal after the
   stop resumes the VM (:func:`resume_vm`), as does a cancel.
2. On the replica site the FailoverPrepared names (``target``; the VM's other replica sites
   only follow), once it applied the final cycle, :func:`check_takeover` proves it holds
   exactly what the primary had (hash chain, and the digests if sent), and
   :func:`~vmreplica.failover.unplanned.promote` starts the new epoch; ``--start`` then
   starts the VM through this site's adapter (:func:`start_vm`).
3. The old primary, seeing the new epoch, follows it (:func:`follow_takeover`): as its replica
   with ``--reverse`` (no resync: both are identical), or standing down as failed over until
   the new primary runs ``reverse`` (:func:`follow_reverse`); either way it ends the stopped VM
   here (:func:`power_off_vm`: QEMU ``quit``). The other replica sites apply the
   new epoch as they applied the old one (:mod:`~vmreplica.failover.fanout`).

Until step 2 happens, :func:`cancel_planned` takes it back.
"""

from __future__ import annotations

import contextlib
import logging

from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Position, VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import FailoverRefused, HookError
from vmreplica.failover.divergence import report_divergence
from vmreplica.failover.fanout import check_target
from vmreplica.failover.journal import journal_events, newest_epoch
from vmreplica.failover.reverse import demote
from vmreplica.hypervisor import hypervisor_for
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import EpochStart, FailoverPrepared
from vmreplica.storage.image import sha256_of

log = logging.getLogger(__name__)


async def stop_vm(site: Site, vm: str) -> None:
    """Step 1 of a planned failover: stop the VM through its hypervisor adapter
    (:func:`~vmreplica.hypervisor.hypervisor_for`: ``--hypervisor``, the site's ``hypervisor``,
    or ``vm_stop_command``) while its writes are still captured.

    :raises FailoverRefused: the call failed or timed out; the failover did not start, and the
        VM was left as the hypervisor has it (serving here, unless it stopped by itself).
    """
    record = await site.catalog.vm(vm)
    hypervisor = hypervisor_for(site.config, record)
    try:
        await hypervisor.stop()
    except HookError as error:
        raise FailoverRefused(
            f"{error}. The planned failover did not start; VM {vm!r} stays primary here. "
            f"Operator action: stop the VM by other means (or fix vm_stop_command or "
            f"--hypervisor), then retry"
        ) from error


async def resume_vm(site: Site, vm: str, why: str) -> None:
    """Resume a VM that :func:`stop_vm` stopped (the failover was refused after the stop, or
    cancelled); a failure is logged, not raised: the failover's own outcome is reported."""
    record = await site.catalog.vm(vm)
    hypervisor = hypervisor_for(site.config, record)
    try:
        await hypervisor.resume()
    except HookError as error:
        log.error("VM %s: %s; resuming it failed: %s. Operator action: start it by hand",
                  vm, why, error)  # fmt: skip
    else:
        log.info("VM %s: %s; resumed it (%s)", vm, why, hypervisor.description)


async def power_off_vm(site: Site, record: VmRecord) -> None:
    """The old primary, once the new one took over: end the stopped VM here (QEMU ``quit``);
    a failure is logged, not raised (the VM is stopped, and its exports refuse writes)."""
    hypervisor = hypervisor_for(site.config, record)
    try:
        await hypervisor.power_off()
    except HookError as error:
        log.warning("VM %s: it runs at the new primary now; ending it here failed: %s",
                    record.name, error)  # fmt: skip


async def start_vm(site: Site, record: VmRecord) -> None:
    """``--start``, after the replica took over: start the VM through its adapter here
    (``vm_start_command`` without one). A failure does not undo the takeover, nor stop this
    site capturing as the new primary: it is logged and becomes the VM's state message, which
    `vmreplica status` shows until the next state change."""
    try:
        await hypervisor_for(site.config, record).start()
    except HookError as error:
        message = (
            f"{error}. This site took VM {record.name!r} over as its primary but did not start "
            "it. Operator action: start the VM by hand"
        )
        log.error("%s", message)
        current = await site.catalog.vm(record.name)
        await site.catalog.set_state(record.name, current.state, message)


async def check_planned(site: Site, vm: str, target: str = "") -> str:
    """What a planned failover of ``vm`` needs before anything is done (the VM stop included):
    a replicating primary here, and a target that is one of its replica sites. Returns the
    target (the replica site ``enable`` named when none is given).

    :raises FailoverRefused: not a replicating primary here.
    :raises ConfigurationError: ``target`` is not a replica site of the VM.
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary" or record.state is not ReplicationState.REPLICATING:
        raise FailoverRefused(
            f"VM {vm!r} is {record.role} here in state "
            f"{record.state.value!r}; planned failover starts on a "
            "replicating primary"
        )
    return check_target(record, target)


async def prepare_planned(
    site: Site,
    vm: str,
    reverse: bool = False,
    start_vm: bool = False,
    verify: bool = False,
    target: str = "",
) -> FailoverPrepared:
    """Planned failover, on the primary: ship the final cycle and mark the VM prepared.

    The VM must already be stopped (the hypervisor adapter does that): writes are refused from
    here on. The replica site ``target`` (by default the one ``enable`` named) takes over once
    it has applied the final cycle; the VM's other replica sites follow it.
    """
    target = await check_planned(site, vm, target)
    record = await site.catalog.vm(vm)
    async with site.primary(record) as primary:
        primary.refuse_writes(f"VM {vm!r} is prepared for planned failover")
        await primary.replicate()
        position = await site.catalog.position(vm)
        if position is None:
            raise FailoverRefused(f"VM {vm!r} has not finished initial replication")
        digests = primary.disk_digests() if verify else ()
        prepared = FailoverPrepared(
            vm,
            record.epoch,
            position.cycle,
            position.cycle_hash,
            now_ms(),
            site.config.site,
            start_vm,
            digests,
            target,
        )
        await primary.publish(prepared)
    await site.catalog.set_reverse_wanted(vm, reverse)
    await site.catalog.set_state(
        vm,
        ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
        f"final cycle {position.cycle} shipped; waiting for {target} to take over",
    )
    return prepared


def takes_over(prepared: FailoverPrepared, here: str) -> bool:
    """Whether the replica at ``here`` is the one that takes over (the others follow it)."""
    return prepared.target in ("", here)


def check_takeover(
    record: VmRecord, position: Position, prepared: FailoverPrepared, here: str = ""
) -> None:
    """On the replica: it is the site the failover names, it stands exactly at the prepared
    final cycle, and (``--verify``) its disks have the digests the primary sent.

    :raises FailoverRefused: another site takes over, not yet caught up, or a disk differs
        although the chain matched.
    """
    vm = record.name
    if here and not takes_over(prepared, here):
        raise FailoverRefused(
            f"VM {vm!r}: the planned failover hands over to site "
            f"{prepared.target}, not to {here}; this site follows it"
        )
    if (position.cycle, position.cycle_hash) != (prepared.final_cycle, prepared.cycle_hash):
        raise FailoverRefused(
            f"VM {vm!r}: the replica is at cycle {position.cycle} but the primary prepared "
            f"cycle {prepared.final_cycle}; let it catch up and retry"
        )
    for digest in prepared.disk_sha256:  # --verify: a full compare on top of the chain
        path = next(d.path for d in record.disks if d.name == digest.name)
        if sha256_of(path) != digest.sha256:
            raise FailoverRefused(
                f"VM {vm!r}: disk {digest.name!r} differs from the primary's at cycle "
                f"{prepared.final_cycle} although the hash chain matched. Operator action: "
                f"cancel the failover on the primary (`vmreplica failover cancel {vm}`), then "
                f"`vmreplica resync {vm}` there"
            )


async def cancel_planned(site: Site, vm: str) -> None:
    """Cancel a planned failover on the primary, until the replica has taken over.

    Ships an empty cycle after the FailoverPrepared: a replica that has not yet acted on the
    prepare sees the primary carry on and stays a replica.
    """
    record = await site.catalog.vm(vm)
    found = await newest_epoch(site, vm, 0)
    if found is not None and found[1].epoch > record.epoch:
        raise FailoverRefused(
            f"too late: site {found[1].primary_site} took over VM {vm!r} in epoch {found[1].epoch}"
        )
    async with site.primary(record) as primary:
        await primary.replicate(force=True)
    await site.catalog.set_reverse_wanted(vm, False)
    await site.catalog.set_state(vm, ReplicationState.REPLICATING, "planned failover cancelled")


async def _takeover(site: Site, vm: str) -> tuple[int, EpochStart] | None:
    """The first epoch after this old primary's own, with its offset: the takeover."""
    record = await site.catalog.vm(vm)
    position = await site.catalog.position(vm)
    start = position.next_offset if position else 0
    async with contextlib.aclosing(journal_events(site, vm, start)) as events:
        async for offset, event in events:
            if isinstance(event, EpochStart) and event.epoch > record.epoch:
                return offset, event
    return None


async def follow_takeover(site: Site, vm: str) -> bool:
    """On a prepared old primary: once the new epoch is in the journal, become its replica
    (``--reverse``) or stand down as failed over. Returns whether the takeover happened.

    Standing down, it still tells the new primary that nothing diverged here (the final cycle
    shipped and every write since was refused), so a later ``reverse`` there sends only what
    the new primary wrote.
    """
    if (await site.catalog.vm(vm)).role != "primary":
        return True  # followed already (by another worker of this site)
    found = await _takeover(site, vm)
    if found is None:
        return False
    offset, start = found
    record = await site.catalog.vm(vm)
    await power_off_vm(site, record)
    if await site.catalog.reverse_wanted(vm):
        await demote(site, vm, start, offset)
        return True
    await report_divergence(site, record, start, {})
    await site.catalog.set_state(
        vm,
        ReplicationState.FAILED_OVER,
        f"site {start.primary_site} is primary since epoch "
        f"{start.epoch}; `vmreplica reverse {vm}` there makes "
        "this site its replica",
    )
    return True


async def follow_reverse(site: Site, vm: str) -> bool:
    """On an old primary that stood down after a planned failover: once the new primary ran
    ``reverse`` (an epoch naming this site), become its replica from the takeover on.

    Nothing diverged here, so it needs no resync: it applies every cycle the new primary
    shipped since the takeover, then the reverse epoch. Returns whether it became a replica.
    """
    found = await _takeover(site, vm)
    if found is None:
        return False
    offset, start = found
    named = False
    async with contextlib.aclosing(journal_events(site, vm, offset)) as events:
        async for _, event in events:
            if isinstance(event, EpochStart) and site.config.site in event.resync_sites:
                named = True
                break
    if not named:
        return False
    await demote(site, vm, start, offset)
    return True
