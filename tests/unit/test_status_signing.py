"""Signed status records, without a broker.

A replica site signs what it reports to its primary (positions, digest maps, resync requests)
with its site key, as primaries sign their journals. A site with authorization entries uses a
status record only when a key an entry lists for the reporting site signed it; anything else is
refused with :class:`UntrustedStatusError` naming the record's offset, and
:meth:`Site.trusted_status` turns that refusal into a warning, an event in the VM's log and
nothing used. A site without entries stays open.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.events import EventId, EventLevel
from vmreplica.errors import UntrustedStatusError
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status, encode
from vmreplica.schemas.events import (
    STATUS_EVENT_TYPES,
    ByteRange,
    DigestMap,
    ReplicaPosition,
    ResyncRequest,
    StatusEvent,
)
from vmreplica.security.authorization import AuthorizationEntry, AuthorizationStore, StatusVerifier
from vmreplica.security.signing import (
    ENDORSED,
    PLAIN,
    load_site_key,
    record_signed_message,
    rotate_site_key,
    signed_message,
)
from vmreplica.storage import history

POSITION = ReplicaPosition("web01", 3, "site-b", 41, 977, "replicating", "normal", 5, 6)
DIGESTS = DigestMap("web01", 3, "site-b", "system", 41, 65536, bytes(range(32)) * 4)
REQUEST = ResyncRequest(
    "web01", 3, "site-b", "diverged after cycle 40", "system", (ByteRange(0, 4096),), 7
)
ALL_KINDS: tuple[StatusEvent, ...] = (
    POSITION,
    DIGESTS,
    REQUEST,
    dataclasses.replace(REQUEST, disk=None, ranges=()),
)


def _primary(tmp_path: Path, replica: str = "site-b") -> tuple[StatusVerifier, Path]:
    """A primary (site-a) that trusts ``replica``'s key; returns it and the replica's root."""
    replica_root = tmp_path / "b"
    public = load_site_key(replica_root).public_text
    store = AuthorizationStore(tmp_path / "a")
    store.add(AuthorizationEntry(replica, "default", str(tmp_path / "store"), (public,)))
    return StatusVerifier(store, "default", "web01"), replica_root


def test_every_status_kind_is_covered() -> None:
    assert {type(event) for event in ALL_KINDS} == set(STATUS_EVENT_TYPES)


@pytest.mark.parametrize("event", ALL_KINDS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("rotated", [False, True])
def test_every_status_kind_is_signed_spliced_and_verifies_after_the_wire(
    tmp_path: Path, event: StatusEvent, rotated: bool
) -> None:
    verifier, root = _primary(tmp_path)
    if rotated:
        rotate_site_key(root)  # the primary learns the new key from its endorsement
    record = load_site_key(root).encode(event)
    decoded = decode_status(record)
    assert decoded.signature is not None
    assert decoded.signature[0] == (ENDORSED if rotated else PLAIN)
    assert record == encode(decoded)
    assert dataclasses.replace(decoded, signature=None) == event
    assert record_signed_message(record, decoded) == signed_message(decoded)
    verifier.check(decoded, 12, record)
    verifier.check(decoded, 12)
    assert len(verifier.store.entries()[0].keys) == (2 if rotated else 1)


def test_an_unsigned_status_record_is_refused_naming_its_offset(tmp_path: Path) -> None:
    verifier, _ = _primary(tmp_path)
    with pytest.raises(UntrustedStatusError) as refused:
        verifier.check(POSITION, 42)
    assert str(refused.value).startswith(
        "VM 'web01', status offset 42: refused an untrusted record: ReplicaPosition is not "
        "signed, and this site requires signatures. Nothing of it was used. Operator action:"
    )
    assert refused.value.offset == 42


def test_a_forged_digest_map_or_position_is_refused(tmp_path: Path) -> None:
    verifier, root = _primary(tmp_path)
    forger = load_site_key(tmp_path / "forger")
    for forged in (DIGESTS, POSITION, REQUEST):
        record = forger.encode(forged)
        with pytest.raises(UntrustedStatusError, match="which no authorization entry lists"):
            verifier.check(decode_status(record), 3, record)
    signed = load_site_key(root).sign(DIGESTS)
    altered = bytearray(signed.digests)
    altered[0] ^= 0x01
    for changed in (
        dataclasses.replace(signed, digests=bytes(altered)),
        dataclasses.replace(signed, cycle=42),
        dataclasses.replace(signed, epoch=4),
        dataclasses.replace(signed, disk="data"),
    ):
        with pytest.raises(UntrustedStatusError, match="does not verify"):
            verifier.check(changed, 4)


def test_a_status_record_is_a_record_of_the_site_it_names(tmp_path: Path) -> None:
    verifier, root = _primary(tmp_path)
    key = load_site_key(root)
    with pytest.raises(UntrustedStatusError, match="site 'site-x', which no authorization"):
        verifier.check(key.sign(dataclasses.replace(POSITION, site="site-x")), 5)


def test_a_site_without_entries_uses_unsigned_status_records(tmp_path: Path) -> None:
    StatusVerifier(AuthorizationStore(tmp_path), "default", "web01").check(POSITION, 1)


async def test_the_site_logs_a_refused_status_record_and_uses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replica_key = load_site_key(tmp_path / "b")
    forger = load_site_key(tmp_path / "forger")
    config = SiteConfig(site="site-a", root=tmp_path / "a", bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site:
        site.authorization.add(
            AuthorizationEntry(
                "site-b", "default", str(tmp_path / "store"), (replica_key.public_text,)
            )
        )
        genuine = replica_key.encode(POSITION)
        assert await site.trusted_status("web01", 1, genuine) == decode_status(genuine)
        with caplog.at_level(logging.WARNING):
            assert await site.trusted_status("web01", 2, forger.encode(DIGESTS)) is None
            assert await site.trusted_status("web01", 3, encode(POSITION), note=False) is None
        logged = [r.getMessage() for r in caplog.records]
        assert logged[0].startswith("VM 'web01', status offset 2: refused an untrusted record")
        assert logged[1].startswith("VM 'web01', status offset 3: refused an untrusted record")
        (event,) = await history.events(site.catalog, "web01")
        assert event.event_id == EventId.UNTRUSTED_STATUS_REFUSED
        assert event.level is EventLevel.WARNING
        assert event.message == logged[0]
