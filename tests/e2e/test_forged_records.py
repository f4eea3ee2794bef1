"""A verifying replica site refuses what no trusted key signed, with real agents and Kafka.

Site B lists site A's key in an authorization entry (through the CLI, as an operator would), so
its agent — a `vmreplica agent` process — verifies every journal record. Site A's agent runs in
this process. Two VMs replicate and apply a signed cycle each; then a forger with its own Ed25519
key (and its own transactional id, so nobody is fenced) writes:

* into ``prep``'s journal, a ``FailoverPrepared`` with the right epoch, cycle and hash, naming
  site B as the target: without signatures this promotes B and fences A;
* into ``cycle``'s journal, a whole cycle that chains correctly to the last one;
* a new VM's journal whose ``VmConfig`` names disks ``../../x`` and ``/abs/x``, signed too.

Each VM of B ends in the error state with a message naming the record's offset and why; no byte of
B's images changes, no role changes at either site, the forged VM is not adopted and no file
appears outside B's storage; the agent logs no traceback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.clients import cli, wait_until
from tests.fixtures import SiteFactory, VmFactory
from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import (
    Compression,
    DiskSize,
    EpochStart,
    FailoverPrepared,
    SeedChunk,
    VmConfig,
)
from vmreplica.security.signing import SiteKey, load_site_key
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


async def _forge(site: Site, vm: str, records: list[bytes]) -> list[int]:
    async with JournalPublisher(site.connection, f"forger-{uuid.uuid4().hex}") as forger:
        return await forger.publish(site.journal_topic(vm), vm.encode(), records)


async def _replica_state(site_b: Site, vm: str) -> tuple[object, ...]:
    record = await site_b.catalog.vm(vm)
    return (
        record.role,
        await site_b.catalog.position(vm),
        [p.cycle for p in await site_b.catalog.points(vm)],
        {d.name: sha256_of(Path(d.path)) for d in record.disks},
    )


async def _refused(site_b: Site, vm: str, offset: int) -> str:
    async def stopped() -> bool:
        return (await site_b.catalog.vm(vm)).state is ReplicationState.ERROR

    await wait_until(stopped, f"site B to refuse the forged record of {vm}", 60)
    message = (await site_b.catalog.vm(vm)).state_message
    assert message.startswith(f"VM {vm!r}, journal offset {offset}: refused an untrusted record")
    return message


def _check_nothing_written(folder: Path, storage: Path, evil: str) -> None:
    """No file of the forged VM: not where its disk names point, not in the storage."""
    assert not Path("/abs/x").exists()
    assert not (folder / "x").exists()
    assert not (folder.parent / "x").exists()
    assert not list(storage.rglob("*x*"))
    assert not (storage / evil).exists()


async def test_forged_records_change_no_byte_and_no_role(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    config_b = sites.config_file("site-b", heartbeat_seconds=1.0)
    storage = tmp_path / "replicas"
    key_a = (await cli(config_a, "key", "show")).strip()
    await cli(config_b, "authorization", "add", "--primary", "site-a", "--storage", str(storage),
              "--key", key_a)  # fmt: skip
    forger: SiteKey = load_site_key(tmp_path / "forger")
    log_path = tmp_path / "agent-b.log"
    env = {**os.environ, "VMREPLICA_CONFIG": str(config_b)}
    with log_path.open("wb") as log:
        agent_b = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmreplica.cli", "agent", env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with (
            sites.site("site-a", heartbeat_seconds=1.0) as site_a,
            sites.site("site-b") as site_b,
        ):
            agent_a = Agent(site_a)
            running = asyncio.create_task(agent_a.run())
            names = {}
            for role in ("prep", "cycle"):
                enabled = await vm(site_a, {"disk0": 4 * MiB}, VmSettings(frequency_seconds=30))
                names[role] = enabled.name
                primary = await agent_a.primary(enabled.name)
                await primary.capture.write("disk0", MiB, os.urandom(MiB))
                await primary.replicate()  # the agent may have shipped it already
                shipped_at = await site_a.catalog.position(enabled.name)
                assert shipped_at is not None
                shipped = shipped_at.cycle

                async def applied(name: str = enabled.name, cycle: int = shipped) -> bool:
                    if await site_b.catalog.find_vm(name) is None:
                        return False
                    position = await site_b.catalog.position(name)
                    return position is not None and position.cycle >= cycle

                await wait_until(applied, f"site B to apply {enabled.name}")
            for name in names.values():  # signed and applied, into the entry's storage
                record = await site_b.catalog.vm(name)
                assert storage / name in Path(record.disks[0].path).parents
            before = {name: await _replica_state(site_b, name) for name in names.values()}

            prep = names["prep"]
            position = await site_b.catalog.position(prep)
            assert position is not None
            prepared = FailoverPrepared(
                prep, position.epoch, position.cycle, position.cycle_hash, 1, "site-a",
                target="site-b",
            )  # fmt: skip
            (offset,) = await _forge(site_a, prep, [forger.encode(prepared)])
            message = await _refused(site_b, prep, offset)
            assert "FailoverPrepared is signed by key" in message

            name = names["cycle"]
            position = await site_b.catalog.position(name)
            assert position is not None
            batch = write_batch(
                name, position.epoch, position.cycle + 1, 0, [Change("disk0", 0, b"x" * 4096)]
            )
            commit = cycle_commit(
                name, position.epoch, position.cycle + 1, [batch], position.cycle_hash,
                {"disk0": 4 * MiB},
            )  # fmt: skip
            offsets = await _forge(site_a, name, [forger.encode(batch), forger.encode(commit)])
            message = await _refused(site_b, name, offsets[0])
            assert "WriteBatch is signed by key" in message

            evil = f"evil-{uuid.uuid4().hex[:8]}"
            await site_a.ensure_topics(evil)
            bad_disks = (DiskSize("../../x", MiB), DiskSize("/abs/x", MiB))
            await _forge(
                site_a,
                evil,
                [
                    forger.encode(EpochStart(evil, 1, 0, "site-a", 1, "seed", 1, GENESIS_HASH)),
                    forger.encode(VmConfig(evil, 1, bad_disks, 30, 0, None, "site-a", 1)),
                    forger.encode(
                        SeedChunk(evil, 1, "", 0, 0, Compression.NONE, b"", 0, "s", True)
                    ),
                ],
            )
            await asyncio.sleep(6)  # the agent discovers every few seconds

            for name in names.values():
                assert await _replica_state(site_b, name) == before[name]
                assert (await site_a.catalog.vm(name)).role == "primary"
            assert await site_b.catalog.find_vm(evil) is None
            _check_nothing_written(tmp_path, storage, evil)
            agent_a.stop()
            await running
    finally:
        agent_b.terminate()
        await asyncio.wait_for(agent_b.wait(), 30)
    assert "Traceback" not in log_path.read_text()
