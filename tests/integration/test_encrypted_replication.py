"""An encrypted, signed VM replicates to identical images, and its data never shows on the topic.

Sites A and B each hold an authorization entry with the other's key (as the demo sets them up),
so B verifies every record and A can wrap the VM's payload key for B. The primary writes text
that compresses well and a marker that would be found verbatim in any unencrypted payload (raw
or zstd); after seeding and two cycles the replica's images equal the primary's, B holds the key
A made, and no record on the journal topic contains the marker. When the key has aged past
its week, the primary's next start makes a new one, announces it in a VmConfig, and the replica
goes on decrypting with it.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.fixtures import SitePair, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.journal.kafka import read_to_end
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import SeedChunk, WriteBatch
from vmreplica.security.authorization import AuthorizationEntry
from vmreplica.security.encryption import PAYLOAD_KEY_MAX_AGE_MS
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
MARKER = b"plaintext-marker-that-must-not-travel-" * 8


async def test_encrypted_vm_round_trips_and_the_topic_holds_no_plaintext(
    site_pair: SitePair, vm: VmFactory
) -> None:
    site_a, site_b = site_pair.a, site_pair.b
    tg = site_a.config.trust_group
    storage = str(site_b.config.root / "replicas")
    site_b.authorization.add(AuthorizationEntry("site-a", tg, storage, (site_a.key.public_text,)))
    site_a.authorization.add(
        AuthorizationEntry("site-b", tg, str(site_a.config.root / "r"), (site_b.key.public_text,))
    )
    enabled = await vm(site_a, {"disk0": 8 * MiB}, VmSettings(frequency_seconds=30, encrypt=True))
    async with site_a.primary(enabled.record) as primary:
        await primary.capture.write("disk0", 0, MARKER.ljust(MiB, b"\0"))
        seed = await primary.initial_replication()
        await primary.capture.write("disk0", 3 * MiB, MARKER * 64)
        await primary.replicate()
        await primary.capture.write("disk0", 5 * MiB, os.urandom(64 * 1024) + MARKER)
        await primary.replicate()
        expected = sha256_of(enabled.disks["disk0"])

    adopted = await site_b.discover()
    assert [r.name for r in adopted] == [enabled.name]
    assert adopted[0].settings.encrypt
    async with await site_b.replica(adopted[0]) as replica:
        assert await replica.catch_up() == seed.first_cycle + 1
        assert replica.violation is None
        assert sha256_of(replica.images["disk0"].path) == expected
    assert [k.id for k in site_b.key_ring(enabled.name).keys] == [
        k.id for k in site_a.key_ring(enabled.name).keys
    ]

    # A week later the primary's next start makes a new key and announces it before using it.
    ring_file = site_a.key_ring(enabled.name).path
    document = json.loads(ring_file.read_text())
    document["keys"][0]["created_ms"] -= PAYLOAD_KEY_MAX_AGE_MS + 1
    ring_file.write_text(json.dumps(document))
    vm_record = await site_a.catalog.vm(enabled.name)
    async with site_a.primary(vm_record) as primary:
        await primary.capture.write("disk0", 6 * MiB, MARKER * 16)
        last = (await primary.replicate())[-1].cycle
    expected = sha256_of(enabled.disks["disk0"])
    keys_a = site_a.key_ring(enabled.name)
    assert len(keys_a.keys) == 2
    async with await site_b.replica(await site_b.catalog.vm(enabled.name)) as replica:
        assert await replica.catch_up() == last
        assert replica.violation is None
        assert sha256_of(replica.images["disk0"].path) == expected
    assert {k.id for k in site_b.key_ring(enabled.name).keys} == {k.id for k in keys_a.keys}

    encrypted = 0
    async for record in read_to_end(site_a.connection, site_a.journal_topic(enabled.name)):
        assert MARKER[:24] not in record.value
        event = decode_journal(record.value)
        assert event.signature is not None
        if isinstance(event, WriteBatch | SeedChunk) and event.payload:
            assert event.encryption is not None
            encrypted += 1
    assert encrypted >= 3
