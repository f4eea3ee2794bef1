"""Unplanned failover after the primary is SIGKILLed mid-cycle: the replica fails over to the
latest point and to an older one, and each gives exactly the primary's disks at that cycle.

The primary is `tests.e2e.primary_worker` in its own process: a deterministic workload, so the
disks at every cut can be rebuilt in memory from how many operations had been flushed.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.primary_worker import DISKS, apply_to, operation
from tests.fixtures import SiteFactory, VmFactory
from vmreplica import failover
from vmreplica.domain.model import VmSettings
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261125


def expected_digests(operations: int) -> dict[str, str]:
    model = {disk: bytearray(size) for disk, size in DISKS.items()}
    for index in range(operations):
        apply_to(model, operation(SEED, index))
    return {disk: hashlib.sha256(data).hexdigest() for disk, data in model.items()}


async def run_primary_until_killed(config: Path, vm: str, cycles: int) -> dict[int, int]:
    """Run the primary until it shipped ``cycles`` cycles and flushed more; SIGKILL it then.

    Returns, for each shipped cycle, how many operations it holds.
    """
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.primary_worker",
        str(config),
        vm,
        str(SEED),
        "0",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert worker.stdout is not None
    flushed, at_cut, after = 0, {}, 0
    try:
        async with asyncio.timeout(120):
            while line := await worker.stdout.readline():
                word, *numbers = line.split()
                if word == b"flushed":
                    flushed = int(numbers[0])
                    after += 1
                elif word == b"shipped":
                    at_cut.update({int(cycle): flushed for cycle in numbers})
                    after = 0
                if len(at_cut) >= cycles and after == 2:  # mid-cycle: flushed, not shipped
                    worker.send_signal(signal.SIGKILL)
                    break
    finally:
        if worker.returncode is None:
            worker.kill()
        await worker.wait()
    return at_cut


async def test_unplanned_failover_after_sigkill_lands_on_recorded_points(
    sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a")
    b = sites.site("site-b")
    async with sites.site("site-a") as a:
        enabled = await vm(a, DISKS, VmSettings(frequency_seconds=30, continuous_points_hours=1))
        vm_name = enabled.name
        async with a.primary(enabled.record) as primary:
            await primary.initial_replication()
    at_cut = await run_primary_until_killed(config_a, vm_name, cycles=5)
    assert len(at_cut) >= 5
    async with b:
        await b.discover()
        async with await b.replica(await b.catalog.vm(vm_name)) as replica:
            await replica.catch_up()

        def replica_digests() -> dict[str, str]:
            return {
                name: sha256_of(b.config.vm_folder(vm_name) / "disks" / f"{name}.img")
                for name in DISKS
            }

        cycles = sorted(at_cut)
        older = cycles[1]
        await failover.promote(b, vm_name, point=str(older), force=True)
        assert replica_digests() == expected_digests(at_cut[older])
        await failover.cancel(b, vm_name)
        async with await b.replica(await b.catalog.vm(vm_name)) as replica:
            await replica.catch_up()
        await failover.promote(b, vm_name, point="latest", force=True)
        assert replica_digests() == expected_digests(at_cut[cycles[-1]])
