"""Stop-VMInitialReplication: cancel a running seed cleanly, and let it go on later.

The seed is resumable by design (:mod:`vmreplica.producers.seed` records, after each
transaction, how far each disk got), so stopping it loses at most the transaction in flight.
Steps, on the primary, with the VM's worker stopped first (the agent does this when it runs;
the CLI asks it through the mailbox):

1. refuse unless the VM's initial replication is ready or in progress here;
2. in one catalog transaction: the state back to *ready for initial replication*, a hold on the
   seed, the state event, and a new generation (the agent starts the VM's worker again at once,
   which captures writes into the change log and neither seeds nor ships while held);
3. `vmreplica initial start` releases the hold: the worker, waiting, seeds — resuming from the
   recorded progress, so what the replica already holds is not sent again — then ships the
   writes made meanwhile as ordinary cycles.

The replica is not told: it stays in *initial replication in progress* and applies the rest of
the seed when it comes.
"""

from __future__ import annotations

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.runtime.site import Site

SEEDING = (
    ReplicationState.READY_FOR_INITIAL_REPLICATION,
    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
)


async def _primary_seeding(site: Site, vm: str, verb: str) -> ReplicationState:
    doing = f"{verb} its initial replication"
    record = await site.catalog.vm(vm)
    if record.role != "primary":
        raise ConfigurationError(
            f"VM {vm!r} is a replica at site {site.config.site}: {doing} on its primary, "
            f"site {record.partner_site}"
        )
    if record.state not in SEEDING:
        raise ReplicationError(
            f"VM {vm!r} is {record.state.value}: its initial replication is over, there is "
            f"nothing to {verb}. Operator action: `vmreplica resync {vm}` repairs a replica "
            "that differs"
        )
    return record.state


async def stop_initial_replication(site: Site, vm: str) -> str:
    """Steps 1-2 of the module docstring (the VM's worker is not running); what to print.

    :raises ConfigurationError: unknown VM, or a replica (exit 2).
    :raises ReplicationError: the initial replication is over (exit 1).
    """
    await _primary_seeding(site, vm, "stop")
    if await site.catalog.seed_held(vm):
        return f"the initial replication of VM {vm} is already stopped; nothing to do"
    progress = await site.catalog.seed_progress(vm)
    await site.catalog.hold_seed(vm, "initial replication stopped by the operator")
    record = await site.catalog.vm(vm)
    total = sum(d.size_bytes for d in record.disks)
    done = sum(progress.get(d.name, 0) for d in record.disks)
    return (
        f"initial replication of VM {vm} stopped with {done} of {total} bytes examined; it is "
        f"ready for initial replication, its writes kept in the change log. `vmreplica initial "
        f"start {vm}` goes on from there"
    )


async def start_initial_replication(site: Site, vm: str) -> str:
    """Step 3: release the hold; the agent's worker seeds (resuming) at once."""
    await _primary_seeding(site, vm, "start")
    if not await site.catalog.seed_held(vm):
        return (
            f"the initial replication of VM {vm} is not stopped: `vmreplica agent` runs it "
            f"(`vmreplica status {vm}` shows how far it got)"
        )
    await site.catalog.release_seed(vm)
    return (
        f"initial replication of VM {vm} goes on where it stopped as soon as `vmreplica agent` "
        "runs it"
    )
