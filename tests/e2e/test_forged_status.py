"""A verifying primary refuses status records no trusted key signed, with real agents and Kafka.

The session's secured broker serves the module (TLS, SCRAM, ACLs). Each site lists the other's
key (through the CLI, as an operator would), so site A's agent — a `vmreplica agent` process —
checks every status record site B reports. The forger is an insider with site A's Kafka login
(the ACLs let nobody else write the topic) and a key of its own. It writes:

* a ``ReplicaPosition`` saying site B needs a resynchronization, and an unsigned whole-VM
  ``ResyncRequest``: believed, they make A start a resync by itself;
* while a resync waits for B's block digests (B's agent is stopped, its image corrupted behind
  its back), a complete set of ``DigestMap`` records equal to A's own digests at the shipped
  cycle: believed, A finds nothing to send and calls the corrupted replica repaired.

A refuses each (an event 4001 naming the record's offset, a warning in its log), stays
replicating, waits for the genuine digests, and once B's agent is back repairs exactly the
corrupted block: the images end identical.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.clients import AgentProcess, cli, wait_until
from tests.fixtures import SiteFactory
from vmreplica.consumers.replica import image_path
from vmreplica.domain.clock import now_ms
from vmreplica.domain.events import EventId
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import StatusPublisher
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import DigestMap, ReplicaPosition, ResyncRequest, StatusEvent
from vmreplica.security.signing import SiteKey, load_site_key
from vmreplica.storage import history
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.digests import digest_block_bytes, image_digests
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.e2e
MiB: Final = 1024 * 1024
DISK_BYTES: Final = 16 * MiB


@pytest.fixture
def broker_security() -> str:
    return "secured"


async def _forge(site: Site, vm: str, records: list[bytes]) -> list[int]:
    """Publish ``records`` on ``vm``'s status topic with ``site``'s Kafka login."""
    publisher = StatusPublisher(site.connection)
    await publisher.start()
    try:
        return [await publisher.publish(site.status_topic(vm), vm.encode(), r) for r in records]
    finally:
        await publisher.stop()


async def _refused(catalog: Catalog, vm: str, offsets: list[int]) -> list[str]:
    """Wait for an event 4001 naming each of ``offsets``; their messages."""

    async def logged() -> list[str]:
        return [
            event.message
            for event in await history.events(catalog, vm)
            if event.event_id == EventId.UNTRUSTED_STATUS_REFUSED
        ]

    async def all_refused() -> bool:
        said = await logged()
        return all(any(f"status offset {o}: refused" in m for m in said) for o in offsets)

    await wait_until(all_refused, f"site A to refuse the forged status records {offsets}", 60)
    return await logged()


async def _resync(config: Path, vm: str) -> dict[str, object]:
    [status] = json.loads(await cli(config, "status", vm, "--json"))
    resync: dict[str, object] = status.get("resync") or {}
    return resync


async def test_forged_status_records_are_refused_and_never_acted_on(
    tmp_path: Path, sites: SiteFactory, unique: Callable[[str], str]
) -> None:
    vm = unique("vm")
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    config_b = sites.config_file("site-b", heartbeat_seconds=1.0)
    key_a = (await cli(config_a, "key", "show")).strip()
    key_b = (await cli(config_b, "key", "show")).strip()
    await cli(config_a, "authorization", "add", "--primary", "site-b", "--storage",
              str(tmp_path / "replicas-a"), "--key", key_b)  # fmt: skip
    await cli(config_b, "authorization", "add", "--primary", "site-a", "--storage",
              str(tmp_path / "replicas-b"), "--key", key_a)  # fmt: skip
    disk = tmp_path / "disk0.img"
    with disk.open("wb") as image:
        image.truncate(DISK_BYTES)
        for offset in range(0, DISK_BYTES, 4 * MiB):
            image.seek(offset)
            image.write(os.urandom(MiB))
    await cli(config_a, "enable", vm, f"--disk=disk0={disk}", "--replica-site", "site-b",
              "--frequency", "30")  # fmt: skip
    replica = image_path(tmp_path / "replicas-b" / vm, "disk0")
    forger: SiteKey = load_site_key(tmp_path / "forger")
    agent_a = AgentProcess(config_a, tmp_path / "agent-a.log")
    agent_b = AgentProcess(config_b, tmp_path / "agent-b.log")
    agent_a.start()
    agent_b.start()
    try:
        async with (
            sites.site("site-a") as site_a,
            Catalog(sites.config("site-b").catalog_path) as catalog_b,
        ):

            async def seeded() -> bool:
                found = await catalog_b.find_vm(vm)
                return found is not None and found.state is ReplicationState.REPLICATING

            await wait_until(seeded, "site B to seed the VM")
            assert sha256_of(replica) == sha256_of(disk)

            # 1. A forged position and resync request: A starts no resync.
            shipped = await site_a.catalog.position(vm)
            assert shipped is not None
            needs_resync = ReplicationState.RESYNCHRONIZATION_REQUIRED.value
            position = ReplicaPosition(
                vm, shipped.epoch, "site-b", shipped.cycle, 0, needs_resync, "critical", now_ms(),
                now_ms(),
            )  # fmt: skip
            request = ResyncRequest(vm, shipped.epoch, "site-b", "forged", None, (), now_ms())
            offsets = await _forge(site_a, vm, [forger.encode(position), encode(request)])
            said = await _refused(site_a.catalog, vm, offsets)
            assert any("ReplicaPosition is signed by key" in m for m in said)
            assert any("ResyncRequest is not signed" in m for m in said)
            await asyncio.sleep(6)  # the agent looks for replicas needing a resync every 5 s
            assert (await site_a.catalog.vm(vm)).state is ReplicationState.REPLICATING
            assert await _resync(config_a, vm) == {}

            # 2. A resync that waits for B's digests is offered forged ones: it keeps waiting.
            await agent_b.stop(check=True)
            with replica.open("r+b") as corrupted:
                corrupted.seek(5 * MiB)
                corrupted.write(os.urandom(4096))
            assert sha256_of(replica) != sha256_of(disk)
            await cli(config_a, "resync", vm)

            async def waiting() -> bool:
                return (await _resync(config_a, vm)).get("phase") == "awaiting digests"

            await wait_until(waiting, "the resync to ask site B for its digests")
            block = digest_block_bytes(DISK_BYTES)
            digests = DigestMap(vm, shipped.epoch, "site-b", "disk0", shipped.cycle, block,
                                image_digests(disk, block))  # fmt: skip
            position = ReplicaPosition(
                vm, shipped.epoch, "site-b", shipped.cycle, shipped.next_offset - 1,
                "replicating", "normal", now_ms(), now_ms(),
            )  # fmt: skip
            genuine_looking: list[StatusEvent] = [position, digests]
            offsets = await _forge(site_a, vm, [forger.encode(e) for e in genuine_looking])
            said = await _refused(site_a.catalog, vm, offsets)
            assert any("DigestMap is signed by key" in m for m in said)
            await asyncio.sleep(2)
            assert (await _resync(config_a, vm)).get("phase") == "awaiting digests"

            agent_b.start()

            async def finished() -> bool:
                return (await _resync(config_a, vm)).get("phase") == "done"

            await wait_until(finished, "the resync to finish with site B's own digests")
            done = await _resync(config_a, vm)
            assert done["differing_bytes"] == block  # the corrupted block, found by B's digests

            async def repaired() -> bool:
                return sha256_of(replica) == sha256_of(disk)

            await wait_until(repaired, "site B to apply the resync")
    finally:
        for agent in (agent_b, agent_a):
            await agent.stop(check=False)
    for agent in (agent_a, agent_b):
        agent.assert_no_traceback()
    assert "refused an untrusted record: DigestMap" in agent_a.output()
