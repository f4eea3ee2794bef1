"""A replica agent SIGKILLed at any instant of an apply loses nothing and corrupts nothing.

The primary (this process, Python API) ships many cycles of a few MiB over two 16 MiB disks and
records its sha256 of each disk at every cycle. The replica is a real ``vmreplica agent`` process.
Over and over it is started, left to apply for a random 0-0.7 s once it is applying, and killed
with SIGKILL. After every kill, a read-only look at the replica proves the invariant the design
promises: the catalog's applied cycle C, the images and the undo log together equal the
primary's disks at cycle C —

- with no sealed undo log of cycle C+1, the images themselves hash like the primary at C;
- with one (a kill between the first write of cycle C+1's undo log and recording the position),
  rolling that undo log back onto copies of the images — all of it when sealed, its durable
  records when the kill cut it short — gives the primary's digests at C.

The images are left as the kill left them, so the next agent start has to run its own recovery.
Finally the agent runs to the end and the replica must equal the primary's final digests.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.config import SiteConfig
from vmreplica.consumers.replica import image_path
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.producers.primary import PrimaryVm
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage, sha256_of, sparse_copy

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISK_BYTES: Final = 16 * MiB
DISKS: Final = ("disk0", "disk1")
TRIALS: Final = 32
BACKLOG_CYCLES: Final = 24
"""Cycles kept ahead of the replica, so a kill always lands while it is applying."""
KILL_WINDOW_SECONDS: Final = 0.7
VM: Final = "vm-crash"

Digests = dict[str, str]


async def _ship_cycles(
    primary: PrimaryVm,
    rng: random.Random,
    count: int,
    digests: dict[int, Digests],
    disks: dict[str, Path],
) -> None:
    """Ship ``count`` cycles of about 2 MiB each (writes, overwrites, zeros, trims)."""
    capture = primary.capture
    for _ in range(count):
        for _ in range(rng.randint(4, 12)):
            disk = rng.choice(DISKS)
            length = rng.choice([4 * KiB, 64 * KiB, 256 * KiB, 512 * KiB])
            offset = rng.randrange(0, DISK_BYTES - length + 1, 4 * KiB)
            roll = rng.random()
            if roll < 0.75:
                await capture.write(disk, offset, rng.randbytes(length))
            elif roll < 0.9:
                await capture.zero(disk, offset, length)
            else:
                await capture.trim(disk, offset, length)
        await capture.write(rng.choice(DISKS), DISK_BYTES - 4 * KiB, rng.randbytes(4 * KiB))
        for shipped in await primary.replicate():
            digests[shipped.cycle] = {name: sha256_of(path) for name, path in disks.items()}


def _applied_undo_cycles(undo: Path) -> list[int]:
    return sorted(int(p.name.removesuffix(".hru")) for p in undo.glob("*.hru"))


async def _wait_until_applying(
    undo: Path, after: int, agent: subprocess.Popen[bytes], timeout_seconds: float = 60.0
) -> None:
    """Return once the agent writes an undo log for a cycle past ``after`` (apply step 2)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited with status {agent.returncode}")
        if any(cycle > after for cycle in _applied_undo_cycles(undo)):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(
        f"the agent did not start applying a cycle after {after} within {timeout_seconds} s"
    )


async def _check_after_kill(
    config: SiteConfig, digests: dict[int, Digests], scratch: Path
) -> tuple[int, str]:
    """The read-only check of the module docstring; returns (applied cycle, undo status)."""
    folder = config.vm_folder(VM)
    async with Catalog(config.catalog_path) as catalog:
        record = await catalog.vm(VM)
        position = await catalog.position(VM)
    assert record.state is ReplicationState.REPLICATING, record.state_message
    assert position is not None
    undo = UndoLog(folder / "undo")
    in_flight = position.cycle + 1
    status = undo.status(in_flight)
    assert [c for c in _applied_undo_cycles(folder / "undo") if c > in_flight] == []
    if status != "missing":
        copies = {}
        for name in DISKS:
            with DiskImage.open(image_path(folder, name), writable=False) as head:
                sparse_copy(head, scratch / f"{name}.img")
            copies[name] = DiskImage.open(scratch / f"{name}.img")
        try:
            undo.rollback(copies, in_flight)
            got = {name: sha256_of(image) for name, image in copies.items()}
        finally:
            for image in copies.values():
                image.close()
    else:
        got = {name: sha256_of(image_path(folder, name)) for name in DISKS}
    assert got == digests[position.cycle], (
        f"after a kill the replica (applied cycle {position.cycle}, undo log of cycle "
        f"{in_flight} {status}) differs from the primary at cycle {position.cycle}"
    )
    return position.cycle, status


