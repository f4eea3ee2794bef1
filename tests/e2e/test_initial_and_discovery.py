"""Seeding and discovery end to end: every site is a `vmreplica agent` process, every command the
CLI, the VM's disks written through the primary's NBD export by ``qemu-io``, and ``qemu-img
compare`` the judge.

1. A third site whose agent starts only after the journal's retention deleted the seed (Kafka's
   DeleteRecords, as retention does) discovers the VM on the configs topic and is seeded by its
   primary's agent, unasked, by block compare; it ends identical, and so does the second site.
2. A VM seeded on external media: the replica's agent leaves it alone until `vmreplica initial
   import` (run while that agent runs) has imported the folder `vmreplica initial export` wrote
   at the primary (while its agent ran and the VM wrote); the cycles written meanwhile follow.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.e2e.clients import AgentProcess, cli, run, wait_until
from tests.fixtures import SiteFactory
from vmreplica.config import SiteConfig
from vmreplica.consumers.replica import image_path
from vmreplica.domain.clock import now_ms
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import JournalReader, KafkaConnection
from vmreplica.storage.catalog import Catalog

pytestmark = pytest.mark.e2e

MiB: Final = 1024 * 1024
DISKS: Final = {"disk0": 32 * MiB, "disk1": 8 * MiB}


@pytest.fixture
def site_folder(short_dir: Path) -> Path:
    return short_dir


async def compare(primary: Path, replica: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        str(primary),
        str(replica),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()


def connection(config: SiteConfig) -> KafkaConnection:
    return KafkaConnection(
        config.bootstrap_servers, client_id="test", security=config.client_security()
    )


async def delete_journal(config: SiteConfig, vm: str) -> int:
    """Delete every record of the journal so far, as retention would; the new log start."""
    topic = f"{config.topic_prefix}.{config.trust_group}.{vm}.journal"
    kafka = connection(config)
    async with JournalReader(kafka, topic) as reader:
        end = await reader.end_offset()
    admin = AIOKafkaAdminClient(**kafka.options())
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(end)})
    finally:
        await admin.close()
    return end


def disks_with_data(folder: Path) -> dict[str, Path]:
    disks = {}
    for name, size in DISKS.items():
        path = disks[name] = folder / f"{name}.img"
        with path.open("wb") as image:
            image.truncate(size)
            for offset in range(0, size, 4 * MiB):
                image.seek(offset)
                image.write(os.urandom(MiB))
    return disks


async def enable(config: Path, vm: str, disks: dict[str, Path], *options: str) -> dict[str, str]:
    enabled = json.loads(
        await cli(
            config,
            "enable",
            vm,
            *(f"--disk={name}={path}" for name, path in disks.items()),
            "--capture",
            "nbd",
            "--frequency",
            "continuous",
            *options,
            "--json",
        )
    )
    return {name: enabled["nbd"][name]["unix"] for name in DISKS}


async def caught_up(primary: Catalog, replica: Catalog, vm: str, what: str) -> None:
    """Every write so far is shipped (a heartbeat said nothing waited since now) and applied."""
    asked = now_ms()

    async def shipped_all() -> bool:
        heartbeat = await primary.last_heartbeat(vm)
        return heartbeat is not None and (heartbeat.idle_at_ms or 0) >= asked

    await wait_until(shipped_all, "the primary to ship every write")
    shipped = await primary.position(vm)
    assert shipped is not None

    async def applied() -> bool:
        record = await replica.find_vm(vm)
        position = await replica.position(vm)
        return (
            record is not None
            and record.state is ReplicationState.REPLICATING
            and position is not None
            and (position.epoch, position.cycle) >= (shipped.epoch, shipped.cycle)
        )

    await wait_until(applied, what, 180)


async def stop_all(agents: list[AgentProcess]) -> None:
    for agent in reversed(agents):
        try:
            await agent.stop(check=False)
        finally:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.kill()


async def test_a_site_started_after_the_retention_passed_is_seeded_by_itself(
    tmp_path: Path, sites: SiteFactory, unique: Callable[[str], str]
) -> None:
    vm = unique("vm")
    configs = {
        s: sites.config_file(s, heartbeat_seconds=1.0) for s in ("site-a", "site-b", "site-c")
    }
    disks = disks_with_data(tmp_path)
    uri = await enable(
        configs["site-a"], vm, disks, "--replica-site", "site-b", "--replica-site", "site-c"
    )
    agents = {s: AgentProcess(c, tmp_path / f"{s}.log") for s, c in configs.items()}
    config_c = sites.config("site-c")
    async with (
        Catalog(sites.config("site-a").catalog_path) as a,
        Catalog(sites.config("site-b").catalog_path) as b,
        Catalog(config_c.catalog_path) as c,
    ):
        started = [agents["site-a"], agents["site-b"]]
        try:
            for agent in started:
                agent.start()

            async def seeded() -> bool:
                record = await b.find_vm(vm)
                return record is not None and record.state is ReplicationState.REPLICATING

            await wait_until(seeded, "site B to seed the VM")
            for step in range(6):
                await run(
                    "qemu-io", "-f", "raw", uri["disk0"], "-c", f"write -P {step + 1} {step}M 1M"
                )
                await asyncio.sleep(0.3)
            await caught_up(a, b, vm, "site B to apply every cycle")
            deleted = await delete_journal(sites.config("site-a"), vm)
            assert deleted > 0

            started.append(agents["site-c"])
            agents["site-c"].start()
            await run("qemu-io", "-f", "raw", uri["disk1"], "-c", "write -P 0x77 2M 1M")
            await caught_up(a, c, vm, "site C to discover, be seeded and apply every cycle")
            await caught_up(a, b, vm, "site B to apply every cycle")
            for name, path in disks.items():
                await compare(path, image_path(config_c.vm_folder(vm), name))
                await compare(path, image_path(sites.config("site-b").vm_folder(vm), name))
            log = agents["site-a"].output()
            assert "to site-c" in log, log[-2000:]
        except BaseException:
            await stop_all(started)
            raise
        for agent in reversed(started):
            await agent.stop(check=True)


async def test_a_seed_on_external_media_is_imported_while_both_agents_run(
    tmp_path: Path, sites: SiteFactory, unique: Callable[[str], str]
) -> None:
    vm = unique("vm")
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    config_b = sites.config_file("site-b", heartbeat_seconds=1.0)
    disks = disks_with_data(tmp_path)
    uri = await enable(config_a, vm, disks, "--replica-site", "site-b", "--initial", "export")
    agents = [
        AgentProcess(config_a, tmp_path / "a.log"),
        AgentProcess(config_b, tmp_path / "b.log"),
    ]
    replica = sites.config("site-b")
    media = tmp_path / "media"
    async with (
        Catalog(sites.config("site-a").catalog_path) as a,
        Catalog(replica.catalog_path) as b,
    ):
        try:
            for agent in agents:
                agent.start()

            async def primary_replicating() -> bool:
                return (await a.vm(vm)).state is ReplicationState.REPLICATING

            await wait_until(primary_replicating, "site A to start the VM's initial replication")
            await run("qemu-io", "-f", "raw", uri["disk0"], "-c", "write -P 0x21 0 2M")
            exported = json.loads(
                await cli(config_a, "initial", "export", vm, str(media), "--json")
            )
            assert exported["media_bytes"] > 0
            await run("qemu-io", "-f", "raw", uri["disk0"], "-c", "write -P 0x22 1M 2M")

            async def waiting() -> bool:
                record = await b.find_vm(vm)
                return record is not None and "initial import" in record.state_message

            await wait_until(waiting, "site B to adopt the VM and wait for its import")
            assert await b.position(vm) is None  # its agent applied nothing meanwhile
            imported = json.loads(
                await cli(config_b, "initial", "import", vm, str(media), "--json")
            )
            assert imported["cycle"] == exported["cycle"]
            await caught_up(a, b, vm, "site B to apply the cycles written since the export")
            for name, path in disks.items():
                await compare(path, image_path(replica.vm_folder(vm), name))
        except BaseException:
            await stop_all(agents)
            raise
        for agent in reversed(agents):
            await agent.stop(check=True)
