"""Application-consistent cycles, primary to replica through a real broker: the capture front
freezes the guest, cuts, thaws before the cycle ships, and the replica's recovery point says
``application``; a freeze that fails still ships the cycle, crash-consistent, and says why;
``latest-app-consistent`` then names the older, frozen point."""

from __future__ import annotations

import os

import pytest

from tests.fixtures import SitePair, VmFactory
from vmreplica.consumers.points import choose_point
from vmreplica.domain.model import Consistency, VmSettings
from vmreplica.errors import HypervisorError
from vmreplica.producers.capture_front import CaptureFront

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


class Guest:
    """What the hypervisor adapter would freeze: records the order of events."""

    def __init__(self, events: list[str], fails: bool = False) -> None:
        self.events = events
        self.fails = fails

    async def freeze(self) -> None:
        self.events.append("freeze")
        if self.fails:
            raise HypervisorError("VM 'x': guest agent 'guest-fsfreeze-freeze' ... no answer")

    async def thaw(self) -> None:
        self.events.append("thaw")


async def test_a_frozen_cut_is_an_application_consistent_point_and_a_failed_freeze_is_not(
    site_pair: SitePair, vm: VmFactory
) -> None:
    a, b = site_pair.a, site_pair.b
    enabled = await vm(
        a, {"disk0": 4 * MiB}, VmSettings(continuous_points_hours=1, app_consistent_hours=1)
    )
    events: list[str] = []
    async with a.primary(enabled.record) as primary, CaptureFront(primary, a.config) as front:
        await primary.initial_replication()
        await primary.capture.write("disk0", 0, os.urandom(256 * 1024))
        [frozen] = await front.cycle(Guest(events))
        assert front.freeze_error is None
        assert events == ["freeze", "thaw"]  # thawed at the cut, before the commit returned
        await primary.capture.write("disk0", MiB, os.urandom(256 * 1024))
        [failed] = await front.cycle(Guest(events, fails=True))
        assert front.freeze_error == "VM 'x': guest agent 'guest-fsfreeze-freeze' ... no answer"
        assert events == ["freeze", "thaw", "freeze", "thaw"]  # a timed-out freeze is undone
        await primary.capture.write("disk0", 2 * MiB, os.urandom(256 * 1024))
        [crash] = await front.cycle()
    [record] = await b.discover()
    async with await b.replica(record) as replica:
        await replica.catch_up()
        assert replica.violation is None
    points = {p.cycle: p.consistency for p in await b.catalog.points(enabled.name)}
    assert points[frozen.cycle] is Consistency.APPLICATION
    assert points[failed.cycle] is Consistency.CRASH
    assert points[crash.cycle] is Consistency.CRASH
    chosen = choose_point(await b.catalog.points(enabled.name), "latest-app-consistent")
    assert chosen.cycle == frozen.cycle
