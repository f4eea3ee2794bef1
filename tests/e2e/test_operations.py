"""Operating a replicating VM through the CLI with real agents: `measure --json` agrees with
`status --json` on both sites, `reset-statistics` starts the window again, `events --json` and
`events --follow` show what happened, a test failover is counted, and `suspend` / `resume`
hold back and release the primary's cycles while its agent runs.

Site A's agent runs in this process (the test writes through its capture API, as a program
would); site B's agent is a `vmreplica agent` process; every command runs as a process, as an
operator types it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients import cli, wait_until
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.events import EventId
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent

pytestmark = [pytest.mark.e2e]
MiB = 1024 * 1024
HEARTBEAT_SECONDS = 1.0


async def failing(config: Path, *args: str) -> tuple[int, str]:
    """Run `vmreplica ARGS` expecting a failure: (exit code, stderr on one line)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmreplica.cli",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    return process.returncode or 0, " ".join(err.decode().split())


async def cli_json(config: Path, *args: str) -> Any:
    return json.loads(await cli(config, *args, "--json"))


def ids(events: list[dict[str, Any]]) -> list[int]:
    return [e["event_id"] for e in events]


async def test_measure_reset_events_suspend_and_resume_with_agents(
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
    follower: asyncio.subprocess.Process | None = None
    try:
        async with (
            sites.site("site-a", heartbeat_seconds=HEARTBEAT_SECONDS) as site_a,
            sites.site("site-b", heartbeat_seconds=HEARTBEAT_SECONDS) as site_b,
            contextlib.AsyncExitStack() as stack,  # last in, first out: the agent before its site
        ):
            enabled = await vm(
                site_a,
                {"disk0": 8 * MiB},
                VmSettings(frequency_seconds=0, continuous_points_hours=1),
            )
            name = enabled.name
            with enabled.disks["disk0"].open("r+b") as image:  # data for the seed to send
                image.write(os.urandom(MiB))
            agent_a = Agent(site_a)
            running = asyncio.create_task(agent_a.run())
            stack.push_async_callback(_stopped, agent_a, running)
            primary = await agent_a.primary(name, 60)
            await primary.capture.write("disk0", 0, os.urandom(MiB))

            async def replicating() -> bool:
                record = await site_a.catalog.vm(name)
                return record.state.value == "replicating"

            await wait_until(replicating, "the initial replication")

            async def cycle_at(site: Any) -> int:
                if await site.catalog.find_vm(name) is None:
                    return -1
                position = await site.catalog.position(name)
                return -1 if position is None else int(position.cycle)

            async def write_and_ship(count: int) -> int:
                for _ in range(count):
                    before = await cycle_at(site_a)
                    await primary.capture.write("disk0", 2 * MiB, os.urandom(64 * 1024))
                    await primary.capture.flush()
                    await wait_until(_above(cycle_at, site_a, before), "a shipped cycle")
                shipped = await cycle_at(site_a)
                await wait_until(_above(cycle_at, site_b, shipped - 1), f"cycle {shipped} applied")
                return shipped

            await write_and_ship(3)

            # measure agrees with status, on both sites
            for config in (config_a, config_b):
                (measured,) = await cli_json(config, "measure", name)
                (status,) = await cli_json(config, "status", name)
                assert measured["successful_cycles"] == status["cycles_in_window"] > 0
                assert (
                    (measured["state"], measured["health"])
                    == (
                        status["state"],
                        status["health"],
                    )
                    == ("replicating", "normal")
                )
                assert abs(measured["seconds_behind"] - status["seconds_behind"]) <= 2.0
                assert measured["missed_cycles"] == 0
                assert measured["failed_cycles"] == {
                    "network": 0,
                    "replication": 0,
                    "application_consistent": 0,
                }
                assert measured["maximum_size_bytes"] >= measured["average_size_bytes"] > 0
                assert measured["last_replication_ms"] <= int(time.time() * 1000)
            (on_a,) = await cli_json(config_a, "measure", name)
            (on_b,) = await cli_json(config_b, "measure", name)
            done = len(await site_a.catalog.cycle_stats(name, 0))
            assert on_a["successful_cycles"] == on_b["successful_cycles"] == done >= 3
            assert on_a["initial_replication_bytes"] > 0
            assert on_a["pending_bytes"] < 64 * 1024  # at most an open segment's header
            assert (on_b["pending_bytes"], on_b["initial_replication_bytes"]) == (None, None)

            # test-connection: the broker, both topics and the partner answer, seen from each site
            for config, partner in (
                (config_a, "replica site site-b reported cycle"),
                (config_b, "primary site site-a heartbeated"),
            ):
                checks = await cli_json(config, "test-connection", name)
                assert [(c["check"], c["ok"]) for c in checks] == [
                    ("broker", True),
                    ("journal topic", True),
                    ("status topic", True),
                    ("access", True),
                    ("partner", True),
                ], checks
                assert checks[-1]["detail"].startswith(partner)

            # a test failover is logged and counted
            started = await cli_json(config_b, "failover", "test", name, "--point", "latest")
            assert started["vm"] == f"{name} - Test"
            await cli(config_b, "failover", "stop-test", name)
            (on_b,) = await cli_json(config_b, "measure", name)
            assert on_b["last_test_failover_ms"] is not None
            events_b = await cli_json(config_b, "events", name)
            assert ids(events_b)[0] == EventId.REPLICATION_ENABLED
            assert EventId.STATE_REPLICATING in ids(events_b)
            assert ids(events_b)[-2:] == [
                EventId.TEST_FAILOVER_STARTED,
                EventId.TEST_FAILOVER_STOPPED,
            ]

            # reset: the window starts again
            reset_at = int(time.time() * 1000)
            await cli(config_a, "reset-statistics", name)
            (after,) = await cli_json(config_a, "measure", name)
            assert after["monitoring_start_ms"] >= reset_at
            assert after["successful_cycles"] == 0
            assert after["last_replication_ms"] == on_a["last_replication_ms"]

            # suspend while the agent runs: writes wait in the change log; resume ships them
            follower = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vmreplica.cli",
                "events",
                name,
                "--follow",
                "--json",
                "--limit",
                "1",
                "--config",
                str(config_a),
                stdout=asyncio.subprocess.PIPE,
            )
            assert follower.stdout is not None
            newest = json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))
            assert newest["event_id"] == EventId.STATISTICS_RESET
            await cli(config_a, "suspend", name)
            followed = json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))
            assert (followed["event_id"], followed["name"]) == (
                EventId.STATE_SUSPENDED,
                "state_suspended",
            )
            held = await cycle_at(site_a)
            await primary.capture.write("disk0", 4 * MiB, os.urandom(256 * 1024))
            await primary.capture.flush()
            await asyncio.sleep(3.0)  # three continuous intervals
            assert await cycle_at(site_a) == held
            (suspended,) = await cli_json(config_a, "measure", name)
            assert suspended["state"] == "suspended"
            assert suspended["health"] == "warning"
            assert suspended["health_reasons"] == ["state is suspended"]
            assert suspended["pending_bytes"] >= 256 * 1024
            code, message = await failing(config_a, "suspend", name)
            assert (code, message.startswith("error: VM")) == (1, True)
            assert "is suspended, not replicating" in message
            await cli(config_a, "resume", name)
            await wait_until(_above(cycle_at, site_b, held), "the held writes applied")
            (resumed,) = await cli_json(config_a, "measure", name)
            assert resumed["state"] == "replicating"
            assert resumed["pending_bytes"] < 256 * 1024
            assert [e["event_id"] for e in (await cli_json(config_a, "events", name))[-2:]] == [
                EventId.STATE_SUSPENDED,
                EventId.STATE_REPLICATING,
            ]

            # suspended at the replica: A ships, B applies nothing until resumed
            async def level() -> bool:  # nothing in flight when B is suspended
                return await cycle_at(site_b) == await cycle_at(site_a)

            await wait_until(level, "B to apply everything A shipped")
            said = await cli(config_b, "suspend", name)
            assert f"VM {name} suspended at this replica" in said
            applied = await cycle_at(site_b)
            await primary.capture.write("disk0", 5 * MiB, os.urandom(64 * 1024))
            await primary.capture.flush()
            await wait_until(_above(cycle_at, site_a, applied), "A to ship the write")
            await asyncio.sleep(3.0)  # three continuous intervals, three fetches at B
            assert await cycle_at(site_b) == applied
            (at_b,) = await cli_json(config_b, "measure", name)
            assert (at_b["state"], at_b["health"]) == ("suspended", "warning")
            await cli(config_b, "resume", name)
            await wait_until(_above(cycle_at, site_b, applied), "B to apply what waited")

            # mistakes: an unknown VM
            for command in ("measure", "reset-statistics", "events", "test-connection"):
                code, message = await failing(config_a, command, "no-such-vm")
                assert code == 2, command
                assert "VM 'no-such-vm' is not replicated at this site" in message
    finally:
        if follower is not None and follower.returncode is None:
            follower.terminate()
            await follower.wait()
        agent_b.terminate()
        await asyncio.wait_for(agent_b.wait(), 30)


def _above(
    cycle_at: Callable[[Any], Awaitable[int]], site: Any, floor: int
) -> Callable[[], Awaitable[bool]]:
    """A condition for :func:`wait_until`: ``site`` holds a cycle above ``floor``."""

    async def holds() -> bool:
        return await cycle_at(site) > floor

    return holds


async def _stopped(agent: Agent, running: asyncio.Task[None]) -> None:
    agent.stop()
    await running
