"""Site keys, journal signatures and authorization entries, without a broker.

A verifying site (one with entries) applies only records a listed key signed for the site that
speaks; each way of getting that wrong is refused with :class:`UntrustedRecordError` naming the
record's offset. A site with no entry is open (the documented rule).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.errors import ConfigurationError, UntrustedRecordError
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import (
    JOURNAL_EVENT_TYPES,
    Compression,
    DigestRequest,
    DiskResize,
    DiskSize,
    Encryption,
    EpochStart,
    FailoverPrepared,
    Heartbeat,
    JournalEvent,
    SeedChunk,
    VmConfig,
)
from vmreplica.security.authorization import (
    AuthorizationEntry,
    AuthorizationStore,
    JournalVerifier,
    matches,
)
from vmreplica.security.signing import (
    ENDORSED,
    PLAIN,
    load_site_key,
    parse_public_key,
    record_signed_message,
    rotate_site_key,
    signed_message,
)

BATCH = write_batch("web01", 1, 1, 0, [Change("system", 0, os.urandom(4096))])
COMMIT = cycle_commit("web01", 1, 1, [BATCH], GENESIS_HASH, {"system": 1 << 20})
CONFIG = VmConfig("web01", 1, (DiskSize("system", 1 << 20),), 30, 0, None, "site-a", 1)
PREPARED = FailoverPrepared("web01", 1, 1, COMMIT.cycle_hash, 5, "site-a", target="site-b")


def _verifier(tmp_path: Path, primary: str = "site-a") -> tuple[JournalVerifier, Path]:
    """A replica site (site-b) that trusts site-a's key; returns it and site-a's root."""
    primary_root = tmp_path / "a"
    public = load_site_key(primary_root).public_text
    store = AuthorizationStore(tmp_path / "b")
    store.add(AuthorizationEntry(primary, "default", str(tmp_path / "store"), (public,)))
    return JournalVerifier(store, "default", "web01", "site-a"), primary_root


def _round_trip(event: JournalEvent) -> JournalEvent:
    return decode_journal(encode(event))


def test_the_key_is_created_once_private_to_the_owner_and_stable(tmp_path: Path) -> None:
    first = load_site_key(tmp_path)
    key_file = tmp_path / "keys" / "site-ed25519.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert load_site_key(tmp_path).public == first.public
    assert parse_public_key(first.public_text) == first.public


@pytest.mark.parametrize(
    "event", [BATCH, COMMIT, CONFIG, PREPARED, Heartbeat("web01", 1, "site-a", 9, 1)]
)
def test_every_signed_kind_verifies_after_the_wire(tmp_path: Path, event: JournalEvent) -> None:
    verifier, root = _verifier(tmp_path)
    signed = _round_trip(load_site_key(root).sign(event))
    assert signed.signature is not None
    assert signed.signature[0] == PLAIN
    verifier.check(signed, 7)


def test_an_unsigned_record_is_refused_naming_its_offset(tmp_path: Path) -> None:
    verifier, _ = _verifier(tmp_path)
    with pytest.raises(UntrustedRecordError) as refused:
        verifier.check(PREPARED, 42)
    assert str(refused.value).startswith(
        "VM 'web01', journal offset 42: refused an untrusted record: FailoverPrepared is not "
        "signed, and this site requires signatures. Nothing of it was applied."
    )
    assert refused.value.state.value == "error"


def test_a_record_signed_by_an_unlisted_key_is_refused(tmp_path: Path) -> None:
    verifier, _ = _verifier(tmp_path)
    forger = load_site_key(tmp_path / "forger")
    with pytest.raises(UntrustedRecordError, match="which no authorization entry lists"):
        verifier.check(forger.sign(PREPARED), 3)


def _flip_last(signature: bytes | None) -> bytes:
    assert signature is not None
    return signature[:-1] + bytes([signature[-1] ^ 0x01])


def test_a_flipped_bit_anywhere_in_the_record_is_refused(tmp_path: Path) -> None:
    verifier, root = _verifier(tmp_path)
    signed = load_site_key(root).sign(BATCH)
    payload = bytearray(BATCH.payload)
    payload[100] ^= 0x04
    for altered in (
        dataclasses.replace(signed, payload=bytes(payload)),
        # the last byte of the signature flipped (not set: it may be that value already)
        dataclasses.replace(signed, signature=_flip_last(signed.signature)),
    ):
        with pytest.raises(UntrustedRecordError, match="does not verify"):
            verifier.check(altered, 1)


def test_a_record_replayed_under_another_cycle_or_batch_is_refused(tmp_path: Path) -> None:
    verifier, root = _verifier(tmp_path)
    signed = load_site_key(root).sign(BATCH)
    for replayed in (
        dataclasses.replace(signed, cycle=2),
        dataclasses.replace(signed, batch=1),
        dataclasses.replace(signed, epoch=2),
    ):
        with pytest.raises(UntrustedRecordError, match="does not verify"):
            verifier.check(replayed, 1)


def test_a_key_only_speaks_for_the_sites_its_entry_allows(tmp_path: Path) -> None:
    verifier, root = _verifier(tmp_path)
    key = load_site_key(root)
    with pytest.raises(UntrustedRecordError, match="site 'site-x', which no authorization"):
        verifier.check(key.sign(dataclasses.replace(PREPARED, site="site-x")), 5)
    # records that name no site speak for the VM's primary, which a verified epoch moves
    start = EpochStart("web01", 2, 1, "site-x", 2, "failover", 1, COMMIT.cycle_hash)
    with pytest.raises(UntrustedRecordError):
        verifier.check(key.sign(start), 6)
    verifier.check(key.sign(COMMIT), 7)


def test_patterns_match_whole_names_with_star_for_any_run() -> None:
    assert matches("site-*", "site-a")
    assert matches("*", "anything")
    assert not matches("site-*", "xsite-a")
    assert not matches("site-a", "site-ab")


def test_a_site_without_entries_is_open(tmp_path: Path) -> None:
    open_site = JournalVerifier(AuthorizationStore(tmp_path), "default", "web01", "site-a")
    open_site.check(PREPARED, 1)  # no entry: unsigned records pass (documented rule)


def test_a_rotated_key_is_learnt_from_its_endorsement_and_kept(tmp_path: Path) -> None:
    verifier, root = _verifier(tmp_path)
    old_public = load_site_key(root).public_text
    new, _ = rotate_site_key(root)
    assert load_site_key(root).public == new.public
    signed = _round_trip(new.sign(COMMIT))
    assert signed.signature is not None
    assert signed.signature[0] == ENDORSED
    verifier.check(signed, 9)
    keys = verifier.store.entries()[0].keys
    assert keys == (old_public, new.public_text)
    # a forger cannot endorse its own key with a key it does not hold
    forger = load_site_key(tmp_path / "forger")
    fake = dataclasses.replace(forger, endorsement=new.endorsement)
    with pytest.raises(UntrustedRecordError):
        verifier.check(fake.sign(COMMIT), 10)


SEED = SeedChunk("web01", 1, "system", 0, 4096, Compression.NONE, bytes(4096), 0, "s", False)
ALL_KINDS = (
    BATCH,
    dataclasses.replace(BATCH, encryption=Encryption("AES-256-GCM", "k1", bytes(12))),
    COMMIT,
    SEED,
    dataclasses.replace(SEED, encryption=Encryption("AES-256-GCM", "k1", bytes(12))),
    EpochStart("web01", 2, 1, "site-a", 2, "failover", 1, COMMIT.cycle_hash, ("site-c",)),
    PREPARED,
    DigestRequest("web01", 1, "site-a", ("site-b",), "resync", 1),
    CONFIG,
    DiskResize("web01", 1, 2, "system", 1 << 20, 2 << 20),
    Heartbeat("web01", 1, "site-a", 9, 1, 8),
)


def test_every_journal_kind_is_covered() -> None:
    assert {type(event) for event in ALL_KINDS} == set(JOURNAL_EVENT_TYPES)


@pytest.mark.parametrize("event", ALL_KINDS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("rotated", [False, True])
def test_the_spliced_signature_is_exactly_the_full_encoding(
    tmp_path: Path, event: JournalEvent, rotated: bool
) -> None:
    """SiteKey.encode splices the signature into the unsigned encoding, and the verifier hashes
    the received bytes without re-encoding: both must agree with the codec, for every kind."""
    if rotated:
        load_site_key(tmp_path)
        rotate_site_key(tmp_path)
    key = load_site_key(tmp_path)
    record = key.encode(event)
    decoded = decode_journal(record)
    assert record == encode(decoded)
    assert dataclasses.replace(decoded, signature=None) == event
    assert record_signed_message(record, decoded) == signed_message(decoded)


def test_the_signature_covers_the_unsigned_encoding(tmp_path: Path) -> None:
    key = load_site_key(tmp_path)
    signed = key.sign(CONFIG)
    assert signed_message(signed) == signed_message(CONFIG)
    assert signed_message(dataclasses.replace(CONFIG, frequency_seconds=31)) != signed_message(
        CONFIG
    )


def test_entries_are_checked_and_changed_whole(tmp_path: Path) -> None:
    store = AuthorizationStore(tmp_path)
    key = load_site_key(tmp_path / "a").public_text
    other = load_site_key(tmp_path / "c").public_text
    store.add(AuthorizationEntry("site-a", "default", str(tmp_path / "s"), (key,)))
    with pytest.raises(ConfigurationError, match="exists already"):
        store.add(AuthorizationEntry("site-a", "default", str(tmp_path / "s"), (key,)))
    with pytest.raises(ConfigurationError, match="needs at least one key"):
        store.set("site-a", "default", remove_keys=[key])
    changed = store.set("site-a", "default", add_keys=[other], remove_keys=[key])
    assert changed.keys == (other,)
    assert AuthorizationStore(tmp_path).entries() == (changed,)
    with pytest.raises(ConfigurationError, match="no authorization entry for 'site-z'"):
        store.remove("site-z", "default")
    store.remove("site-a", "default")
    assert store.entries() == ()
