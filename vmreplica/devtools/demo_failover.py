"""The failover half of ``make demo``: test, planned and back, unplanned, and the return of the
old primary — with both sites driven through the Python API, digests compared at every step.

Runs after :mod:`vmreplica.devtools.demo` has replicated the VM (its replica agent has
stopped by then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmreplica import failover
from vmreplica.config import load_config
from vmreplica.consumers.drill import FailoverDrill
from vmreplica.runtime.site import Site
from vmreplica.storage.image import sha256_of

MiB = 1024 * 1024


@dataclass
class Steps:
    """Each step's name, and whether the digests it compared were equal."""

    rows: list[tuple[str, str, bool]] = field(default_factory=list)

    def check(self, step: str, detail: str, equal: bool) -> None:
        self.rows.append((step, detail, equal))

    def table(self) -> Table:
        table = Table("step", "what was compared", "equal", title="failover tour")
        for step, detail, equal in self.rows:
            table.add_row(step, detail, "[green]yes[/]" if equal else "[red]NO[/]")
        return table

    @property
    def ok(self) -> bool:
        return all(equal for _, _, equal in self.rows)


async def _digests(site: Site, vm: str) -> dict[str, str]:
    return {d.name: sha256_of(Path(d.path)) for d in (await site.catalog.vm(vm)).disks}


async def _catch_up(site: Site, vm: str) -> None:
    async with await site.replica(await site.catalog.vm(vm)) as replica:
        await replica.catch_up(120)


async def _write(site: Site, vm: str, disk: str, offset: int, size: int) -> None:
    async with site.primary(await site.catalog.vm(vm)) as primary:
        await primary.capture.write(disk, offset, os.urandom(size))
        await primary.capture.flush()
        await primary.replicate()


async def tour(config_a: Path, config_b: Path, vm: str, console: Console) -> bool:
    steps = Steps()
    async with Site(load_config(config_a)) as a, Site(load_config(config_b)) as b:
        await _catch_up(b, vm)
        # Test failover: a view of an older point while replication goes on.
        points = await b.catalog.points(vm)
        async with await b.replica(await b.catalog.vm(vm)) as replica:
            service = FailoverDrill(b.catalog, replica)
            uris = await service.start(points[-1].cycle)
            console.print(f"[bold]site-b[/]: test failover '{vm} - Test' served at {uris[0]}")
            view = service.view
            assert view is not None
            equal = all(
                view.read(d.name, 0, 4 * MiB) == replica.images[d.name].read(0, 4 * MiB)
                for d in (await b.catalog.vm(vm)).disks
            )
            await service.stop()
        steps.check("test failover", "test VM vs replica at the latest point", equal)

        # Planned failover to B and back: no data lost, no resync.
        prepared = await failover.prepare_planned(a, vm, reverse=True)
        at_stop = await _digests(a, vm)
        await _catch_up(b, vm)
        await failover.promote(b, vm, prepared=prepared)
        steps.check(
            "planned failover", "new primary B vs A at shutdown", await _digests(b, vm) == at_stop
        )
        assert await failover.follow_takeover(a, vm)
        await _write(b, vm, "data", 0, MiB)
        await _catch_up(a, vm)
        steps.check(
            "reverse replication",
            "A (replica) vs B after B's writes",
            await _digests(a, vm) == await _digests(b, vm),
        )
        prepared = await failover.prepare_planned(b, vm, reverse=True)
        await _catch_up(a, vm)
        await failover.promote(a, vm, prepared=prepared)
        assert await failover.follow_takeover(b, vm)
        steps.check(
            "planned failover back",
            "A (primary again) vs B",
            await _digests(a, vm) == await _digests(b, vm),
        )
        console.print("[bold]planned failover[/]: A → B → A, zero data loss")

        # Unplanned: A writes something that never ships, then is lost.
        await _write(a, vm, "system", 0, MiB)
        await _catch_up(b, vm)
        at_latest = await _digests(b, vm)
        async with a.primary(await a.catalog.vm(vm)) as primary:
            await primary.capture.write("system", 8 * MiB, os.urandom(256 * 1024))
            await primary.capture.flush()
        await failover.promote(b, vm, point="latest", force=True)
        steps.check(
            "unplanned failover",
            "B at the latest point vs the replica before",
            await _digests(b, vm) == at_latest,
        )
        await failover.complete(b, vm)
        await _write_unshipped(b, vm)

        # The old primary returns: it is fenced, reports what diverged, and is reversed.
        found = await failover.newest_epoch(a, vm, 0)
        assert found is not None
        diverged = await failover.demote(a, vm, found[1], found[0])
        result = await failover.reverse(b, vm)
        await _catch_up(a, vm)
        console.print(
            f"[bold]reverse[/]: {result.diverged_bytes} bytes diverged (A: "
            f"{diverged}), {result.sent_bytes} bytes sent — no full copy"
        )
        steps.check(
            "old primary reversed",
            "A (replica) vs B (primary)",
            await _digests(a, vm) == await _digests(b, vm),
        )
    console.print(steps.table())
    return steps.ok


async def _write_unshipped(site: Site, vm: str) -> None:
    """The failed-over VM runs at B: its writes wait for reverse to ship."""
    async with site.primary(await site.catalog.vm(vm)) as primary:
        await primary.capture.write("data", 2 * MiB, os.urandom(512 * 1024))
        await primary.capture.flush()
