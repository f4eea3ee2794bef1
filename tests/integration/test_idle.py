"""An idle VM costs nothing: in continuous mode it publishes no cycle, yet stays up to date.

A primary agent and a replica agent run in this process against the session's broker, with the
default heartbeat interval, a VM replicating continuously (a cycle every second when written).
After one write has shipped, the VM is left alone for 30 seconds:

- the journal's end offset (its high watermark: records and transaction markers alike) moves by
  at most 3 — a heartbeat at most, no cycle;
- no cycle, recovery point or undo file is added;
- both sites say the VM is Normal, and the replica's RPO (status and Prometheus gauge) stays
  within a couple of seconds all along: the primary's heartbeats say nothing waits, so an idle
  VM is up to date however long since its last cycle; no missed cycle is counted.

Then one write ships and is applied within a couple of seconds, as in a busy VM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import Health, ReplicationState
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import VmStatus, vm_status

pytestmark = pytest.mark.integration

KiB: Final = 1024
IDLE_SECONDS: Final = 30.0
MAX_IDLE_OFFSETS: Final = 3
"""Issue 11: an idle VM in continuous mode adds at most 3 journal offsets in 30 s (one heartbeat
is a record and its transaction marker)."""
RPO_LIMIT_SECONDS: Final = 2.0
"""A couple of seconds: one continuous interval, and a little for the status to be read."""
SAMPLE_SECONDS: Final = 2.5


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout_seconds: float = 60.0
) -> float:
    """Poll ``check`` every 50 ms; return the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_seconds:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def end_offset(bootstrap_servers: str, topic: str) -> int:
    """The topic's high watermark: every record and transaction marker written so far."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([partition]))[partition])
    finally:
        await consumer.stop()


def undo_files(site: Site, vm: str) -> int:
    return len(list((site.config.vm_folder(vm) / "undo").glob("*.hru")))


async def status(site: Site, vm: str) -> VmStatus:
    return await vm_status(site, await site.catalog.vm(vm), with_replica=False)


async def primary_replicating(site: Site, vm: str) -> bool:
    record = await site.catalog.vm(vm)
    return (
        record.state is ReplicationState.REPLICATING
        and (await site.catalog.position(vm)) is not None
    )


async def test_an_idle_vm_publishes_nothing_and_stays_up_to_date(
    sites: SiteFactory, vm: VmFactory, bootstrap_servers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site_a = await sites.start("site-a")
    site_b = await sites.start("site-b", metrics_port=0)
    assert site_a.config.heartbeat_seconds == 30.0  # the default: what users get
    name = (
        await vm(
            site_a,
            {"disk0": 1024 * KiB},
            VmSettings(frequency_seconds=0, continuous_points_hours=1),
        )
    ).name
    topic = site_a.journal_topic(name)
    agent_a, agent_b = Agent(site_a), Agent(site_b)
    tasks = [asyncio.create_task(agent.run()) for agent in (agent_a, agent_b)]
    try:
        primary = await agent_a.primary(name, 60)

        async def applied(cycle: int) -> bool:
            position = await site_b.catalog.position(name)
            return position is not None and position.cycle >= cycle

        def gauge_rpo() -> float | None:
            return agent_b.metrics.registry.get_sample_value(
                "vmreplica_rpo_seconds", {"site": "site-b", "vm": name, "role": "replica"}
            )

        async def told_idle() -> bool:  # the replica heard that nothing waits, and shows it
            heartbeat = await site_b.catalog.last_heartbeat(name)
            rpo = gauge_rpo()
            return (
                heartbeat is not None
                and heartbeat.idle
                and rpo is not None
                and rpo <= RPO_LIMIT_SECONDS
            )

        await wait_until(lambda: primary_replicating(site_a, name), "the seed")
        await primary.capture.write("disk0", 0, b"\x5a" * (64 * KiB))
        await primary.capture.flush()
        first = primary.capture.log.cycle
        await wait_until(lambda: applied(first), f"cycle {first} at the replica")
        await wait_until(told_idle, "the heartbeat saying nothing waits")

        # Left alone for 30 seconds, sampled as an operator would look at it.
        before = await end_offset(bootstrap_servers, topic)
        shipped = await site_a.catalog.position(name)
        points, undo = await site_b.catalog.count_points(name), undo_files(site_b, name)
        samples: list[tuple[VmStatus, VmStatus, float | None]] = []
        deadline = time.monotonic() + IDLE_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(SAMPLE_SECONDS, left))
            samples.append((await status(site_a, name), await status(site_b, name), gauge_rpo()))
        after = await end_offset(bootstrap_servers, topic)
        with capsys.disabled():
            print(
                f"\nidle for {IDLE_SECONDS:.0f} s: the journal's end offset moved "
                f"{after - before} ({before} -> {after})"
            )
        assert after - before <= MAX_IDLE_OFFSETS
        assert await site_a.catalog.position(name) == shipped  # no cycle
        assert (await site_b.catalog.count_points(name), undo_files(site_b, name)) == (points, undo)
        for at_a, at_b, rpo in samples:
            for seen in (at_a, at_b):
                assert seen.record.state is ReplicationState.REPLICATING
                assert (seen.report.health, seen.report.reasons) == (Health.NORMAL, ())
                assert seen.idle
                assert seen.seconds_behind is not None
                assert seen.seconds_behind <= RPO_LIMIT_SECONDS, seen
            assert rpo is not None
            assert rpo <= RPO_LIMIT_SECONDS
        assert (
            agent_b.metrics.registry.get_sample_value(
                "vmreplica_cycles_missed_total", {"site": "site-b", "vm": name}
            )
            == 0
        )

        # A write after the idle stretch ships at the next check, a second later at most.
        written = time.monotonic()
        await primary.capture.write("disk0", 128 * KiB, b"\xa5" * 4096)
        await primary.capture.flush()
        cycle = primary.capture.log.cycle

        async def shipped_now() -> bool:
            position = await site_a.catalog.position(name)
            return position is not None and position.cycle >= cycle

        await wait_until(shipped_now, f"cycle {cycle} to ship")
        shipped_after = time.monotonic() - written
        await wait_until(lambda: applied(cycle), f"cycle {cycle} at the replica")
        applied_after = time.monotonic() - written
        with capsys.disabled():
            print(
                f"a write after the idle stretch: shipped after {shipped_after:.2f} s, "
                f"applied after {applied_after:.2f} s"
            )
        assert shipped_after < 2.5
        assert applied_after < 3.0
        after_write = await status(site_b, name)
        assert after_write.report.health is Health.NORMAL
        assert after_write.seconds_behind is not None
        assert after_write.seconds_behind <= RPO_LIMIT_SECONDS + 1
    finally:
        for agent in (agent_a, agent_b):
            agent.stop()
        await asyncio.gather(*tasks)
