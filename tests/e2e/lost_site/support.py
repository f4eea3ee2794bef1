"""What the tests of a lost primary site share: a Kafka broker of the test's own, which it kills
and restarts on the same data and ports (the session's broker is shared by every test), agents
that heartbeat slowly enough to see an unplanned failover refused, and the command line run the
way an operator runs it (its exit status and output, whatever they are)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Final

from tests.e2e.sites import Agents
from vmreplica.devtools.cluster import LocalCluster

HEARTBEAT_SECONDS: Final = 4.0
"""The primary's heartbeats: an unplanned failover is refused for three of them after the last."""


async def kill_broker(broker: LocalCluster) -> None:
    """SIGKILL every node, as a site's power cut would."""
    await asyncio.to_thread(broker.stop_nodes, kill=True)


class SlowBeatAgents(Agents):
    """Agents whose primaries heartbeat every :data:`HEARTBEAT_SECONDS`."""

    def config(self, site: str) -> Path:
        return self.sites.config_file(site, heartbeat_seconds=HEARTBEAT_SECONDS)


async def vmreplica(agents: Agents, site: str, *args: str) -> tuple[int, str]:
    """`vmreplica ARGS` at ``site``, which may fail: its exit status and all it printed."""
    process = await start_vmreplica(agents, site, *args)
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def start_vmreplica(agents: Agents, site: str, *args: str) -> asyncio.subprocess.Process:
    """`vmreplica ARGS` at ``site`` as a running process (stdout and stderr piped together)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmreplica.cli",
        *args,
        "--config",
        str(agents.config(site)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
