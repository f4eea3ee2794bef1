"""The codec: round trips, the single-object frame, the fingerprint, and every way decode refuses.

Golden files in ``tests/data/codec/``:

* ``golden_<Kind>.bin``: :data:`SAMPLES` as encoded by the first release of the schemas. They
  stand for records already sitting on topics, so they are never regenerated: if one stops
  decoding, a schema changed without its old version being kept in ``schemas/history/``.
* ``corrupt_*.bin``: damaged records, each refused with an exact error.
"""

from __future__ import annotations

import io
import json
from enum import Enum
from pathlib import Path
from typing import Any

import fastavro
import pytest

from vmreplica.errors import (
    CorruptEventError,
    DecodeError,
    UnknownSchemaError,
)
from vmreplica.schemas import codec
from vmreplica.schemas.avro import HEADER_SIZE, MAGIC, canonical_form, crc64_avro, fingerprint_of
from vmreplica.schemas.events import (
    ByteRange,
    Compression,
    Consistency,
    CycleCommit,
    DigestMap,
    DigestRequest,
    DiskResize,
    DiskSize,
    Encryption,
    EpochStart,
    Event,
    Extent,
    ExtentKind,
    FailoverPrepared,
    Heartbeat,
    ReplicaPosition,
    ResyncRequest,
    SeedChunk,
    VmConfig,
    WriteBatch,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "codec"

SAMPLES: tuple[Event, ...] = (
    WriteBatch(
        vm="vm-01",
        epoch=2,
        cycle=41,
        batch=0,
        extents=(
            Extent("disk0", 0, 4096, ExtentKind.DATA, 0, 0x1C291CA3),
            Extent("disk0", 1 << 40, 1 << 20, ExtentKind.ZERO, 0, 0),
            Extent("disk1", 512, 512, ExtentKind.TRIM, 0, 0),
        ),
        compression=Compression.ZSTD,
        payload=b"\x28\xb5\x2f\xfd" + bytes(range(64)),
        signature=b"\x01" * 64,
        encryption=Encryption("AES-256-GCM", "site-key-7", b"\x00" * 12),
    ),
    CycleCommit(
        vm="vm-01",
        epoch=2,
        cycle=41,
        started_at_ms=1_700_000_000_000,
        cut_at_ms=1_700_000_030_000,
        batches=1,
        extents=3,
        bytes_written=4096 + (1 << 20) + 512,
        payload_bytes=68,
        consistency=Consistency.APPLICATION,
        disks=(DiskSize("disk0", 1 << 41), DiskSize("disk1", 1 << 30)),
        previous_hash=b"\xaa" * 32,
        cycle_hash=b"\xbb" * 32,
    ),
    SeedChunk(
        vm="vm-01",
        epoch=1,
        disk="disk0",
        offset=8 << 20,
        length=4 << 20,
        compression=Compression.NONE,
        payload=b"seed",
        crc32=0xFFFFFFFF,
        seed_id="seed-2024-01",
        done=True,
    ),
    EpochStart(
        vm="vm-01",
        epoch=3,
        previous_epoch=2,
        primary_site="site-b",
        start_cycle=42,
        reason="planned-failover",
        at_ms=1_700_000_100_000,
        last_cycle_hash=b"\xbb" * 32,
    ),
    FailoverPrepared(
        vm="vm-01",
        epoch=2,
        final_cycle=41,
        cycle_hash=b"\xbb" * 32,
        at_ms=1_700_000_090_000,
        site="site-a",
    ),
    VmConfig(
        vm="vm-01",
        epoch=1,
        disks=(DiskSize("disk0", 1 << 41),),
        frequency_seconds=30,
        recovery_history=24,
        app_consistent_hours=4,
        primary_site="site-a",
        at_ms=1_700_000_000_000,
    ),
    DiskResize(vm="vm-01", epoch=2, cycle=40, disk="disk1", old_size=1 << 29, new_size=1 << 30),
    Heartbeat(vm="vm-01", epoch=2, site="site-a", at_ms=1_700_000_060_000, last_cycle=-1),
    ReplicaPosition(
        vm="vm-01",
        epoch=2,
        site="site-b",
        cycle=41,
        offset=1234,
        state="replicating",
        health="normal",
        applied_at_ms=1_700_000_031_000,
        at_ms=1_700_000_032_000,
    ),
    DigestMap(
        vm="vm-01",
        epoch=2,
        site="site-b",
        disk="disk0",
        cycle=41,
        block_size=1 << 20,
        digests=bytes(range(32)) * 2,
    ),
    ResyncRequest(
        vm="vm-01",
        epoch=2,
        site="site-b",
        reason="change log lost",
        disk=None,
        ranges=(ByteRange(0, 4096), ByteRange(1 << 30, 1 << 20)),
        at_ms=1_700_000_040_000,
    ),
    # Added with resynchronization: its golden record is the first release of its schema.
    DigestRequest(
        vm="vm-01",
        epoch=2,
        site="site-a",
        replica_sites=("site-b", "site-c"),
        reason="requested by the operator",
        at_ms=1_700_000_050_000,
    ),
)
"""One event of every kind, with awkward values: big offsets, empty and None fields, -1."""


def _plain(value: Any) -> Any:
    """An event as a plain Avro reader returns it: dicts, lists and enum symbols as strings."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def _heartbeat_bytes() -> bytes:
    return codec.encode(Heartbeat(vm="vm-01", epoch=2, site="a", at_ms=5, last_cycle=7))


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_every_kind_round_trips_exactly(event: Event) -> None:
    data = codec.encode(event)

    assert data[:HEADER_SIZE] == MAGIC + codec.fingerprint(type(event).__name__)
    assert codec.decode(data) == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_golden_records_of_the_first_release_still_decode(event: Event) -> None:
    data = (DATA_DIR / f"golden_{type(event).__name__}.bin").read_bytes()

    assert codec.decode(data) == event
    if data[2:HEADER_SIZE] == codec.fingerprint(type(event).__name__):
        # The schema is unchanged since the first release: encoding is byte-identical too.
        assert codec.encode(event) == data


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_plain_fastavro_reads_a_record_given_only_its_avsc_file(event: Event) -> None:
    schema = fastavro.parse_schema(
        json.loads((SCHEMA_DIR / f"{type(event).__name__}.avsc").read_text(encoding="utf-8"))
    )
    body = io.BytesIO(codec.encode(event)[HEADER_SIZE:])

    assert fastavro.schemaless_reader(body, schema) == _plain(event)


def test_journal_and_status_decoders_refuse_the_other_topics_records() -> None:
    heartbeat = _heartbeat_bytes()
    position = codec.encode(SAMPLES[8])

    assert codec.decode_journal(heartbeat) == codec.decode(heartbeat)
    assert codec.decode_status(position) == SAMPLES[8]
    with pytest.raises(DecodeError) as journal_error:
        codec.decode_journal(position)
    with pytest.raises(DecodeError) as status_error:
        codec.decode_status(heartbeat)
    assert str(journal_error.value) == (
        "a ReplicaPosition status record was found where journal records are expected; "
        "check the topic name"
    )
    assert str(status_error.value) == (
        "a Heartbeat journal record was found where status records are expected; "
        "check the topic name"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"",
            "record is 0 bytes, shorter than the 10-byte Avro single-object header (C3 01 + "
            "8-byte schema fingerprint); it is truncated or not a vmreplica record",
        ),
        (
            b"\xc3\x01\x5e\x48",
            "record is 4 bytes, shorter than the 10-byte Avro single-object header (C3 01 + "
            "8-byte schema fingerprint); it is truncated or not a vmreplica record",
        ),
    ],
    ids=["empty", "header-cut"],
)
def test_too_short_records_are_corrupt(data: bytes, message: str) -> None:
    with pytest.raises(CorruptEventError) as error:
        codec.decode(data)

    assert str(error.value) == message


def test_garbage_without_the_marker_is_corrupt() -> None:
    data = (DATA_DIR / "corrupt_json_not_avro.bin").read_bytes()

    with pytest.raises(CorruptEventError) as error:
        codec.decode(data)

    assert str(error.value) == (
        f"record of {len(data)} bytes starts with 7B 22, expected the Avro single-object marker "
        "C3 01; it is not a vmreplica record or is corrupted"
    )
    assert isinstance(error.value, ValueError)


def test_confluent_wire_format_is_refused_by_its_marker() -> None:
    data = b"\x00\x00\x00\x00\x07" + _heartbeat_bytes()[HEADER_SIZE:]

    with pytest.raises(CorruptEventError, match=r"starts with 00 00, expected .* C3 01"):
        codec.decode(data)


def test_unknown_fingerprint_names_it_and_points_at_a_newer_release() -> None:
    data = (DATA_DIR / "corrupt_unknown_fingerprint.bin").read_bytes()

    with pytest.raises(UnknownSchemaError) as error:
        codec.decode(data)

    assert str(error.value) == (
        f"record of {len(data)} bytes names schema fingerprint 0123456789abcdef, which this "
        "vmreplica does not know; it may come from a newer vmreplica: upgrade this site to "
        "the release that wrote it"
    )


def test_truncated_body_is_corrupt() -> None:
    data = (DATA_DIR / "corrupt_truncated_write_batch.bin").read_bytes()

    with pytest.raises(CorruptEventError) as error:
        codec.decode(data)

    assert str(error.value) == (
        f"WriteBatch record of {len(data)} bytes is truncated: its body ends before the record "
        "is complete"
    )


def test_trailing_bytes_after_the_body_are_corrupt() -> None:
    data = (DATA_DIR / "corrupt_trailing_bytes.bin").read_bytes()

    with pytest.raises(CorruptEventError) as error:
        codec.decode(data)

    assert str(error.value) == (
        f"Heartbeat record of {len(data)} bytes has 3 unexpected bytes after its body; it is "
        "corrupted or was framed wrongly"
    )


@pytest.mark.parametrize(
    ("name", "kind", "cause"),
    [
        ("corrupt_invalid_utf8.bin", "Heartbeat", UnicodeDecodeError),
        ("corrupt_enum_index.bin", "SeedChunk", IndexError),
    ],
    ids=["invalid-utf8", "enum-index-out-of-range"],
)
def test_garbled_bodies_are_corrupt(name: str, kind: str, cause: type[Exception]) -> None:
    data = (DATA_DIR / name).read_bytes()

    with pytest.raises(CorruptEventError) as error:
        codec.decode(data)

    assert str(error.value).startswith(
        f"{kind} record of {len(data)} bytes is garbled: {cause.__name__}: "
    )
    assert type(error.value.__cause__) is cause


def test_encode_refuses_what_is_not_an_event() -> None:
    with pytest.raises(TypeError) as error:
        codec.encode(ByteRange(0, 1))  # type: ignore[arg-type]

    assert str(error.value) == "cannot encode ByteRange: not a vmreplica event"


@pytest.mark.parametrize(
    ("event", "error_type", "message"),
    [
        (
            DigestMap("vm", 1, "s", "d", 1, block_size=1 << 31, digests=b""),
            ValueError,
            "DigestMap.block_size = 2147483648 does not fit an Avro int (32 bits)",
        ),
        (
            Heartbeat("vm", 1 << 63, "s", 0, 0),
            ValueError,
            "cannot encode Heartbeat: an integer does not fit an Avro long (64 bits)",
        ),
        (
            SeedChunk("vm", 1, "d", 0, 1, "ZSTD", b"", 0, "s", True),  # type: ignore[arg-type]
            TypeError,
            "SeedChunk.compression must be Compression, not str",
        ),
        (
            ResyncRequest("vm", 1, "s", "r", None, [ByteRange(0, 1)], 0),  # type: ignore[arg-type]
            TypeError,
            "ResyncRequest.ranges must be a tuple, not list",
        ),
        (
            WriteBatch("vm", 1, 1, 0, (ByteRange(0, 1),), Compression.NONE, b""),  # type: ignore[arg-type]
            TypeError,
            "WriteBatch.extents[] must be Extent, not ByteRange",
        ),
    ],
    ids=["int-range", "long-range", "enum-as-str", "list-not-tuple", "wrong-record"],
)
def test_encode_names_the_field_that_does_not_fit(
    event: Event, error_type: type[Exception], message: str
) -> None:
    with pytest.raises(error_type) as error:
        codec.encode(event)

    assert str(error.value) == message


def test_crc64_avro_matches_the_specification() -> None:
    assert crc64_avro(b"") == 0xC15D213AA4D7A795
    vectors = {
        '"null"': 7195948357588979594,
        '"int"': 8247732601305521295,
        '"string"': -8142146995180207161,
        '{"name":"x.y.foo","type":"record","fields":[]}': 5916914534497305771,
        '{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}': -4448647247586288245,
        '{"type":"array","items":"null"}': -589620603366471059,
    }
    for canonical, signed in vectors.items():
        assert crc64_avro(canonical.encode()) == signed % (1 << 64), canonical


@pytest.mark.parametrize("name", codec.schema_names())
def test_fingerprints_match_fastavros_crc64_avro(name: str) -> None:
    raw = codec.load_schema(name)
    expected = fastavro.schema.fingerprint(canonical_form(raw), "CRC-64-AVRO")

    assert fingerprint_of(raw).hex() == expected
    assert codec.fingerprint(name) == bytes.fromhex(expected)


def test_a_heartbeat_says_when_nothing_waited() -> None:
    """Schema version 2 of Heartbeat adds ``idle_at_ms``; a heartbeat that does not set it (as
    none of the first release did: the golden records above) reads as one where writes may
    wait, never as an idle one."""
    idle = Heartbeat("vm-01", 2, "site-a", 1_700_000_090_000, 41, idle_at_ms=1_700_000_089_950)
    assert codec.decode_journal(codec.encode(idle)) == idle
    plain = codec.decode_journal(_heartbeat_bytes())
    assert isinstance(plain, Heartbeat)
    assert plain.idle_at_ms is None
