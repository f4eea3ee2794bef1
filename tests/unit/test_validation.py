"""Every value of a record read from a topic is checked before use (``schemas/validation.py``).

A record that decodes but holds a name that could escape a folder, a negative offset, an empty
range, or a size or count beyond its bound is refused by ``decode_journal``/``decode_status``
with :class:`InvalidEventError` and an exact message naming the field. The bounds sit above what
the producers write (tied here to the producers' own constants), so real records pass; and the
places that turn a record's names into paths refuse bad ones themselves.
"""

from __future__ import annotations

import typing
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest

from producers.seed import SEED_CHUNK_BYTES
from producers.shipper import BATCH_MAX_EXTENTS, BATCH_PAYLOAD_BYTES
from vmreplica.consumers.points import export_point
from vmreplica.consumers.replica import _open_images, image_path
from vmreplica.domain.model import DiskRecord, RecoveryPoint, VmRecord, VmSettings
from vmreplica.domain.names import check_name
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, DecodeError, InvalidEventError
from vmreplica.failover import divergence
from vmreplica.journal.kafka import MAX_RECORD_BYTES
from vmreplica.schemas import codec, validation
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import (
    JOURNAL_EVENT_TYPES,
    ByteRange,
    Compression,
    Consistency,
    CycleCommit,
    DigestMap,
    DiskDigest,
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
from vmreplica.schemas.payload import MAX_PAYLOAD_BYTES
from vmreplica.storage import digests

HASH: Final = b"\x11" * 32
AT: Final = 1_700_000_000_000
NAME_RULE: Final = (
    "is not allowed: use 1-64 letters, digits, '-' or '_', starting with a "
    "letter or digit (no dots, slashes or spaces)"
)

BATCH: Final = WriteBatch(
    "vm-01",
    2,
    41,
    0,
    (
        Extent("disk0", 0, 4096, ExtentKind.DATA, 0, 0x1C291CA3),
        Extent("disk0", 1 << 40, 1 << 20, ExtentKind.ZERO, 0, 0),
        Extent("disk1", 512, 512, ExtentKind.TRIM, 0, 0),
    ),
    Compression.NONE,
    b"d" * 4096,
    b"\x01" * 64,
    Encryption("AES-256-GCM", "key-7", bytes(12)),
)
COMMIT: Final = CycleCommit(
    "vm-01",
    2,
    41,
    AT,
    AT + 30_000,
    1,
    3,
    4096 + (1 << 20) + 512,
    4096,
    Consistency.APPLICATION,
    (DiskSize("disk0", 1 << 41), DiskSize("disk1", 1 << 30)),
    HASH,
    b"\x22" * 32,
)
CONFIG: Final = VmConfig(
    "vm-01",
    1,
    (DiskSize("disk0", 1 << 30), DiskSize("disk1", 0)),
    30,
    4,
    2,
    "site-a",
    AT,
    ("site-b", "site-c"),
    None,
)
VALID: Final[tuple[Event, ...]] = (
    BATCH,
    COMMIT,
    SeedChunk(
        "vm-01", 1, "disk0", 8 << 20, 4 << 20, Compression.ZSTD, b"z", 7, "vm-01-1-ab", False
    ),
    SeedChunk("vm-01", 1, "", 0, 0, Compression.NONE, b"", 0, "vm-01-1-ab", True),  # done
    EpochStart("vm-01", 1, 0, "site-a", 1, "initial replication", AT, GENESIS_HASH),
    EpochStart("vm-01", 3, 3, "site-b", 42, "extended replication", AT, HASH),  # same epoch
    EpochStart("vm-01", 4, 3, "site-b", 42, "reverse", AT, HASH, ("site-a",)),
    FailoverPrepared("vm-01", 2, 0, HASH, AT, "site-a", True, (DiskDigest("disk0", "ab" * 32),)),
    FailoverPrepared("vm-01", 2, 0, HASH, AT, "site-a", target="site-c"),
    CONFIG,
    replace(
        CONFIG,
        capture="nbd",
        compression=False,
        continuous_max_bytes=1,
        changelog_budget_bytes=1 << 30,
    ),
    DiskResize("vm-01", 2, 40, "disk1", 1 << 29, 1 << 30),
    Heartbeat("vm-01", 2, "site-a", AT, -1),
    ReplicaPosition("vm-01", 2, "site-b", 41, 1234, "replicating", "normal", AT, AT),
    DigestMap("vm-01", 2, "site-b", "disk0", 41, 64 * 1024, bytes(32)),
    ResyncRequest(
        "vm-01",
        2,
        "site-b",
        "diverged after cycle 40",
        None,
        (ByteRange(0, 4096), ByteRange(1 << 30, 1 << 20)),
        AT,
    ),
)
"""Records as the producers write them, with the edge values they may hold."""


def _decode(event: Event) -> Event:
    data = codec.encode(event)
    if isinstance(event, JOURNAL_EVENT_TYPES):
        return codec.decode_journal(data)
    return codec.decode_status(data)


def _refusal(event: Event) -> str:
    with pytest.raises(InvalidEventError) as caught:
        _decode(event)
    assert isinstance(caught.value, DecodeError)  # callers that handle DecodeError handle it
    assert caught.value.kind == type(event).__name__
    return str(caught.value)


@pytest.mark.parametrize("event", VALID, ids=lambda event: type(event).__name__)
def test_records_as_the_producers_write_them_pass(event: Event) -> None:
    assert _decode(event) == event


def _disk(name: str, size: int = 1 << 20) -> VmConfig:
    return replace(CONFIG, disks=(DiskSize(name, size),))


def _extent(
    offset: int,
    length: int,
    kind: ExtentKind = ExtentKind.ZERO,
    payload_offset: int = 0,
    crc32: int = 0,
) -> WriteBatch:
    return replace(BATCH, extents=(Extent("disk0", offset, length, kind, payload_offset, crc32),))


TiB: Final = 1 << 40
REFUSED: Final[list[tuple[str, Event, str]]] = [
    # names: the ones that would become paths outside the storage root
    (
        "dot-dot",
        _disk("../../x"),
        f"invalid VmConfig record: disks[0]: disk name '../../x' {NAME_RULE}",
    ),
    (
        "absolute",
        _disk("/abs/x"),
        f"invalid VmConfig record: disks[0]: disk name '/abs/x' {NAME_RULE}",
    ),
    ("nul", _disk("a\x00b"), f"invalid VmConfig record: disks[0]: disk name 'a\\x00b' {NAME_RULE}"),
    (
        "1000-chars",
        _disk("x" * 1000),
        "invalid VmConfig record: disks[0]: disk name "
        f"'{'x' * 40}'... (1000 characters) {NAME_RULE}",
    ),
    (
        "vm-name",
        replace(BATCH, vm="../vm"),
        f"invalid WriteBatch record: vm: VM name '../vm' {NAME_RULE}",
    ),
    (
        "extent-disk",
        replace(BATCH, extents=(Extent("..", 0, 1, ExtentKind.TRIM, 0, 0),)),
        f"invalid WriteBatch record: extents[0].disk: disk name '..' {NAME_RULE}",
    ),
    (
        "primary-site",
        replace(CONFIG, primary_site="a/b"),
        f"invalid VmConfig record: primary_site: site name 'a/b' {NAME_RULE}",
    ),
    (
        "replica-site",
        replace(CONFIG, replica_sites=("site-b", "")),
        f"invalid VmConfig record: replica_sites[1]: site name '' {NAME_RULE}",
    ),
    (
        "resync-site",
        EpochStart("vm-01", 4, 3, "site-b", 42, "r", AT, HASH, ("..",)),
        f"invalid EpochStart record: resync_sites[0]: site name '..' {NAME_RULE}",
    ),
    (
        "digest-disk",
        DigestMap("vm-01", 2, "site-b", "../d", 4, 65536, b""),
        f"invalid DigestMap record: disk: disk name '../d' {NAME_RULE}",
    ),
    (
        "seed-disk",
        SeedChunk("vm-01", 1, "/etc/x", 0, 1, Compression.NONE, b"x", 0, "s", False),
        f"invalid SeedChunk record: disk: disk name '/etc/x' {NAME_RULE}",
    ),
    (
        "disk-twice",
        replace(CONFIG, disks=(DiskSize("disk0", 1), DiskSize("disk0", 2))),
        "invalid VmConfig record: disks names disk 'disk0' twice",
    ),
    (
        "target-site",
        FailoverPrepared("vm-01", 2, 0, HASH, AT, "site-a", target="../b"),
        f"invalid FailoverPrepared record: target: site name '../b' {NAME_RULE}",
    ),
    # how a replica that takes over captures: nothing this version cannot do
    (
        "capture",
        replace(CONFIG, capture="shell"),
        "invalid VmConfig record: capture 'shell' is none of api, nbd, scan",
    ),
    (
        "continuous-bytes",
        replace(CONFIG, continuous_max_bytes=0),
        "invalid VmConfig record: "
        "continuous_max_bytes is 0 bytes; allowed: 1 to 70368744177664 bytes",
    ),
    (
        "budget",
        replace(CONFIG, changelog_budget_bytes=-1),
        "invalid VmConfig record: "
        "changelog_budget_bytes is -1 bytes; allowed: 1 to 70368744177664 bytes",
    ),
    # sizes
    (
        "huge-disk",
        _disk("disk0", 2**62),
        "invalid VmConfig record: disks[0].size_bytes is "
        "4611686018427387904 bytes, larger than the largest disk vmreplica accepts (64 TiB)",
    ),
    (
        "negative-disk",
        _disk("disk0", -1),
        "invalid VmConfig record: disks[0].size_bytes is -1 bytes: a size cannot be negative",
    ),
    (
        "resize",
        DiskResize("vm-01", 1, 1, "disk0", 1, 2**63 - 1),
        "invalid DiskResize record: "
        "new_size is 9223372036854775807 bytes, larger than the largest disk vmreplica accepts "
        "(64 TiB)",
    ),
    (
        "commit-disk",
        replace(COMMIT, disks=(DiskSize("disk0", 65 * TiB),)),
        "invalid CycleCommit "
        "record: disks[0].size_bytes is 71468255805440 bytes, larger than the largest disk "
        "vmreplica accepts (64 TiB)",
    ),
    # offsets and lengths: a negative offset or an empty range says so, not "past the end"
    (
        "negative-offset",
        _extent(-4096, 4096),
        "invalid WriteBatch record: extents[0]: offset -4096 is negative",
    ),
    (
        "zero-length",
        _extent(0, 0),
        "invalid WriteBatch record: extents[0]: length 0 is not "
        "positive: a range covers at least one byte",
    ),
    (
        "negative-length",
        _extent(4096, -512),
        "invalid WriteBatch record: extents[0]: length "
        "-512 is not positive: a range covers at least one byte",
    ),
    (
        "far-offset",
        _extent(2**62, 4096),
        "invalid WriteBatch record: extents[0]: 4096 bytes at "
        "4611686018427387904 end beyond the largest disk vmreplica accepts (64 TiB)",
    ),
    (
        "huge-data",
        _extent(0, 2**30, ExtentKind.DATA),
        "invalid WriteBatch record: "
        "extents[0].length is 1073741824 bytes; allowed: 1 to 67108864 bytes",
    ),
    (
        "payload-offset",
        _extent(0, 4096, ExtentKind.DATA, -1),
        "invalid WriteBatch record: "
        "extents[0].payload_offset is -1 bytes; allowed: 0 to 67104768 bytes",
    ),
    (
        "zero-with-data",
        _extent(0, 10, ExtentKind.ZERO, 5),
        "invalid WriteBatch record: "
        "extents[0] is ZERO but carries payload_offset 5 and crc32 0; both must be 0",
    ),
    (
        "crc",
        _extent(0, 10, ExtentKind.DATA, 0, -1),
        "invalid WriteBatch record: extents[0].crc32 is -1; allowed: 0 to 4294967295",
    ),
    (
        "seed-empty",
        SeedChunk("vm-01", 1, "disk0", 0, 0, Compression.NONE, b"", 0, "s", False),
        "invalid SeedChunk record: chunk: length 0 is not positive: a range covers at least one "
        "byte",
    ),
    (
        "seed-done-data",
        SeedChunk("vm-01", 1, "", 0, 5, Compression.NONE, b"", 0, "s", True),
        "invalid SeedChunk record: the done marker carries data (5 bytes at 0, a payload of 0 "
        "bytes)",
    ),
    (
        "resync-range",
        ResyncRequest("vm-01", 2, "site-b", "r", None, (ByteRange(-1, 1),), AT),
        "invalid ResyncRequest record: ranges[0]: offset -1 is negative",
    ),
    # block sizes
    (
        "block-1",
        DigestMap("vm-01", 2, "site-b", "disk0", 4, 1, bytes(32)),
        "invalid DigestMap "
        "record: block_size is 1 bytes; it must be a power of two from 4096 to 1073741824 bytes",
    ),
    (
        "block-odd",
        DigestMap("vm-01", 2, "site-b", "disk0", 4, 65537, bytes(32)),
        "invalid "
        "DigestMap record: block_size is 65537 bytes; it must be a power of two from 4096 to "
        "1073741824 bytes",
    ),
    (
        "digest-bytes",
        DigestMap("vm-01", 2, "site-b", "disk0", 4, 65536, bytes(33)),
        "invalid "
        "DigestMap record: digests are 33 bytes; expected whole 16-byte digests, at most 262144 "
        "of them",
    ),
    # counts
    (
        "disks-none",
        replace(CONFIG, disks=()),
        "invalid VmConfig record: disks holds 0 items; allowed: 1 to 256",
    ),
    (
        "disks-300",
        replace(CONFIG, disks=tuple(DiskSize(f"d{i}", 1) for i in range(300))),
        "invalid VmConfig record: disks holds 300 items; allowed: 1 to 256",
    ),
    (
        "extents",
        replace(BATCH, extents=(Extent("disk0", 0, 1, ExtentKind.ZERO, 0, 0),) * 65537),
        "invalid WriteBatch record: extents holds 65537 items; allowed: 0 to 65536",
    ),
    (
        "ranges",
        ResyncRequest("vm-01", 2, "site-b", "r", "disk0", (ByteRange(0, 1),) * 65537, AT),
        "invalid ResyncRequest record: ranges holds 65537 items; allowed: 0 to 65536",
    ),
    (
        "batch-index",
        replace(BATCH, batch=-1),
        "invalid WriteBatch record: batch is -1; allowed: 0 to 1048575",
    ),
    (
        "commit-batches",
        replace(COMMIT, batches=1 << 21),
        "invalid CycleCommit record: batches is 2097152; allowed: 0 to 1048576",
    ),
    # sequence numbers, times, hashes, text, settings
    (
        "cycle",
        replace(BATCH, cycle=-3),
        "invalid WriteBatch record: cycle is -3; allowed: 0 to 9007199254740992",
    ),
    (
        "epoch",
        replace(COMMIT, epoch=2**62),
        "invalid CycleCommit record: epoch is 4611686018427387904; allowed: 0 to 9007199254740992",
    ),
    (
        "epoch-back",
        EpochStart("vm-01", 2, 3, "site-a", 1, "", AT, HASH),
        "invalid EpochStart record: previous_epoch is 3; allowed: 0 to 2",
    ),
    (
        "start-cycle",
        EpochStart("vm-01", 2, 1, "site-a", 0, "", AT, HASH),
        "invalid EpochStart record: start_cycle is 0; allowed: 1 to 9007199254740992",
    ),
    (
        "last-cycle",
        Heartbeat("vm-01", 2, "site-a", AT, -2),
        "invalid Heartbeat record: last_cycle is -2; allowed: -1 to 9007199254740992",
    ),
    (
        "time",
        Heartbeat("vm-01", 2, "site-a", -5, 1),
        "invalid Heartbeat record: at_ms is -5 ms; allowed: 0 to 253402300799999 ms",
    ),
    (
        "hash",
        replace(COMMIT, previous_hash=bytes(31)),
        "invalid CycleCommit record: previous_hash is 31 bytes; a SHA-256 hash is 32",
    ),
    (
        "sha256",
        FailoverPrepared("vm-01", 2, 3, HASH, AT, "site-a", False, (DiskDigest("disk0", "ABC"),)),
        "invalid FailoverPrepared record: disk_sha256[0].sha256 'ABC' is not 64 lowercase hex "
        "digits",
    ),
    (
        "escape-codes",
        ResyncRequest("vm-01", 2, "site-b", "r\x1b[2J", None, (), AT),
        "invalid ResyncRequest record: reason 'r\\x1b[2J' is not one line of printable text",
    ),
    (
        "long-reason",
        EpochStart("vm-01", 2, 1, "site-a", 1, "r" * 1025, AT, HASH),
        "invalid EpochStart record: reason is 1025 characters; at most 1024 are allowed",
    ),
    (
        "state",
        ReplicaPosition("vm-01", 2, "site-b", 1, 1, "bogus", "normal", AT, AT),
        "invalid ReplicaPosition record: state 'bogus' is not a replication state",
    ),
    (
        "frequency",
        replace(CONFIG, frequency_seconds=7),
        "invalid VmConfig record: settings: "
        "replication frequency must be 30, 300, 900 seconds or continuous, not 7",
    ),
    (
        "history",
        replace(CONFIG, recovery_history=10_000),
        "invalid VmConfig record: settings: recovery history must be 0-24 hours, got 10000",
    ),
    (
        "signature",
        replace(BATCH, signature=bytes(513)),
        "invalid WriteBatch record: signature is 513 bytes; allowed: 1 to 512",
    ),
    (
        "nonce",
        replace(BATCH, encryption=Encryption("AES-256-GCM", "k", bytes(65))),
        "invalid WriteBatch record: encryption.nonce is 65 bytes; at most 64 are allowed",
    ),
]


@pytest.mark.parametrize(
    ("event", "message"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_a_record_with_a_bad_value_is_refused_where_it_is_decoded(
    event: Event, message: str
) -> None:
    assert _refusal(event) == message


def test_the_plain_decode_reads_the_format_alone() -> None:
    """Tools and round-trip tests still read any well-formed record; topic readers never."""
    bad = _disk("../../x")
    assert codec.decode(codec.encode(bad)) == bad


def test_the_bounds_sit_above_what_the_producers_write() -> None:
    assert BATCH_MAX_EXTENTS <= validation.MAX_EXTENTS_PER_BATCH
    assert BATCH_PAYLOAD_BYTES <= MAX_PAYLOAD_BYTES
    assert SEED_CHUNK_BYTES <= MAX_PAYLOAD_BYTES
    assert MAX_RECORD_BYTES <= MAX_PAYLOAD_BYTES  # a raw payload cannot outgrow its record
    assert divergence.MAX_RESYNC_RANGES <= validation.MAX_RESYNC_RANGES
    assert digests.DIGEST_BLOCKS_MAX == validation.MAX_DIGEST_BLOCKS
    assert digests.DIGEST_BYTES == validation.DIGEST_BYTES
    assert len(GENESIS_HASH) == validation.HASH_BYTES
    for size in (0, 1, 16 << 30, (16 << 30) + 1, 3 * TiB + 5, validation.MAX_DISK_BYTES):
        block = digests.digest_block_bytes(size)
        assert validation.MIN_DIGEST_BLOCK_BYTES <= block <= validation.MAX_DIGEST_BLOCK_BYTES
        sent = DigestMap(
            "vm-01", 1, "site-a", "disk0", 1, block, bytes(-(-size // block) * digests.DIGEST_BYTES)
        )
        validation.check_digest_map(sent)
        validation.check_digest_map_fits(sent, size)


def test_a_digest_map_too_fine_for_the_disk_is_refused_before_digesting_it() -> None:
    """A 64 KiB block is fine for 16 GiB; for a 1 TiB disk it would be 16M digests (256 MiB)."""
    sent = DigestMap("vm-01", 1, "site-a", "disk0", 1, 64 * 1024, b"")
    validation.check_digest_map_fits(sent, 16 << 30)
    with pytest.raises(InvalidEventError) as caught:
        validation.check_digest_map_fits(sent, TiB)
    assert str(caught.value) == (
        "invalid DigestMap record: block_size 65536 would cut disk 'disk0' of 1099511627776 "
        "bytes into 16777216 blocks to compare; at most 262144 are allowed"
    )


def test_a_name_in_a_message_is_escaped_and_cut_short() -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_name("disk", "\x00" + "y" * 999)
    assert str(caught.value) == (f"disk name '\\x00{'y' * 39}'... (1000 characters) {NAME_RULE}")


@pytest.mark.parametrize("disk", ["../../x", "/abs/x", "a\x00b", "x" * 1000, "", "."])
def test_a_replica_never_makes_a_path_of_a_bad_disk_name(tmp_path: Path, disk: str) -> None:
    with pytest.raises(ConfigurationError):
        image_path(tmp_path / "vm", disk)


def test_an_export_never_writes_outside_its_destination(tmp_path: Path) -> None:
    point = RecoveryPoint(1, 1, 0, AT)
    destination = tmp_path / "out"
    with pytest.raises(ConfigurationError) as caught:
        export_point({"../x": tmp_path / "head.img"}, tmp_path / "undo", point, 1, destination)
    assert str(caught.value) == f"disk name '../x' {NAME_RULE}"
    assert sorted(tmp_path.iterdir()) == []


def test_an_image_that_cannot_be_created_is_an_error_that_names_it(tmp_path: Path) -> None:
    """A size the file system refuses, or no room, stops the VM with a message; no traceback,
    and no image of it stays open."""
    (tmp_path / "blocker").write_bytes(b"")  # a file where the images' folder should be
    record = VmRecord(
        "vm-01",
        "replica",
        "default",
        "site-a",
        VmSettings(),
        1,
        ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
        "",
        AT,
        (
            DiskRecord("disk0", str(tmp_path / "ok" / "disk0.img"), 4096),
            DiskRecord("disk1", str(tmp_path / "blocker" / "disk1.img"), 4096),
        ),
    )
    with pytest.raises(ConfigurationError) as caught:
        _open_images(record)
    assert str(caught.value).startswith(
        f"VM 'vm-01': cannot create or open replica image {tmp_path}/blocker/disk1.img of 4096 "
        "bytes ("
    )


def test_every_kind_of_record_has_its_bounds() -> None:
    """A record kind added to the wire without a check would be refused as unknown everywhere."""
    kinds = set(typing.get_args(Event))
    assert kinds == set(validation._CHECKS)
