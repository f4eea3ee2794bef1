"""What the tests of a lost primary site share: a Kafka broker of the test's own, which it kills
and restarts on the same data and ports (the session's broker is shared by every test), agents
that heartbeat slowly enough to see an unplanned failover refused, and the command line run the
way an operator runs it (its exit status and output, whatever they are)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from tests.e2e.test_role_swap import Agents
from vmreplica.devtools.cluster import LocalCluster
from vmreplica.devtools.ports import free_base_port

HEARTBEAT_SECONDS: Final = 4.0
"""The primary's heartbeats: an unplanned failover is refused for three of them after the last."""


@contextmanager
def own_broker() -> Iterator[LocalCluster]:
    """A one-node cluster under a private home, stopped and removed at the end (and by the
    session's orphan check, should the test process die first)."""
    port = free_base_port()
    home = Path(tempfile.gettempdir()) / f"vmreplica-test-kafka-{port}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "owner.pid").write_text(str(os.getpid()))
    cluster = LocalCluster(home=home, base_port=port)
    cluster.up(1)
    try:
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home, ignore_errors=True)


def bootstrap_of(broker: LocalCluster) -> str:
    state = broker.state()
    assert state is not None
    return state.bootstrap_servers


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
