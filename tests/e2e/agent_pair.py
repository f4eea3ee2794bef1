"""Two sites' agents as processes, a VM written through the primary's NBD export, and the
checks every fault test ends with: the replica equals the primary at a cycle boundary, no cycle
is missing from the journal or from what the replica applied, and no agent logged a traceback.

Used by the fault tests (``test_kafka_faults.py``, ``test_disk_full.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tests.e2e.clients import AgentProcess, cli, enable_nbd, run, wait_until
from vmreplica.cli.server import toml_value
from vmreplica.config import SiteConfig, load_config
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import KafkaConnection, read_to_end
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import CycleCommit

MiB: Final = 1024 * 1024
SETTLE_SECONDS: Final = 3.0
"""A continuous VM with nothing shipped for this long has nothing waiting (it cuts each second)."""
WRITE_EVERY_SECONDS: Final = 0.3
"""The light write load: one small write through the export this often."""


@dataclass
class Writer:
    """A light write load through an NBD export: a 64 KiB write every
    :data:`WRITE_EVERY_SECONDS`, each a new pattern at the next offset (wrapping round
    ``span``). Every write must succeed: no fault may stop the VM's disk."""

    uri: str
    span: int
    written: int = 0
    failures: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            offset = (self.written * 64 * 1024) % self.span
            pattern = self.written % 251 + 1
            process = await asyncio.create_subprocess_exec(
                "qemu-io",
                "-f",
                "raw",
                self.uri,
                "-c",
                f"write -P {pattern} {offset} 64k",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await process.communicate()
            if process.returncode != 0 or b"wrote" not in out:
                self.failures.append(out.decode(errors="replace"))
            self.written += 1
            await asyncio.sleep(WRITE_EVERY_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def status_of(config: Path, vm: str) -> dict[str, Any]:
    """`vmreplica status VM --json` at the site of ``config``, as an operator runs it."""
    [row] = json.loads(await cli(config, "status", vm, "--json"))
    assert isinstance(row, dict)
    return row


@dataclass
class Pair:
    """Sites A (primary) and B (replica) of one VM, each with its agent process."""

    vm: str
    config_a: Path
    config_b: Path
    agent_a: AgentProcess
    agent_b: AgentProcess
    disk: Path
    uri: str

    async def _position(self, config: Path) -> int:
        async with Site(_config(config)) as site:
            if await site.catalog.find_vm(self.vm) is None:
                return -1
            position = await site.catalog.position(self.vm)
            return -1 if position is None else position.cycle

    async def shipped(self) -> int:
        return await self._position(self.config_a)

    async def applied(self) -> int:
        return await self._position(self.config_b)

    async def state(self, config: Path) -> ReplicationState:
        async with Site(_config(config)) as site:
            return (await site.catalog.vm(self.vm)).state

    async def replica_disk(self) -> Path:
        async with Site(_config(self.config_b)) as site:
            return Path((await site.catalog.vm(self.vm)).disks[0].path)

    async def settled(self, seconds: float = 120.0) -> int:
        """With no writes coming, wait until the primary has shipped everything (a continuous
        VM cuts within a second of a write, so nothing new for a few seconds means nothing
        waits) and the replica applied it, both replicating; return that cycle."""

        async def done() -> bool:
            shipped = await self.shipped()
            if await self.applied() != shipped:
                return False
            await asyncio.sleep(SETTLE_SECONDS)
            return (
                await self.shipped() == shipped
                and await self.applied() == shipped
                and await self.state(self.config_a) is ReplicationState.REPLICATING
                and await self.state(self.config_b) is ReplicationState.REPLICATING
            )

        await wait_until(done, "the replica to apply every cycle the primary shipped", seconds)
        return await self.applied()

    async def assert_identical(self) -> None:
        output = await run(
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            str(self.disk),
            str(await self.replica_disk()),
        )
        assert "Images are identical" in output

    async def assert_cycles_exact(self, bootstrap_servers: str, topic: str) -> None:
        """The journal's CycleCommits (read_committed) are numbered n, n+1, … without a gap or
        a duplicate, the replica applied the last, and every cycle it applied since the seed
        is among its statistics exactly once, consecutive."""
        commits = []
        async for record in read_to_end(KafkaConnection(bootstrap_servers), topic):
            event = decode_journal(record.value)
            if isinstance(event, CycleCommit):
                commits.append(event.cycle)
        assert commits, "no cycle was shipped"
        assert commits == list(range(commits[0], commits[0] + len(commits))), commits
        assert await self.applied() == commits[-1]
        async with Site(_config(self.config_b)) as site:
            applied = [row[0] for row in await site.catalog.cycle_stats(self.vm, 0)]
        assert applied == list(range(applied[0], applied[-1] + 1)), applied
        assert applied[-1] == commits[-1]


def _config(path: Path) -> SiteConfig:
    return load_config(path)


async def wait_for_health(
    config: Path, vm: str, wanted: tuple[str, ...], reason: str, seconds: float
) -> dict[str, Any]:
    """Poll `status --json` until the VM's health is one of ``wanted`` with a reason holding
    ``reason``; return that row."""
    deadline = time.monotonic() + seconds
    seen: list[tuple[str, list[str]]] = []
    while True:
        row = await status_of(config, vm)
        seen.append((row["health"], row["health_reasons"]))
        if row["health"] in wanted and any(reason in r for r in row["health_reasons"]):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(
                f"health of {vm} never became {wanted} with a reason holding {reason!r} "
                f"within {seconds:.0f} s; seen: {seen[-5:]}"
            )
        await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def replicating_pair(
    folder: Path,
    disk_size: int,
    settings_a: dict[str, Any],
    settings_b: dict[str, Any],
    vm: str,
) -> AsyncIterator[Pair]:
    """Sites A and B configured from ``settings_*`` (written as site files in ``folder``), a
    ``--capture nbd`` continuous VM enabled on A with one disk of ``disk_size``, both agents
    started; yields once the replica has the seed. Agents are stopped on the way out."""
    configs = []
    for name, settings in (("site-a", settings_a), ("site-b", settings_b)):
        path = folder / f"{name}.toml"
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
        configs.append(path)
    config_a, config_b = configs
    disk = folder / "disk0.img"
    with disk.open("wb") as image:
        image.truncate(disk_size)
    enabled = await enable_nbd(config_a, vm, {"disk0": disk}, "continuous")
    uri = enabled["nbd"]["disk0"]["unix"]
    agent_a = AgentProcess(config_a, folder / "agent-a.log")
    agent_b = AgentProcess(config_b, folder / "agent-b.log")
    pair = Pair(vm, config_a, config_b, agent_a, agent_b, disk, uri)
    agent_a.start()
    agent_b.start()
    try:

        async def seeded() -> bool:
            return (
                await pair.state(config_a) is ReplicationState.REPLICATING
                and await pair.applied() >= 0
                and await pair.state(config_b) is ReplicationState.REPLICATING
            )

        await wait_until(seeded, "the replica to be seeded", 120)
        try:
            yield pair
        except BaseException:  # what the agents said is the first thing one wants to read
            for agent in (agent_a, agent_b):
                print(f"--- {agent.log} (end) ---\n{agent.output()[-5000:]}")
            raise
    finally:
        await agent_a.stop()
        await agent_b.stop()
