"""Payload encryption: keys wrapped per site, AES-256-GCM bound to its context, old keys kept.

Tampering of every kind is refused as a :class:`CorruptEventError` (which the replica turns into a
journal violation that writes nothing): a flipped bit, a wrong key id, a payload replayed under
another cycle, batch or VM, a key wrapped for another site.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.journal_records import Change, write_batch
from vmreplica.errors import CorruptEventError
from vmreplica.schemas.events import DiskSize, Encryption, VmConfig
from vmreplica.schemas.payload import PayloadPacker, PayloadUnpacker, batch_associated_data
from vmreplica.security.encryption import VmKeyRing, x25519_private, x25519_public
from vmreplica.security.signing import load_site_key

TEXT = b"".join(b"line %06d of a disk block that compresses\n" % i for i in range(2000))


def _pair(tmp_path: Path) -> tuple[VmKeyRing, VmKeyRing]:
    """The primary's ring (site-a, one key) and the replica's (site-b, learnt from VmConfig)."""
    site_a, site_b = load_site_key(tmp_path / "a"), load_site_key(tmp_path / "b")
    primary = VmKeyRing(tmp_path / "a", "web01", site_a)
    primary.rotate()
    config = VmConfig(
        "web01", 1, (DiskSize("system", 1 << 20),), 30, 0, None, "site-a", 1,
        wrapped_keys=primary.wrap_for({"site-b": site_b.public}),
    )  # fmt: skip
    replica = VmKeyRing(tmp_path / "b", "web01", site_b)
    assert replica.learn(config, "site-b") == [primary.keys[0].id]
    return primary, replica


def test_the_x25519_key_of_a_site_is_its_ed25519_key_in_montgomery_form(tmp_path: Path) -> None:
    for index in range(5):
        key = load_site_key(tmp_path / str(index))
        derived = (
            x25519_private(key)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        assert x25519_public(key.public) == derived


def test_a_batch_sealed_at_the_primary_opens_at_the_replica(tmp_path: Path) -> None:
    primary, replica = _pair(tmp_path)
    batch = write_batch("web01", 1, 7, 2, [Change("system", 4096, TEXT)])
    associated = batch_associated_data("web01", 1, 7, 2, batch.extents)
    compression, sealed, encryption = PayloadPacker(cipher=primary).seal(TEXT, associated)
    assert encryption is not None
    assert encryption.algorithm == "AES-256-GCM"
    assert len(encryption.nonce) == 12
    assert TEXT[:64] not in sealed
    encrypted = dataclasses.replace(
        batch, compression=compression, payload=sealed, encryption=encryption
    )
    assert PayloadUnpacker(replica).open(encrypted) == TEXT
    # the key file is private to the site's user and survives a restart
    assert (replica.path.stat().st_mode & 0o777) == 0o600
    again = VmKeyRing(tmp_path / "b", "web01", replica.site_key)
    assert PayloadUnpacker(again).open(encrypted) == TEXT


def test_tampering_and_replays_do_not_decrypt(tmp_path: Path) -> None:
    primary, replica = _pair(tmp_path)
    batch = write_batch("web01", 1, 7, 2, [Change("system", 4096, TEXT)])
    associated = batch_associated_data("web01", 1, 7, 2, batch.extents)
    compression, sealed, encryption = PayloadPacker(cipher=primary).seal(TEXT, associated)
    assert encryption is not None
    good = dataclasses.replace(
        batch, compression=compression, payload=sealed, encryption=encryption
    )
    flipped = bytearray(sealed)
    flipped[10] ^= 1
    cases = {
        "flipped bit": dataclasses.replace(good, payload=bytes(flipped)),
        "other cycle": dataclasses.replace(good, cycle=8),
        "other batch": dataclasses.replace(good, batch=3),
        "other VM": dataclasses.replace(good, vm="web02"),
        "other epoch": dataclasses.replace(good, epoch=2),
        "moved extent": dataclasses.replace(
            good, extents=(dataclasses.replace(good.extents[0], offset=8192),)
        ),
        "other nonce": dataclasses.replace(
            good, encryption=dataclasses.replace(encryption, nonce=bytes(12))
        ),
    }
    for name, altered in cases.items():
        with pytest.raises(CorruptEventError, match="does not decrypt"):
            PayloadUnpacker(replica).open(altered)
        assert name
    unknown = dataclasses.replace(
        good, encryption=Encryption("AES-256-GCM", "nokey", os.urandom(12))
    )
    with pytest.raises(CorruptEventError, match="which this site does not hold"):
        PayloadUnpacker(replica).open(unknown)
    with pytest.raises(CorruptEventError, match="holds no key of the VM"):
        PayloadUnpacker().open(good)


def test_a_key_wrapped_for_one_site_is_useless_to_another(tmp_path: Path) -> None:
    site_a, site_b = load_site_key(tmp_path / "a"), load_site_key(tmp_path / "b")
    site_c = load_site_key(tmp_path / "c")
    primary = VmKeyRing(tmp_path / "a", "web01", site_a)
    primary.rotate()
    wrapped = primary.wrap_for({"site-b": site_b.public})
    config = VmConfig("web01", 1, (), 30, 0, None, "site-a", 1, wrapped_keys=wrapped)
    thief = VmKeyRing(tmp_path / "c", "web01", site_c)
    assert thief.learn(config, "site-c") == []  # nothing addressed to it
    with pytest.raises(CorruptEventError, match="does not unwrap"):
        thief.learn(config, "site-b")  # claims to be site-b, has not its key
    assert thief.keys == ()


def test_old_keys_are_kept_until_the_retention_has_passed(tmp_path: Path) -> None:
    primary, _ = _pair(tmp_path)
    first = primary.keys[0]
    second = primary.rotate()
    assert primary.current() == second
    retired = next(k for k in primary.keys if k.id == first.id)
    assert retired.retired_ms is not None
    hour = 3_600_000
    assert primary.prune(hour, at_ms=retired.retired_ms + hour) == []
    assert primary.prune(hour, at_ms=retired.retired_ms + hour + 1) == [first.id]
    assert [k.id for k in VmKeyRing(tmp_path / "a", "web01", primary.site_key).keys] == [second.id]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=4096),
    cycle=st.integers(0, 2**40),
    batch=st.integers(0, 1000),
    other=st.integers(1, 2**20),
)
def test_open_inverts_seal_only_in_the_context_it_was_sealed_for(
    data: bytes, cycle: int, batch: int, other: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ring = VmKeyRing(
        tmp_path_factory.mktemp("ring"), "web01", load_site_key(tmp_path_factory.mktemp("k"))
    )
    context = batch_associated_data("web01", 1, cycle, batch, ())
    encryption, sealed = ring.seal(data, context)
    assert ring.open(encryption, sealed, context) == data
    for replayed in (
        batch_associated_data("web01", 1, cycle + other, batch, ()),
        batch_associated_data("web01", 1, cycle, batch + other, ()),
    ):
        with pytest.raises(CorruptEventError):
            ring.open(encryption, sealed, replayed)
