"""`vmreplica initial stop` and `initial start` (Stop-/Start-VMInitialReplication) with real
agents on a real broker.

A two-disk seed is cut short after its first disk (as a stopped or killed seed is); `initial
stop` leaves the VM *ready for initial replication* and the primary's agent, started then,
neither seeds nor ships while held; `initial start` lets it go on, and the seed resumes with the
second disk only — the replica ends equal to the primary, the first disk not sent twice.

Site A's agent runs in this process; site B's agent is a `vmreplica agent` process; the
commands run as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.clients import AgentProcess, cli, wait_until
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site
from vmreplica.storage.image import sha256_of

pytestmark = [pytest.mark.e2e]
MiB = 1024 * 1024
DISK_BYTES = 16 * MiB


class SeedCutShort(Exception):
    """Raised from the seed's progress callback once the second disk is under way."""


async def test_stopped_seed_waits_then_resumes_where_it_stopped(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    config_b = sites.config_file("site-b", heartbeat_seconds=1.0)
    agent_b = AgentProcess(config_b, tmp_path / "agent-b.log")
    agent_b.start()
    try:
        async with (
            sites.site("site-a", heartbeat_seconds=1.0) as site_a,
            sites.site("site-b", heartbeat_seconds=1.0) as site_b,
            contextlib.AsyncExitStack() as stack,
        ):
            enabled = await vm(
                site_a,
                {"disk0": DISK_BYTES, "disk1": DISK_BYTES},
                VmSettings(frequency_seconds=30),
            )
            name = enabled.name
            for image in enabled.disks.values():
                image.write_bytes(os.urandom(DISK_BYTES))

            def cut_short(examined: int, total: int) -> None:
                if examined > DISK_BYTES:  # in the second disk
                    raise SeedCutShort

            record = await site_a.catalog.vm(name)
            with pytest.raises(SeedCutShort):
                async with site_a.primary(record) as primary:
                    await primary.initial_replication(cut_short)
            assert (await site_a.catalog.vm(name)).state is (
                ReplicationState.INITIAL_REPLICATION_IN_PROGRESS
            )
            progress = await site_a.catalog.seed_progress(name)
            assert progress["disk0"] == DISK_BYTES
            assert progress["disk1"] < DISK_BYTES

            stopped = await cli(config_a, "initial", "stop", name)
            assert "stopped with 16777216 of 33554432 bytes examined" in stopped
            assert "already stopped" in await cli(config_a, "initial", "stop", name)
            (status,) = json.loads(await cli(config_a, "status", name, "--json"))
            assert status["state"] == "ready for initial replication"

            agent_a = Agent(site_a)
            running = asyncio.create_task(agent_a.run())
            stack.push_async_callback(_stopped, agent_a, running)
            await agent_a.primary(name, 60)  # its worker runs, held
            await asyncio.sleep(4.0)
            assert (await site_a.catalog.vm(name)).state is (
                ReplicationState.READY_FOR_INITIAL_REPLICATION
            )
            assert await site_a.catalog.seed_progress(name) == progress

            started = await cli(config_a, "initial", "start", name)
            assert "goes on where it stopped" in started

            async def replicating(site: Site) -> bool:
                found = await site.catalog.find_vm(name)
                return found is not None and found.state is ReplicationState.REPLICATING

            waited = await cli(config_a, "initial", "wait", name)  # follows the seed to its end
            assert f"VM {name}: initial replication done, replicating" in waited
            assert await replicating(site_a)
            await wait_until(lambda: replicating(site_b), "the seed at B to be applied", 60)
            (measured,) = json.loads(await cli(config_a, "measure", name, "--json"))
            assert 0 < measured["initial_replication_bytes"] < 1.5 * DISK_BYTES  # disk1 only
            replica = await site_b.catalog.vm(name)
            for disk in replica.disks:
                assert sha256_of(Path(disk.path)) == sha256_of(enabled.disks[disk.name])
            code = await _exit_code(config_a, "initial", "stop", name)
            assert code == 1  # over: nothing to stop
    finally:
        await agent_b.stop()
    agent_b.assert_no_traceback()


async def _exit_code(config: Path, *args: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmreplica.cli",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


async def _stopped(agent: Agent, running: asyncio.Task[None]) -> None:
    agent.stop()
    await running
