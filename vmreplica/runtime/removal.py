"""Remove-VMReplication: stop replicating a VM at this site, keeping its images.

At the primary or at a replica. The site's agent, when it runs, does it (the CLI asks through
the mailbox): it stops the VM's worker first, so nothing writes the VM's rows or folder while
they go. Steps, in this order:

1. refuse while the VM's role is changing (a planned failover prepared, an unplanned one not
   completed) or a test failover runs: the operator ends those first;
2. delete the VM's catalog rows in one transaction that logs the removal and remembers it, so
   discovery does not adopt the VM from its journal again (`enable` here forgets that);
3. move the VM's folder (change log, undo logs, replica images kept there, job files) to
   ``<root>/removed/<vm>.<UTC time>/``, so that a later `enable` starts clean and nothing is
   deleted. A crash between 2 and 3 leaves the folder in place; `remove` again moves it.

The journal topics stay: the partner site may still read them, and another `enable` may reuse
them. The VM's own disks (at the primary) are never touched.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, FailoverRefused
from vmreplica.runtime.site import Site
from vmreplica.storage.safefile import fsync_directory

ROLE_CHANGING = (
    ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
    ReplicationState.FAILED_OVER_WAITING_COMPLETION,
)


async def remove_replication(site: Site, vm: str) -> str:
    """Steps 1-3 of the module docstring; returns what to print.

    :raises ConfigurationError: the VM is not replicated here (and was never removed here).
    :raises FailoverRefused: a failover or a test failover of the VM runs; nothing changed.
    """
    record = await site.catalog.find_vm(vm)
    folder = site.config.vm_folder(vm)
    if record is None:
        if vm not in await site.catalog.removed_vms():
            await site.catalog.vm(vm)  # raises: not replicated here
        moved = _move_aside(site, vm, folder)
        return f"VM {vm} was already removed at this site; nothing more to do" + (
            f" (its folder, left behind, is now {moved})" if moved else ""
        )
    if record.state in ROLE_CHANGING:  # step 1
        raise FailoverRefused(
            f"VM {vm!r} is {record.state.value}: replication cannot be removed while its role "
            f"changes. Operator action: `vmreplica failover complete {vm}` or `vmreplica "
            f"failover cancel {vm}` first"
        )
    if await site.catalog.test_failover(vm) is not None:
        raise FailoverRefused(
            f"VM {vm!r} has a test failover running ('{vm} - Test'): its disks are served from "
            f"this site's images. Operator action: `vmreplica failover stop-test {vm}` first"
        )
    await site.catalog.remove_vm(  # step 2
        vm, f"replication removed at this site ({record.role}, partner site {record.partner_site})"
    )
    moved = _move_aside(site, vm, folder)  # step 3
    images = []
    for disk in record.disks:
        path = Path(disk.path)
        if moved is not None and path.is_relative_to(folder):
            path = moved / path.relative_to(folder)
        images.append(f"{disk.name}: {path}")
    return (
        f"replication of VM {vm} removed at site {site.config.site} (it was {record.role} "
        f"here); its images stay: {'; '.join(images)}"
        + (f"; its replication files are in {moved}" if moved else "")
        + f". Run `vmreplica remove {vm}` at site {record.partner_site} too, to end it there"
    )


def _move_aside(site: Site, vm: str, folder: Path) -> Path | None:
    """Step 3: the VM's folder to ``<root>/removed/``; its new place, or None if none was."""
    if not folder.exists():
        return None
    removed = site.config.root / "removed"
    removed.mkdir(exist_ok=True)
    target = removed / f"{vm}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    try:
        os.rename(folder, target)
    except OSError as error:
        raise ConfigurationError(
            f"VM {vm!r}: its catalog rows are removed, but its folder {folder} could not be "
            f"moved to {target} ({error.strerror}). Operator action: move it yourself, or run "
            f"`vmreplica remove {vm}` again"
        ) from error
    fsync_directory(removed)
    fsync_directory(folder.parent)
    return target
