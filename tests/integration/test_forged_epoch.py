"""A verifying primary does not yield to a forged epoch.

A primary that restarts looks in its journal for a newer ``EpochStart`` of another site (a
failover it missed) and, finding one, stops being primary. Site A lists site B's key, so it
checks that record's signature first: an epoch forged by a key nobody lists (or unsigned) is
logged and ignored, and A goes on shipping cycles that its replica applies.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from tests.fixtures import SitePair, VmFactory
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import EpochStart
from vmreplica.security.authorization import AuthorizationEntry
from vmreplica.security.signing import load_site_key

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


async def test_a_forged_newer_epoch_does_not_depose_the_primary(
    site_pair: SitePair, vm: VmFactory, caplog: pytest.LogCaptureFixture
) -> None:
    site_a = site_pair.a
    tg = site_a.config.trust_group
    site_a.authorization.add(
        AuthorizationEntry(
            "site-b", tg, str(site_a.config.root / "r"), (site_pair.b.key.public_text,)
        )
    )
    enabled = await vm(site_a, {"disk0": 4 * MiB})
    async with site_a.primary(enabled.record) as primary:
        await primary.capture.write("disk0", 0, os.urandom(MiB))
        await primary.initial_replication()
        last_hash = (await site_a.catalog.position(enabled.name)).cycle_hash  # type: ignore[union-attr]

    forger = load_site_key(site_a.config.root / "forger")
    forged = EpochStart(enabled.name, 99, 1, "site-b", 50, "takeover", 1, last_hash)
    async with JournalPublisher(site_a.connection, f"forger-{uuid.uuid4().hex}") as publisher:
        await publisher.publish(
            site_a.journal_topic(enabled.name),
            enabled.name.encode(),
            [forger.encode(forged), encode(forged)],
        )

    with caplog.at_level(logging.WARNING):
        record = await site_a.catalog.vm(enabled.name)
        async with site_a.primary(record) as primary:  # would raise SupersededError
            await primary.capture.write("disk0", MiB, os.urandom(MiB))
            shipped = await primary.replicate()
    assert shipped
    assert (await site_a.catalog.vm(enabled.name)).role == "primary"
    warnings = [r.getMessage() for r in caplog.records if "ignoring that epoch" in r.getMessage()]
    assert len(warnings) == 2
    assert "EpochStart is signed by key" in warnings[0]
    assert "EpochStart is not signed" in warnings[1]
