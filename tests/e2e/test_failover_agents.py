"""Failover through the CLI with real agents: test failover served over NBD while replication
goes on, then a planned failover with --reverse carried out by the agents of both sites.

Site A's agent runs in this process (so the test can write through the capture API); site B's
agent is a `vmreplica agent` process. The CLI commands run as processes, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.clients import cli
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent
from vmreplica.storage.image import sha256_of

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy"),
]
MiB = 1024 * 1024
HEARTBEAT_SECONDS = 1.0


async def wait_for(condition: Callable[[], object], limit_seconds: float = 60.0) -> None:
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        if await condition():  # type: ignore[misc]
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("condition not met in time")


async def copy_export(uri: str, target: Path) -> str:
    process = await asyncio.create_subprocess_exec("nbdcopy", uri, str(target))
    assert await process.wait() == 0
    return sha256_of(target)


async def test_test_failover_then_planned_failover_with_agents(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a", heartbeat_seconds=HEARTBEAT_SECONDS)
    config_b = sites.config_file("site-b", heartbeat_seconds=HEARTBEAT_SECONDS)
    env = {**os.environ, "VMREPLICA_CONFIG": str(config_b)}
    with (tmp_path / "agent-b.log").open("wb") as log:
        agent_b = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vmreplica.cli",
            "agent",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with (
            sites.site("site-a", heartbeat_seconds=HEARTBEAT_SECONDS) as site_a,
            sites.site("site-b", heartbeat_seconds=HEARTBEAT_SECONDS) as site_b,
        ):
            enabled = await vm(
                site_a,
                {"disk0": 16 * MiB},
                VmSettings(frequency_seconds=30, continuous_points_hours=1),
            )
            vm_name, disk = enabled.name, enabled.disks["disk0"]
            agent_a = Agent(site_a)
            running = asyncio.create_task(agent_a.run())
            primary = await agent_a.primary(vm_name)
            digests: dict[int, str] = {}
            for i in range(3):
                await primary.capture.write("disk0", i * MiB, os.urandom(MiB))
                for cycle in await primary.replicate():
                    digests[cycle.cycle] = sha256_of(disk)

            async def applied(cycle: int) -> bool:
                position = (
                    await site_b.catalog.position(vm_name)
                    if await site_b.catalog.find_vm(vm_name)
                    else None
                )
                return position is not None and position.cycle >= cycle

            await wait_for(lambda: applied(max(digests)))
            point = sorted(digests)[1]
            started = json.loads(
                await cli(config_b, "failover", "test", vm_name, "--point", str(point), "--json")
            )
            assert started["vm"] == f"{vm_name} - Test"
            assert await copy_export(started["uris"][0], tmp_path / "t1.raw") == digests[point]
            # Replication goes on underneath; the test VM stays at its point.
            await primary.capture.write("disk0", 0, os.urandom(MiB))
            later = (await primary.replicate())[-1].cycle
            digests[later] = sha256_of(disk)
            await wait_for(lambda: applied(later))
            assert await copy_export(started["uris"][0], tmp_path / "t2.raw") == digests[point]
            await cli(config_b, "failover", "stop-test", vm_name)

            # Planned failover from A, with reverse: the agents do the rest.
            await cli(config_a, "failover", "planned", vm_name, "--reverse")

            async def swapped() -> bool:
                a = await site_a.catalog.vm(vm_name)
                b = await site_b.catalog.vm(vm_name)
                return a.role == "replica" and b.role == "primary"

            await wait_for(swapped)
            replica_disk = Path((await site_b.catalog.vm(vm_name)).disks[0].path)
            assert sha256_of(replica_disk) == sha256_of(disk)
            status = json.loads(await cli(config_b, "status", vm_name, "--json"))
            assert status[0]["role"] == "primary"
            agent_a.stop()
            await running
    finally:
        agent_b.terminate()
        await asyncio.wait_for(agent_b.wait(), 30)
