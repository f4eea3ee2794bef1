"""`vmreplica set` and `vmreplica remove` with real agents on a real broker.

A VM replicates every 15 minutes, keeping only its latest point. `set --frequency continuous
--continuous-points-hours 1` on the primary, while both agents run, must take effect at both
sites: the primary's agent starts the VM's worker again and ships a waiting write within
seconds (not 15 minutes), and the replica — which learns the settings only from the signed
VmConfig in the journal — records them and keeps every cycle as a recovery point from then on.
Then `remove` at each site, through each site's agent: the replica's agent stops the VM's
worker, keeps its images, and does not adopt the VM again from its journal.

Site A's agent runs in this process (the test writes through its capture API); site B's agent
is a `vmreplica agent` process; every command runs as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients import AgentProcess, cli, wait_until
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.events import EventId
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site

pytestmark = [pytest.mark.e2e]
MiB = 1024 * 1024
HEARTBEAT_SECONDS = 1.0


async def cli_json(config: Path, *args: str) -> Any:
    return json.loads(await cli(config, *args, "--json"))


async def test_set_reaches_both_sites_and_remove_stops_each(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a", heartbeat_seconds=HEARTBEAT_SECONDS)
    config_b = sites.config_file("site-b", heartbeat_seconds=HEARTBEAT_SECONDS)
    agent_b = AgentProcess(config_b, tmp_path / "agent-b.log")
    agent_b.start()
    try:
        async with (
            sites.site("site-a", heartbeat_seconds=HEARTBEAT_SECONDS) as site_a,
            sites.site("site-b", heartbeat_seconds=HEARTBEAT_SECONDS) as site_b,
            contextlib.AsyncExitStack() as stack,
        ):
            enabled = await vm(site_a, {"disk0": 8 * MiB}, VmSettings(frequency_seconds=900))
            name = enabled.name
            agent_a = Agent(site_a)
            running = asyncio.create_task(agent_a.run())
            stack.push_async_callback(_stopped, agent_a, running)
            first = await agent_a.primary(name, 60)

            async def cycle_at(site: Site) -> int:
                if await site.catalog.find_vm(name) is None:
                    return -1
                position = await site.catalog.position(name)
                return -1 if position is None else int(position.cycle)

            async def seeded_at_b() -> bool:
                record = await site_b.catalog.find_vm(name)
                return record is not None and record.state.value == "replicating"

            await wait_until(seeded_at_b, "the initial replication at site B")
            held = await cycle_at(site_a)
            await first.capture.write("disk0", MiB, os.urandom(64 * 1024))
            await first.capture.flush()
            await asyncio.sleep(3.0)
            assert await cycle_at(site_a) == held  # every 15 minutes: nothing ships yet

            changed = await cli_json(
                config_a,
                "set",
                name,
                "--frequency",
                "continuous",
                "--continuous-points-hours",
                "1",
                "--recovery-history",
                "2",
            )
            assert changed["agent_running"] is True
            assert changed["changed"]["frequency_seconds"] == {"before": 900, "after": 0}

            # site A: the worker starts again with the new frequency; the waiting write ships
            async def restarted() -> bool:
                return agent_a.primaries.get(name) not in (None, first)

            await wait_until(restarted, "the primary's worker started again", 30)
            await wait_until(_above(cycle_at, site_a, held), "the waiting write shipped", 20)
            primary = agent_a.primaries[name]
            assert primary.record.settings.frequency_seconds == 0

            # site B: the settings came through the journal
            async def settings_at_b() -> bool:
                settings = (await site_b.catalog.vm(name)).settings
                return (
                    settings.frequency_seconds,
                    settings.continuous_points_hours,
                    settings.recovery_history,
                ) == (0, 1, 2)

            await wait_until(settings_at_b, "site B to take the new settings", 30)
            events_b = await cli_json(config_b, "events", name)
            (said,) = [e for e in events_b if e["event_id"] == EventId.SETTINGS_CHANGED]
            assert "frequency_seconds 900 -> 0" in said["message"]
            assert "published by primary site site-a" in said["message"]

            # every cycle from now on is a recovery point at site B (it kept the latest only)
            start = await cycle_at(site_a)
            for _ in range(3):
                before = await cycle_at(site_a)
                await primary.capture.write("disk0", 2 * MiB, os.urandom(64 * 1024))
                await primary.capture.flush()
                await wait_until(_above(cycle_at, site_a, before), "a continuous cycle", 20)
            shipped = await cycle_at(site_a)
            await wait_until(_above(cycle_at, site_b, shipped - 1), f"cycle {shipped} at B")
            points = {p["point"] for p in await cli_json(config_b, "points", "list", name)}
            assert set(range(start + 1, shipped + 1)) <= points, points

            # remove at B, through its agent: images kept, the VM not adopted again
            removed = await cli(config_b, "remove", name)
            assert f"replication of VM {name} removed at site site-b" in removed
            assert await site_b.catalog.find_vm(name) is None
            moved = list((sites.folder / "site-b" / "removed").iterdir())
            assert [p.name.split(".")[0] for p in moved] == [name]
            assert (moved[0] / "disks" / "disk0.img").is_file()
            await asyncio.sleep(5.0)  # two discoveries of agent B
            assert await site_b.catalog.find_vm(name) is None
            agent_b.alive()
            assert "removed at this site" in (await cli(config_b, "remove", name))

            # remove at A, through the agent of this process: its worker stops
            removed = await cli(config_a, "remove", name)
            assert "(it was primary here)" in removed
            assert str(enabled.disks["disk0"]) in removed
            await wait_until(_gone(agent_a, name), "site A's worker to stop", 20)
            assert enabled.disks["disk0"].is_file()
    finally:
        await agent_b.stop()
    agent_b.assert_no_traceback()


def _above(cycle_at: Any, site: Site, floor: int) -> Any:
    async def holds() -> bool:
        return bool(await cycle_at(site) > floor)

    return holds


def _gone(agent: Agent, vm: str) -> Any:
    async def gone() -> bool:
        return vm not in agent.primaries

    return gone


async def _stopped(agent: Agent, running: asyncio.Task[None]) -> None:
    agent.stop()
    await running
