"""A primary rotates its site key mid-stream; the verifying replica learns the new key from the
old key's endorsement and keeps applying, with real Kafka.

Site B lists only site A's first key. A ships a cycle, rotates (`vmreplica key rotate` does the
same), restarts and ships another: B applies both, its entry now lists both keys (the old one
stays for records still on the topic), and the images equal A's. A forger that copies the
endorsement onto its own key gets nowhere.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

from tests.fixtures import SitePair, VmFactory
from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.security.authorization import AuthorizationEntry
from vmreplica.security.signing import load_site_key, rotate_site_key
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


async def test_a_rotated_key_is_learnt_and_a_copied_endorsement_is_refused(
    site_pair: SitePair, vm: VmFactory
) -> None:
    site_a, site_b = site_pair.a, site_pair.b
    old_key = site_a.key.public_text
    tg = site_b.config.trust_group
    site_b.authorization.add(
        AuthorizationEntry("site-a", tg, str(site_b.config.root / "replicas"), (old_key,))
    )
    enabled = await vm(site_a, {"disk0": 4 * MiB}, VmSettings(frequency_seconds=30))
    async with site_a.primary(enabled.record) as primary:
        await primary.capture.write("disk0", 0, os.urandom(MiB))
        await primary.initial_replication()
        await primary.capture.write("disk0", MiB, os.urandom(MiB))
        await primary.replicate()

    new_key, _ = rotate_site_key(site_a.config.root)
    async with site_pair.sites.site("site-a") as restarted:
        assert restarted.key.public == new_key.public
        record = await restarted.catalog.vm(enabled.name)
        async with restarted.primary(record) as primary:
            await primary.capture.write("disk0", 2 * MiB, os.urandom(MiB))
            last = (await primary.replicate())[-1].cycle

    (adopted,) = await site_b.discover()
    async with await site_b.replica(adopted) as replica:
        assert await replica.catch_up() == last
        assert replica.violation is None
        assert sha256_of(replica.images["disk0"].path) == sha256_of(enabled.disks["disk0"])
        (entry,) = site_b.authorization.entries()
        assert entry.keys == (old_key, new_key.public_text)

        position = await site_b.catalog.position(enabled.name)
        assert position is not None
        forger = dataclasses.replace(
            load_site_key(site_b.config.root / "forger"), endorsement=new_key.endorsement
        )
        batch = write_batch(
            enabled.name, position.epoch, last + 1, 0, [Change("disk0", 0, b"f" * 4096)]
        )
        commit = cycle_commit(
            enabled.name, position.epoch, last + 1, [batch], position.cycle_hash,
            {"disk0": 4 * MiB},
        )  # fmt: skip
        async with JournalPublisher(site_a.connection, f"forger-{uuid.uuid4().hex}") as pub:
            await pub.publish(
                site_a.journal_topic(enabled.name),
                enabled.name.encode(),
                [forger.encode(batch), forger.encode(commit)],
            )
        for _ in range(20):  # until the forged records are fetched
            if replica.violation is not None:
                break
            await replica.step()
        assert replica.violation is not None
        assert "refused an untrusted record: WriteBatch is signed by key" in str(replica.violation)
        assert sha256_of(replica.images["disk0"].path) == sha256_of(enabled.disks["disk0"])
    assert (await site_b.catalog.vm(enabled.name)).state is ReplicationState.ERROR
