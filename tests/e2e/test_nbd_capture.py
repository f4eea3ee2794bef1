"""Capture through the agent's NBD export, and by change scan, end to end with real clients.

The primary agent serves each disk of a ``--capture nbd`` VM over NBD; real clients nobody here
wrote (``qemu-io``, ``nbdcopy``, ``fio``'s nbd engine) write through it; a replica agent applies
the journal from a real Kafka broker; ``qemu-img compare`` then finds the replica identical to
the primary image at a cycle boundary after the writes. Agents run in this test's event loop,
except where a SIGKILL is the point: there ``vmreplica agent`` runs as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients import cli, enable_nbd, identical, make_disk, run, wait_until
from tests.fixtures import SiteFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.producers.changelog import HEADER_BYTES
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@dataclass
class Pair:
    """Site A (primary, agent in this loop) and site B (replica, agent in this loop)."""

    site_a: Site
    site_b: Site
    agent_a: Agent
    vm: str

    async def shipped(self) -> int:
        position = await self.site_a.catalog.position(self.vm)
        return -1 if position is None else position.cycle

    async def applied(self) -> int:
        if await self.site_b.catalog.find_vm(self.vm) is None:
            return -1
        position = await self.site_b.catalog.position(self.vm)
        return -1 if position is None else position.cycle

    async def replicating(self) -> bool:
        record = await self.site_a.catalog.vm(self.vm)
        return self.vm in self.agent_a.fronts and record.state is ReplicationState.REPLICATING

    async def replica_disks(self) -> dict[str, Path]:
        return {d.name: Path(d.path) for d in (await self.site_b.catalog.vm(self.vm)).disks}

    async def caught_up(self, target: int) -> None:
        """Wait until cycle ``target`` is shipped and applied."""

        async def done() -> bool:
            return await self.shipped() >= target and await self.applied() >= target

        await wait_until(done, f"cycle {target} to be shipped and applied")

    async def caught_up_after_writes(self, scans: bool = False) -> int:
        """Wait until every write so far is shipped and applied; return the cycle holding it.

        The open cycle holds the last writes, and is cut at the next check since something
        waits; if it holds none, the last cut did. A scanned VM's writes are found by a scan
        that starts after them: the second check from now has run one, and shipped what it
        found (a check that finds nothing ships nothing).
        """
        primary = self.agent_a.primaries[self.vm]
        if not scans:
            capture = primary.capture
            open_holds_writes = (
                capture.log.segment_bytes > HEADER_BYTES or capture.dirty is not None
            )
            target = capture.log.cycle - (0 if open_holds_writes else 1)
        else:
            checks = primary.checks

            async def scanned() -> bool:
                return primary.checks >= checks + 2

            await wait_until(scanned, "a scan to start after the writes and finish")
            target = await self.shipped()
        await self.caught_up(target)
        return target


@pytest.fixture
async def pair_factory(
    sites: SiteFactory,
    unique: Callable[[str], str],
) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    stack: list[tuple[Agent, asyncio.Task[None]]] = []

    async def make(disks: dict[str, Path], settings: VmSettings, **site_a_settings: Any) -> Pair:
        vm = unique("vm")
        site_a = await sites.start("site-a", heartbeat_seconds=1.0, **site_a_settings)
        site_b = await sites.start("site-b", heartbeat_seconds=1.0)
        await site_a.enable(vm, disks, "site-b", settings)
        agent_a, agent_b = Agent(site_a), Agent(site_b)
        for agent in (agent_a, agent_b):
            stack.append((agent, asyncio.create_task(agent.run())))
        pair = Pair(site_a, site_b, agent_a, vm)
        await wait_until(pair.replicating, "the primary to finish its initial replication")
        return pair

    yield make
    for agent, task in reversed(stack):
        agent.stop()
        await asyncio.wait_for(task, 120)


async def test_qemu_io_nbdcopy_and_fio_through_the_agent_reach_an_identical_replica(
    tmp_path: Path, pair_factory: Callable[..., Awaitable[Pair]]
) -> None:
    disks = {
        "disk0": make_disk(tmp_path / "disk0.img", 64 * MiB, os.urandom(MiB), 5 * MiB),
        "disk1": make_disk(tmp_path / "disk1.img", 16 * MiB),
    }
    pair = await pair_factory(disks, VmSettings(frequency_seconds=0, capture="nbd"), nbd_tcp_port=0)
    exports = pair.agent_a.fronts[pair.vm].exports
    assert exports is not None
    uri0, uri1 = exports.uri("disk0"), exports.uri("disk1")
    assert uri0 == f"nbd+unix:///disk0?socket={exports.path}"
    assert pair.agent_a.exports.tcp is not None
    address = pair.agent_a.exports.tcp.tcp_address
    assert address is not None
    over_tcp = json.loads(
        await run("nbdinfo", "--json", f"nbd://127.0.0.1:{address[1]}/{pair.vm}.disk1")
    )
    assert over_tcp["exports"][0]["export-size"] == 16 * MiB

    listing = json.loads(await run("nbdinfo", "--json", "--list", uri0))
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"disk0": 64 * MiB, "disk1": 16 * MiB}
    for export in listing["exports"]:
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert export[flag] is True, flag
        assert export["is_read_only"] is False

    output = await run(
        "qemu-io",
        "-f",
        "raw",
        uri0,
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 10M 64k",
        "-c",
        "write -z 5M 256k",  # WRITE_ZEROES over seeded data
        "-c",
        "discard 6M 64k",  # TRIM
        "-c",
        "write -P 0x11 63M 1M",  # the last MiB
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0 5M 256k",
    )
    assert "Pattern verification failed" not in output
    await run("qemu-io", "-f", "raw", uri1, "-c", f"write -P 0x77 {16 * MiB - 4096} 4096")
    source = make_disk(tmp_path / "source.raw", 12 * MiB, os.urandom(12 * MiB))
    await run("nbdcopy", str(source), uri1)
    fio = await run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri0}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--offset=16M",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    )
    job = json.loads(fio[fio.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == 32 * MiB

    await pair.caught_up_after_writes()
    replica = await pair.replica_disks()
    for name, path in disks.items():
        await identical(path, replica[name])
    with disks["disk1"].open("rb") as image:
        assert image.read(12 * MiB) == source.read_bytes()


async def test_churn_past_the_budget_degrades_to_dirty_blocks_and_replica_stays_equal(
    tmp_path: Path, pair_factory: Callable[..., Awaitable[Pair]], capsys: pytest.CaptureFixture[str]
) -> None:
    disks = {"disk0": make_disk(tmp_path / "disk0.img", 64 * MiB)}
    budget = 2 * MiB
    pair = await pair_factory(
        disks, VmSettings(frequency_seconds=300, capture="nbd", changelog_budget_bytes=budget)
    )
    front = pair.agent_a.fronts[pair.vm]
    assert front.exports is not None
    capture = front.primary.capture
    # 96 MiB of random 4-64 KiB writes over a 24 MiB region: 48 times the budget, in one cycle.
    await run(
        "fio",
        "--name=churn",
        "--ioengine=nbd",
        f"--uri={front.exports.uri('disk0')}",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--offset=8M",
        "--size=24M",
        "--io_size=96M",
        "--output-format=json",
    )
    assert capture.dirty is not None, "capture did not degrade to the dirty-block map"
    assert capture.log.segment_bytes <= budget + 64 * 1024
    shipped = await front.cycle()  # the cycle boundary
    [cycle] = shipped
    with capsys.disabled():
        print(
            f"\nbudget {budget} bytes; 96 MiB written in one cycle; cycle {cycle.cycle} "
            f"shipped {cycle.bytes_written} bytes written ({capture.last_cut_dirty_bytes} "
            f"from dirty blocks), {cycle.wire_bytes} bytes on the wire"
        )
    assert capture.last_cut_dirty_bytes > 0
    assert cycle.bytes_written <= 24 * MiB + budget  # the touched region, never the whole disk
    await pair.caught_up(cycle.cycle)
    await identical(disks["disk0"], (await pair.replica_disks())["disk0"])
    record = await pair.site_a.catalog.vm(pair.vm)
    assert record.state is ReplicationState.REPLICATING
    # The next cycle journals again.
    await run("qemu-io", "-f", "raw", front.exports.uri("disk0"), "-c", "write -P 0x42 0 64k")
    assert capture.dirty is None

    # Cuts while the client keeps writing: each over-budget cycle copies its dirty blocks
    # ahead of the cut as writes race with the copy, and only the re-dirtied ones in the cut.
    churn = asyncio.create_task(
        run(
            "fio",
            "--name=race",
            "--ioengine=nbd",
            f"--uri={front.exports.uri('disk0')}",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--offset=4M",
            "--size=48M",
            "--time_based",
            "--runtime=4",
            "--output-format=json",
        )
    )
    degraded = capture.degraded_cycles
    while not churn.done():
        await asyncio.sleep(0.3)
        await front.cycle()
    await churn
    await front.cycle()  # what the churn wrote since the last cut, if anything
    assert capture.degraded_cycles > degraded
    await pair.caught_up(await pair.shipped())
    await identical(disks["disk0"], (await pair.replica_disks())["disk0"])


async def test_scan_capture_finds_changes_made_behind_the_agents_back(
    tmp_path: Path, pair_factory: Callable[..., Awaitable[Pair]]
) -> None:
    seeded = os.urandom(8 * MiB)
    disks = {"disk0": make_disk(tmp_path / "disk0.img", 32 * MiB, seeded, 4 * MiB)}
    hooks = tmp_path / "hooks.log"
    pair = await pair_factory(
        disks,
        VmSettings(
            frequency_seconds=0,
            capture="scan",
            pre_cut_hook=f"echo pre >> {hooks}",
            post_cut_hook=f'echo "post $VMREPLICA_VM" >> {hooks}',
        ),
    )
    first = await pair.caught_up_after_writes(scans=True)
    await identical(disks["disk0"], (await pair.replica_disks())["disk0"])
    # The seed recorded what it sent: the scans after it found nothing to send.
    stats = await pair.site_a.catalog.cycle_stats(pair.vm, 0)
    assert all(size < 64 * 1024 for cycle, _, _, size, _ in stats if cycle <= first), stats

    with disks["disk0"].open("r+b") as image:  # the hypervisor writes the file directly
        image.seek(0)
        image.write(os.urandom(3 * MiB))
        image.seek(5 * MiB)
        image.write(bytes(MiB))  # zeros over seeded data
        image.seek(32 * MiB - 100)
        image.write(b"end" * 33)
    await pair.caught_up_after_writes(scans=True)
    await identical(disks["disk0"], (await pair.replica_disks())["disk0"])
    lines = hooks.read_text().split("\n")
    assert lines[:2] == ["pre", f"post {pair.vm}"]


async def connectable(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "vmreplica.cli", "agent", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def test_sigkill_right_after_a_flush_reply_keeps_the_data_and_it_reaches_the_replica(
    tmp_path: Path, short_dir: Path, sites: SiteFactory, unique: Callable[[str], str]
) -> None:
    vm = unique("vm")
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    disk = make_disk(tmp_path / "disk0.img", 16 * MiB)
    enabled = await enable_nbd(config_a, vm, {"disk0": disk}, "300")
    uri = enabled["nbd"]["disk0"]["unix"]
    socket = short_dir / "site-a" / "vms" / vm / "nbd.sock"
    assert uri == f"nbd+unix:///disk0?socket={socket}"
    status = json.loads(await cli(config_a, "status", vm, "--json"))
    assert status[0]["nbd"]["disk0"]["unix"] == uri

    log = tmp_path / "agent-a.log"
    agent = start_agent(config_a, log)
    try:
        async with sites.site("site-a", heartbeat_seconds=1.0) as site_a:

            async def serving() -> bool:
                record = await site_a.catalog.vm(vm)
                return socket.exists() and record.state is ReplicationState.REPLICATING

            await wait_until(serving, "the agent to seed and serve NBD")
            before = await site_a.catalog.position(vm)
            await run(
                "qemu-io",
                "-f",
                "raw",
                uri,
                "-c",
                "write -P 0x5a 1M 1M",
                "-c",
                "write -P 0xa5 15M 4k",
                "-c",
                "flush",
            )
            agent.send_signal(signal.SIGKILL)  # right after the FLUSH reply
            await asyncio.to_thread(agent.wait, 30)
            assert await site_a.catalog.position(vm) == before  # nothing shipped since
        with disk.open("rb") as image:
            image.seek(MiB)
            assert image.read(MiB) == b"\x5a" * MiB
        segments = list((short_dir / "site-a" / "vms" / vm / "changelog").glob("*.hrl"))
        assert sum(p.stat().st_size for p in segments) > MiB  # the writes wait in the log

        assert socket.exists()  # left behind by the killed agent
        agent = start_agent(config_a, log)  # restart: redo, serve again, then a clean stop
        deadline = time.monotonic() + 60
        while not await connectable(socket):  # the stale socket is replaced
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the restarted agent did not serve NBD"
            await asyncio.sleep(0.1)
        await run("qemu-io", "-f", "raw", uri, "-c", "read -P 0x5a 1M 1M")
        agent.send_signal(signal.SIGTERM)  # ships a final cycle before it exits
        assert await asyncio.to_thread(agent.wait, 60) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            await asyncio.to_thread(agent.wait)

    async with sites.site("site-b", heartbeat_seconds=1.0) as site_b:
        [adopted] = await site_b.discover()
        async with await site_b.replica(adopted) as replica:
            await replica.catch_up()
            assert replica.violation is None
        replica_disk = Path((await site_b.catalog.vm(vm)).disks[0].path)
    await identical(disk, replica_disk)
