"""A VM's bandwidth limit on a real broker: its cycles keep to the limit on average, its
heartbeats are never held back, and the replica ends equal all the same."""

from __future__ import annotations

import os
import time

import pytest

from tests.fixtures import SitePair, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
LIMIT = 2 * MiB


async def test_cycles_keep_to_the_bandwidth_limit_and_heartbeats_do_not_wait(
    site_pair: SitePair, vm: VmFactory
) -> None:
    site_a, site_b = site_pair.a, site_pair.b
    settings = VmSettings(frequency_seconds=30, compression=False, bandwidth_bytes_per_second=LIMIT)
    enabled = await vm(site_a, {"disk0": 16 * MiB}, settings)
    async with site_a.primary(enabled.record) as primary:
        await primary.initial_replication()  # a sparse disk: next to nothing sent
        started = time.monotonic()
        for index in range(4):  # 4 MiB of incompressible data: two seconds at the limit
            await primary.capture.write("disk0", index * MiB, os.urandom(MiB))
            await primary.replicate()
            beat = time.monotonic()
            await primary.heartbeat()  # owes up to a second of data, but is not held
            assert time.monotonic() - beat < 0.5
        assert primary.publisher.pace is not None
        assert primary.publisher.pace.delay() > 0.2  # the last MiB still owes its time
        await primary.capture.write("disk0", 8 * MiB, os.urandom(4096))
        await primary.replicate()  # waits for the last MiB to fit the limit
        elapsed = time.monotonic() - started
        assert elapsed >= 4 * MiB / LIMIT - 0.2, elapsed
        expected = sha256_of(enabled.disks["disk0"])

    (adopted,) = await site_b.discover()
    async with await site_b.replica(adopted) as replica:
        await replica.catch_up()
        assert replica.violation is None
        assert sha256_of(replica.images["disk0"].path) == expected
