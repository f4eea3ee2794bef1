"""A cycle bigger than the replica agent may hold in memory is applied in bounded memory.

A real ``vmreplica agent`` process applies one 512 MiB cycle (zstd-friendly data, so the test
costs seconds: the agent still decompresses, checks and writes every byte); its peak RSS must
stay under 300 MiB, where gathering the cycle before applying it needs more than 512 MiB. The
2 GiB measurement is ``benchmarks/apply_memory.py``.

A replica agent SIGKILLed while such a cycle is being written (after some of its flushes, before
its commit) leaves images whose content, with the cycle's unsealed undo log rolled back, is the
last applied cycle's; the next agent rolls it back itself and applies the cycle whole.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.clients import AgentProcess
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.config import SiteConfig
from vmreplica.consumers.replica import image_path
from vmreplica.consumers.undo import UndoLog
from vmreplica.devtools.big_cycle import big_cycle
from vmreplica.domain.model import VmSettings
from vmreplica.producers.primary import PrimaryVm
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage, sha256_of, sparse_copy

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MiB: Final = 1024 * 1024
CYCLE_BYTES: Final = 512 * MiB
PEAK_RSS_LIMIT_BYTES: Final = 300 * MiB


async def test_a_512_mib_cycle_is_applied_with_the_agent_under_300_mib(
    tmp_path: Path, sites: SiteFactory
) -> None:
    result = await big_cycle(
        tmp_path, sites.bootstrap_servers, sites.trust_group, CYCLE_BYTES, compressible=True
    )
    print(
        f"512 MiB cycle: agent peak RSS {result.peak_rss_bytes // MiB} MiB "
        f"({result.rss_before_bytes // MiB} MiB before it), applied in "
        f"{result.applied_seconds:.1f} s"
    )
    assert result.identical, "the replica image differs from the primary's disk"
    assert result.peak_rss_bytes < PEAK_RSS_LIMIT_BYTES, result


TRIALS: Final = 8
HALF_WRITTEN_WANTED: Final = 3
KILL_WINDOW_SECONDS: Final = 0.25
BIG_DISK_BYTES: Final = 160 * MiB
"""Five times the 32 MiB a replica holds: each cycle over it is written in five flushes."""


def _pattern(rng: random.Random) -> bytes:
    """A MiB zstd packs well (the test costs seconds) but no two MiB alike."""
    return rng.randbytes(64 * 1024) * 16


async def _write_disk(primary: PrimaryVm, rng: random.Random) -> None:
    for offset in range(0, BIG_DISK_BYTES, MiB):
        await primary.capture.write("disk0", offset, _pattern(rng))


def _start_agent(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    agent = AgentProcess(config_file, log)
    agent.start()
    assert agent.process is not None
    return agent.process


async def _applied(config: SiteConfig) -> int:
    if not config.catalog_path.exists():
        return -1
    async with Catalog(config.catalog_path) as catalog:
        if await catalog.find_vm(KILLED_VM) is None:
            return -1
        position = await catalog.position(KILLED_VM)
    return -1 if position is None else position.cycle


async def _wait(
    what: str, check: Callable[[], Awaitable[bool]], agent: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 180
    while not await check():
        assert agent.poll() is None, f"the agent exited ({agent.returncode}) waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


KILLED_VM: Final = "vm-big-kill"


async def test_a_replica_agent_killed_half_way_through_a_big_cycle_rolls_it_back(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    """SIGKILL while a cycle five times the held bound is being written: the images plus the
    cycle's (unsealed) undo log always equal the last applied cycle, and the next agent ends
    equal to the primary."""
    rng = random.Random(int.from_bytes(os.urandom(8)))
    config = sites.config("site-b")
    config_file = sites.config_file("site-b")
    folder = config.vm_folder(KILLED_VM)
    log = tmp_path / "agent.log"
    outcomes: list[str] = []
    async with sites.site("site-a") as site_a:
        enabled = await vm(
            site_a, {"disk0": BIG_DISK_BYTES}, VmSettings(frequency_seconds=30), name=KILLED_VM
        )
        disk = enabled.disks["disk0"]
        async with site_a.primary(enabled.record) as primary:
            await _write_disk(primary, rng)
            await primary.initial_replication()
            seeded = await site_a.catalog.position(KILLED_VM)
            assert seeded is not None
            before = sha256_of(disk)
            agent = _start_agent(config_file, log)
            try:

                async def seeded_at_b() -> bool:
                    return await _applied(config) >= seeded.cycle

                await _wait("the seed at site B", seeded_at_b, agent)
            finally:
                agent.kill()
                agent.wait()
            await _write_disk(primary, rng)  # every byte again: one big cycle
            [shipped] = await primary.replicate()
            after = sha256_of(disk)
    undo = UndoLog(folder / "undo")
    scratch = tmp_path / "scratch.img"
    for _ in range(TRIALS):
        agent = _start_agent(config_file, log)
        try:

            async def writing() -> bool:
                # Past its undo log's header: the first flush is synced, its writes follow.
                try:
                    size = undo.path_of(shipped.cycle).stat().st_size
                except FileNotFoundError:
                    return False
                return undo.status(shipped.cycle) == "incomplete" and size > 4096

            await _wait(f"cycle {shipped.cycle} to be written", writing, agent)
            await asyncio.sleep(rng.uniform(0, KILL_WINDOW_SECONDS))
        finally:
            agent.kill()
            agent.wait()
        applied = await _applied(config)
        if applied == shipped.cycle:
            outcomes.append("applied")
            break
        assert applied == seeded.cycle
        head = image_path(folder, "disk0")
        written = sha256_of(head) != before
        with DiskImage.open(head, writable=False) as image:
            sparse_copy(image, scratch)
        with DiskImage.open(scratch) as copy:
            undo.rollback({"disk0": copy}, shipped.cycle)
        assert sha256_of(scratch) == before, "images + undo log differ from the applied cycle"
        outcomes.append("half written" if written else "not yet written")
        if outcomes.count("half written") == HALF_WRITTEN_WANTED:
            break
    assert "half written" in outcomes, outcomes  # the kills did land inside the cycle
    agent = _start_agent(config_file, log)
    try:

        async def done() -> bool:
            return await _applied(config) >= shipped.cycle

        await _wait("the big cycle to be applied", done, agent)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    assert sha256_of(image_path(folder, "disk0")) == after
    print(f"kills inside a {BIG_DISK_BYTES // MiB} MiB cycle: {outcomes}")