def _start_agent(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vmreplica.cli", "agent", "--log-level", "WARNING"],
            env={**os.environ, "VMREPLICA_CONFIG": str(config_file)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_replica_agent_survives_sigkill_at_random_instants(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    """32 SIGKILLs during apply; after each, images + undo + catalog equal a primary cycle."""
    rng = random.Random(int.from_bytes(os.urandom(8)))
    seed = rng.getrandbits(32)
    rng.seed(seed)
    replica_config = sites.config("site-b", heartbeat_seconds=1.0)
    config_file = sites.config_file("site-b", heartbeat_seconds=1.0)
    undo = replica_config.vm_folder(VM) / "undo"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    log = tmp_path / "agent.log"
    digests: dict[int, Digests] = {}
    outcomes: Counter[str] = Counter()
    async with sites.site("site-a") as site_a:
        enabled = await vm(
            site_a,
            dict.fromkeys(DISKS, DISK_BYTES),
            VmSettings(frequency_seconds=30),
            name=VM,
            create_images=False,
        )
        disks, record = enabled.disks, enabled.record
        async with site_a.primary(record) as primary:
            for name in DISKS:
                await primary.capture.write(name, 0, rng.randbytes(MiB))
            await primary.initial_replication()
            # The seed ships the writes made during it as a cycle of its own: the replica may
            # be killed at that one too.
            seeded = await site_a.catalog.position(VM)
            assert seeded is not None
            digests[seeded.cycle] = {name: sha256_of(path) for name, path in disks.items()}
            await _ship_cycles(primary, rng, BACKLOG_CYCLES, digests, disks)
            applied = 0
            for trial in range(TRIALS):
                last = max(digests)
                if last - applied < BACKLOG_CYCLES:
                    await _ship_cycles(primary, rng, BACKLOG_CYCLES, digests, disks)
                agent = _start_agent(config_file, log)
                try:
                    # The previous kill may have left the undo log of cycle applied + 1:
                    # wait for the next one, which only this agent can have started.
                    await _wait_until_applying(undo, applied + 1, agent)
                    await asyncio.sleep(rng.uniform(0, KILL_WINDOW_SECONDS))
                finally:
                    agent.kill()  # SIGKILL
                    agent.wait()
                assert agent.returncode == -signal.SIGKILL, f"trial {trial} (seed {seed})"
                cycle, status = await _check_after_kill(replica_config, digests, scratch)
                assert cycle >= applied, f"trial {trial}: applied position went backwards"
                applied = cycle
                outcomes[status] += 1
            final = max(digests)

    # Let it run to the end: the replica equals the primary's final state.
    agent = _start_agent(config_file, log)
    try:
        deadline = time.monotonic() + 120
        async with Catalog(replica_config.catalog_path) as catalog:
            while True:
                position = await catalog.position(VM)
                # The agent records its pid once its stop handlers are in place; a SIGTERM
                # before that, while Python still imports, ends it as any daemon: -15.
                async with catalog.db.execute("SELECT pid FROM agent") as cursor:
                    running = (agent.pid,) in [tuple(row) for row in await cursor.fetchall()]
                if position is not None and position.cycle == final and running:
                    break
                assert time.monotonic() < deadline, f"replica stuck at {position}"
                assert agent.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    assert agent.returncode == 0, log.read_text()[-3000:]
    folder = replica_config.vm_folder(VM)
    assert {name: sha256_of(image_path(folder, name)) for name in DISKS} == digests[final]
    async with Catalog(replica_config.catalog_path) as catalog:
        assert (await catalog.vm(VM)).state is ReplicationState.REPLICATING
        assert [p.cycle for p in await catalog.points(VM)] == [final]
    assert sum(outcomes.values()) == TRIALS
    print(f"seed {seed}: kills left the undo log of the in-flight cycle {dict(outcomes)}")
