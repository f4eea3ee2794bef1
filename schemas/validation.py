"""What a record may hold: every value read from a topic is checked here before anything uses it.

Journal and status topics are untrusted input: anyone who can write to the broker can put a
record there. A record that decodes but carries a name that could escape a folder, a negative
offset, an empty range, or a size or count beyond what any vmreplica writes is refused with
:class:`~vmreplica.errors.InvalidEventError`, naming the field and the value, before a path is
built or a byte is allocated from it.

There is one check per event kind (:func:`check_write_batch` … :func:`check_resync_request`) and
one dispatcher, :func:`check_event`, which :meth:`EventCodec.decode_journal` and
:meth:`EventCodec.decode_status` call on every record they return: whoever reads a topic gets
checked events. These checks need nothing but the record. What depends on the reader's own state
— the size of *its* disk, the next cycle, the hash chain, the length of a decompressed payload —
is checked where that state lives: :mod:`vmreplica.consumers.journal_rules` for the replica, and
:func:`check_digest_map_fits` for a site about to compare a DigestMap with its own disk.

Every bound is a constant with its unit and why, set above what the producers write (the unit
tests tie each to the producer's own limit), so no legitimate record is refused.

About 500 lines, on purpose: one check per event kind, side by side, so a reader sees every bound
a record meets in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, TypeVar

from vmreplica.domain.model import VmSettings
from vmreplica.domain.names import check_name, shown_name
from vmreplica.domain.states import Health, ReplicationState
from vmreplica.errors import ConfigurationError, InvalidEventError
from vmreplica.schemas.events import (
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
from vmreplica.schemas.payload import MAX_PAYLOAD_BYTES

__all__ = [
    "DIGEST_BYTES",
    "HASH_BYTES",
    "MAX_BATCHES_PER_CYCLE",
    "MAX_CYCLE_BYTES",
    "MAX_DIGEST_BLOCKS",
    "MAX_DIGEST_BLOCK_BYTES",
    "MAX_DISKS_PER_VM",
    "MAX_DISK_BYTES",
    "MAX_EXTENTS_PER_BATCH",
    "MAX_LABEL_CHARS",
    "MAX_NONCE_BYTES",
    "MAX_RESYNC_RANGES",
    "MAX_SEQUENCE",
    "MAX_SIGNATURE_BYTES",
    "MAX_SITES_PER_RECORD",
    "MAX_TEXT_CHARS",
    "MAX_TIME_MS",
    "MIN_DIGEST_BLOCK_BYTES",
    "check_digest_map_fits",
    "check_event",
    "range_problem",
]

KiB: Final = 1024
GiB: Final = 1024**3
TiB: Final = 1024**4

MAX_DISK_BYTES: Final = 64 * TiB
"""Largest disk size, offset or range end: VHDX's limit; a larger size is forged or corrupt."""
MAX_DISK_TEXT: Final = "64 TiB"
"""MAX_DISK_BYTES as people read it, for messages."""
MAX_DISKS_PER_VM: Final = 256
"""Disks in one VmConfig or CycleCommit: Hyper-V's most per VM (4 SCSI controllers × 64)."""
MAX_CYCLE_BYTES: Final = MAX_DISKS_PER_VM * MAX_DISK_BYTES
"""A cycle's byte counts: no cycle changes more than every byte of every disk."""
MAX_SITES_PER_RECORD: Final = 64
"""Site names in one record (replica sites, resync sites): far beyond any real fan-out."""
CAPTURE_MODES: Final = ("api", "nbd", "scan")
"""How a primary may capture writes (VmConfig.capture): what a replica that takes over does."""
INITIAL_MODES: Final = ("network", "export", "existing")
"""How a replica may get its first copy (VmConfig.initial)."""
MAX_EXTENTS_PER_BATCH: Final = 65_536
"""Extents in one WriteBatch: 8× the shipper's 8,192, for a long write split at payload
boundaries; bounds the work one record makes the replica do after decoding."""
MAX_BATCHES_PER_CYCLE: Final = 1 << 20
"""Batches in one cycle, which the replica holds until its commit: 4 TiB at the shipper's
4 MiB per batch, more than a 15-minute cycle gathers at 4 GB/s."""
MAX_RESYNC_RANGES: Final = 65_536
"""Ranges in one ResyncRequest: above the 50,000 the old primary sends (it merges beyond);
bounds the interval set one record builds."""
DIGEST_BYTES: Final = 16
"""Bytes of one block digest in a DigestMap (``vmreplica.storage.digests.DIGEST_BYTES``)."""
MIN_DIGEST_BLOCK_BYTES: Final = 4 * KiB
"""Smallest DigestMap block: one page. A block of 1 byte would make a site build 16 bytes of
digests per byte of disk; at 4 KiB they stay within 1/256 of it."""
MAX_DIGEST_BLOCK_BYTES: Final = 1 * GiB
"""Largest DigestMap block: a 64 TiB disk needs 256 MiB blocks to fit MAX_DIGEST_BLOCKS."""
MAX_DIGEST_BLOCKS: Final = 262_144
"""Digests in one DigestMap, and blocks a site digests to compare one: 4 MiB of digests,
the most the old primary sends (it doubles the block size until the map fits)."""
HASH_BYTES: Final = 32
"""Hash-chain links (``previous_hash``, ``cycle_hash``, ``last_cycle_hash``) are SHA-256."""
MAX_SIGNATURE_BYTES: Final = 512
"""A signature: Ed25519 needs 64 bytes; 512 leaves room for RSA-4096, nothing holds more."""
MAX_NONCE_BYTES: Final = 64
"""An encryption nonce: AES-GCM uses 12 bytes, XChaCha20-Poly1305 24."""
MAX_LABEL_CHARS: Final = 128
MAX_WRAPPED_KEYS: Final = 256
"""Payload keys a VmConfig carries: a few sites times the keys kept through retention."""
"""Seed ids, algorithm names and key ids: short printable labels."""
MAX_TEXT_CHARS: Final = 1024
"""Reasons shown to operators, stored with a VM's state and logged: one printable line."""
MAX_SEQUENCE: Final = 2**53
"""Epochs, cycles and Kafka offsets: a cycle a second for 285 million years, exact as a JSON
number, and one more never overflows an Avro long."""
MAX_TIME_MS: Final = 253_402_300_799_999
"""Times in ms since the epoch: the end of year 9999 UTC, the last instant ``datetime`` shows."""
CRC32_MAX: Final = 2**32 - 1
"""CRC-32 values are unsigned 32-bit numbers (``zlib.crc32``)."""
_HEX_DIGITS: Final = frozenset("0123456789abcdef")
_STATES: Final = frozenset(state.value for state in ReplicationState)
_HEALTHS: Final = frozenset(health.value for health in Health)


def range_problem(offset: int, length: int, size: int, of: str) -> str | None:
    """What is wrong with ``length`` bytes at ``offset`` of ``of`` (``size`` bytes), or None."""
    if offset < 0:
        return f"offset {offset} is negative"
    if length <= 0:
        return f"length {length} is not positive: a range covers at least one byte"
    if offset + length > size:
        return f"{length} bytes at {offset} lie past the end of {of} ({size} bytes)"
    return None


class _Fields:
    """The checks of one record, each naming the field it refuses (``extents[3].offset``)."""

    __slots__ = ("kind",)

    def __init__(self, event: Event) -> None:
        self.kind = type(event).__name__

    def fail(self, problem: str) -> NoReturn:
        raise InvalidEventError(self.kind, problem)

    def name(self, field: str, what: str, value: str) -> None:
        try:
            check_name(what, value)
        except ConfigurationError as error:
            self.fail(f"{field}: {error}")

    def names(self, field: str, what: str, values: Sequence[str], most: int) -> None:
        self.count(field, len(values), 0, most)
        for index, value in enumerate(values):
            self.name(f"{field}[{index}]", what, value)
        twice = sorted({value for value in values if values.count(value) > 1})
        if twice:
            self.fail(f"{field} names {what} {twice[0]!r} twice")

    def number(self, field: str, value: int, low: int, high: int, unit: str = "") -> None:
        if not low <= value <= high:
            self.fail(f"{field} is {value}{unit}; allowed: {low} to {high}{unit}")

    def count(self, field: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            self.fail(f"{field} holds {value} items; allowed: {low} to {high}")

    def sequence(self, field: str, value: int, low: int = 0) -> None:
        self.number(field, value, low, MAX_SEQUENCE)

    def time(self, field: str, value: int) -> None:
        self.number(field, value, 0, MAX_TIME_MS, " ms")

    def size(self, field: str, value: int) -> None:
        if value < 0:
            self.fail(f"{field} is {value} bytes: a size cannot be negative")
        if value > MAX_DISK_BYTES:
            self.fail(
                f"{field} is {value} bytes, larger than the largest disk vmreplica "
                f"accepts ({MAX_DISK_TEXT})"
            )

    def crc32(self, field: str, value: int) -> None:
        self.number(field, value, 0, CRC32_MAX)

    def hash(self, field: str, value: bytes) -> None:
        if len(value) != HASH_BYTES:
            self.fail(f"{field} is {len(value)} bytes; a SHA-256 hash is {HASH_BYTES}")

    def text(self, field: str, value: str, most: int, empty: bool = True) -> None:
        if len(value) > most:
            self.fail(f"{field} is {len(value)} characters; at most {most} are allowed")
        if not value.isprintable() or (not empty and not value):
            self.fail(f"{field} {shown_name(value)} is not one line of printable text")

    def byte_range(self, field: str, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            self.fail(f"{field}: {range_problem(offset, length, MAX_DISK_BYTES, 'a disk')}")
        if offset + length > MAX_DISK_BYTES:
            self.fail(
                f"{field}: {length} bytes at {offset} end beyond the largest disk "
                f"vmreplica accepts ({MAX_DISK_TEXT})"
            )

    def sealed(self, signature: bytes | None, encryption: Encryption | None = None) -> None:
        if signature is not None and not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            self.fail(f"signature is {len(signature)} bytes; allowed: 1 to {MAX_SIGNATURE_BYTES}")
        if encryption is not None:
            self.text("encryption.algorithm", encryption.algorithm, MAX_LABEL_CHARS, empty=False)
            self.text("encryption.key_id", encryption.key_id, MAX_LABEL_CHARS, empty=False)
            if len(encryption.nonce) > MAX_NONCE_BYTES:
                self.fail(
                    f"encryption.nonce is {len(encryption.nonce)} bytes; at most "
                    f"{MAX_NONCE_BYTES} are allowed"
                )

    def disks(self, field: str, disks: Sequence[DiskSize]) -> None:
        self.count(field, len(disks), 1, MAX_DISKS_PER_VM)
        self.names(field, "disk", [disk.name for disk in disks], MAX_DISKS_PER_VM)
        for index, disk in enumerate(disks):
            self.size(f"{field}[{index}].size_bytes", disk.size_bytes)

    def header(self, vm: str, epoch: int) -> None:
        self.name("vm", "VM", vm)
        self.sequence("epoch", epoch)


def _check_extent(fields: _Fields, index: int, extent: Extent) -> None:
    where = f"extents[{index}]"
    fields.name(f"{where}.disk", "disk", extent.disk)
    fields.byte_range(where, extent.offset, extent.length)
    if extent.kind is ExtentKind.DATA:
        fields.number(f"{where}.length", extent.length, 1, MAX_PAYLOAD_BYTES, " bytes")
        fields.number(
            f"{where}.payload_offset",
            extent.payload_offset,
            0,
            MAX_PAYLOAD_BYTES - extent.length,
            " bytes",
        )
        fields.crc32(f"{where}.crc32", extent.crc32)
    elif extent.payload_offset != 0 or extent.crc32 != 0:
        fields.fail(
            f"{where} is {extent.kind.value} but carries payload_offset "
            f"{extent.payload_offset} and crc32 {extent.crc32}; both must be 0"
        )


def check_write_batch(batch: WriteBatch) -> None:
    """Names, sequence numbers, extent count and every extent's range; the payload's size."""
    fields = _Fields(batch)
    fields.header(batch.vm, batch.epoch)
    fields.sequence("cycle", batch.cycle)
    fields.number("batch", batch.batch, 0, MAX_BATCHES_PER_CYCLE - 1)
    fields.count("extents", len(batch.extents), 0, MAX_EXTENTS_PER_BATCH)
    fields.number("payload", len(batch.payload), 0, MAX_PAYLOAD_BYTES, " bytes")
    for index, extent in enumerate(batch.extents):
        _check_extent(fields, index, extent)
    fields.sealed(batch.signature, batch.encryption)


def check_cycle_commit(commit: CycleCommit) -> None:
    """Names, counts and byte totals within bounds, disks and sizes, 32-byte hash links."""
    fields = _Fields(commit)
    fields.header(commit.vm, commit.epoch)
    fields.sequence("cycle", commit.cycle)
    fields.time("started_at_ms", commit.started_at_ms)
    fields.time("cut_at_ms", commit.cut_at_ms)
    fields.number("batches", commit.batches, 0, MAX_BATCHES_PER_CYCLE)
    fields.number("extents", commit.extents, 0, MAX_BATCHES_PER_CYCLE * MAX_EXTENTS_PER_BATCH)
    fields.number("bytes_written", commit.bytes_written, 0, MAX_CYCLE_BYTES, " bytes")
    fields.number("payload_bytes", commit.payload_bytes, 0, MAX_CYCLE_BYTES, " bytes")
    fields.disks("disks", commit.disks)
    fields.hash("previous_hash", commit.previous_hash)
    fields.hash("cycle_hash", commit.cycle_hash)
    fields.sealed(commit.signature)


def check_seed_chunk(chunk: SeedChunk) -> None:
    """A piece of a disk within bounds; the ``done`` marker carries no data."""
    fields = _Fields(chunk)
    fields.header(chunk.vm, chunk.epoch)
    if chunk.done:
        if chunk.disk:
            fields.name("disk", "disk", chunk.disk)
        if chunk.offset != 0 or chunk.length != 0 or chunk.payload:
            fields.fail(
                f"the done marker carries data ({chunk.length} bytes at "
                f"{chunk.offset}, a payload of {len(chunk.payload)} bytes)"
            )
    else:
        fields.name("disk", "disk", chunk.disk)
        fields.byte_range("chunk", chunk.offset, chunk.length)
        fields.number("length", chunk.length, 1, MAX_PAYLOAD_BYTES, " bytes")
        fields.number("payload", len(chunk.payload), 0, MAX_PAYLOAD_BYTES, " bytes")
    fields.crc32("crc32", chunk.crc32)
    fields.text("seed_id", chunk.seed_id, MAX_LABEL_CHARS)
    fields.sealed(chunk.signature, chunk.encryption)


def check_epoch_start(start: EpochStart) -> None:
    """Epochs that do not go back, a first cycle, the new primary's name, the hash link."""
    fields = _Fields(start)
    fields.header(start.vm, start.epoch)
    fields.number("previous_epoch", start.previous_epoch, 0, start.epoch)
    fields.name("primary_site", "site", start.primary_site)
    fields.sequence("start_cycle", start.start_cycle, 1)
    fields.text("reason", start.reason, MAX_TEXT_CHARS)
    fields.time("at_ms", start.at_ms)
    fields.hash("last_cycle_hash", start.last_cycle_hash)
    fields.names("resync_sites", "site", start.resync_sites, MAX_SITES_PER_RECORD)


def check_failover_prepared(prepared: FailoverPrepared) -> None:
    """The final cycle and its hash, the site, the disks' digests as SHA-256 hex."""
    fields = _Fields(prepared)
    fields.header(prepared.vm, prepared.epoch)
    fields.sequence("final_cycle", prepared.final_cycle)
    fields.hash("cycle_hash", prepared.cycle_hash)
    fields.time("at_ms", prepared.at_ms)
    fields.name("site", "site", prepared.site)
    if prepared.target:  # empty in records of schema versions 1 and 2
        fields.name("target", "site", prepared.target)
    digests = prepared.disk_sha256
    fields.names("disk_sha256", "disk", [d.name for d in digests], MAX_DISKS_PER_VM)
    for index, digest in enumerate(digests):
        if len(digest.sha256) != 2 * HASH_BYTES or not set(digest.sha256) <= _HEX_DIGITS:
            fields.fail(
                f"disk_sha256[{index}].sha256 {shown_name(digest.sha256)} is not "
                f"{2 * HASH_BYTES} lowercase hex digits"
            )


def check_vm_config(config: VmConfig) -> None:
    """Disk names and sizes, the sites, and settings by the rules ``vmreplica enable`` applies."""
    fields = _Fields(config)
    fields.header(config.vm, config.epoch)
    fields.disks("disks", config.disks)
    try:
        VmSettings(
            frequency_seconds=config.frequency_seconds,
            recovery_history=config.recovery_history,
            app_consistent_hours=config.app_consistent_hours,
            continuous_points_hours=config.continuous_points_hours,
        ).validate()
    except ConfigurationError as error:
        fields.fail(f"settings: {error}")
    fields.name("primary_site", "site", config.primary_site)
    fields.time("at_ms", config.at_ms)
    fields.names("replica_sites", "site", config.replica_sites, MAX_SITES_PER_RECORD)
    if config.capture not in CAPTURE_MODES:
        fields.fail(f"capture {shown_name(config.capture)} is none of {', '.join(CAPTURE_MODES)}")
    fields.number("continuous_max_bytes", config.continuous_max_bytes, 1, MAX_DISK_BYTES, " bytes")
    if config.changelog_budget_bytes is not None:
        fields.number(
            "changelog_budget_bytes", config.changelog_budget_bytes, 1, MAX_DISK_BYTES, " bytes"
        )
    if config.initial not in INITIAL_MODES:
        fields.fail(f"initial {shown_name(config.initial)} is none of {', '.join(INITIAL_MODES)}")
    if len(config.wrapped_keys) > MAX_WRAPPED_KEYS:
        fields.fail(f"{len(config.wrapped_keys)} wrapped keys; at most {MAX_WRAPPED_KEYS}")
    for index, wrapped in enumerate(config.wrapped_keys):
        fields.name(f"wrapped_keys[{index}].site", "site", wrapped.site)
        fields.text(f"wrapped_keys[{index}].key_id", wrapped.key_id, MAX_LABEL_CHARS, empty=False)
        if len(wrapped.ephemeral_public) != 32 or len(wrapped.wrapped) != 48:
            fields.fail(
                f"wrapped_keys[{index}] holds {len(wrapped.ephemeral_public)} and "
                f"{len(wrapped.wrapped)} bytes; a wrapped key is 32 and 48"
            )


def check_disk_resize(resize: DiskResize) -> None:
    fields = _Fields(resize)
    fields.header(resize.vm, resize.epoch)
    fields.sequence("cycle", resize.cycle)
    fields.name("disk", "disk", resize.disk)
    fields.size("old_size", resize.old_size)
    fields.size("new_size", resize.new_size)


def check_heartbeat(heartbeat: Heartbeat) -> None:
    fields = _Fields(heartbeat)
    fields.header(heartbeat.vm, heartbeat.epoch)
    fields.name("site", "site", heartbeat.site)
    fields.time("at_ms", heartbeat.at_ms)
    fields.sequence("last_cycle", heartbeat.last_cycle, -1)


def check_replica_position(position: ReplicaPosition) -> None:
    """The position, and a state and health that are ones vmreplica has."""
    fields = _Fields(position)
    fields.header(position.vm, position.epoch)
    fields.name("site", "site", position.site)
    fields.sequence("cycle", position.cycle)
    fields.sequence("offset", position.offset, low=-1)  # -1: nothing applied yet
    if position.state not in _STATES:
        fields.fail(f"state {shown_name(position.state)} is not a replication state")
    if position.health not in _HEALTHS:
        fields.fail(f"health {shown_name(position.health)} is not normal, warning or critical")
    fields.time("applied_at_ms", position.applied_at_ms)
    fields.time("at_ms", position.at_ms)


def check_digest_map(digest_map: DigestMap) -> None:
    """A power-of-two block size within bounds and whole digests, at most MAX_DIGEST_BLOCKS."""
    fields = _Fields(digest_map)
    fields.header(digest_map.vm, digest_map.epoch)
    fields.name("site", "site", digest_map.site)
    fields.name("disk", "disk", digest_map.disk)
    fields.sequence("cycle", digest_map.cycle)
    block = digest_map.block_size
    if not MIN_DIGEST_BLOCK_BYTES <= block <= MAX_DIGEST_BLOCK_BYTES or block & (block - 1):
        fields.fail(
            f"block_size is {block} bytes; it must be a power of two from "
            f"{MIN_DIGEST_BLOCK_BYTES} to {MAX_DIGEST_BLOCK_BYTES} bytes"
        )
    size = len(digest_map.digests)
    if size % DIGEST_BYTES or size > MAX_DIGEST_BLOCKS * DIGEST_BYTES:
        fields.fail(
            f"digests are {size} bytes; expected whole {DIGEST_BYTES}-byte digests, "
            f"at most {MAX_DIGEST_BLOCKS} of them"
        )


def check_resync_request(request: ResyncRequest) -> None:
    fields = _Fields(request)
    fields.header(request.vm, request.epoch)
    fields.name("site", "site", request.site)
    fields.text("reason", request.reason, MAX_TEXT_CHARS)
    if request.disk is not None:
        fields.name("disk", "disk", request.disk)
    fields.count("ranges", len(request.ranges), 0, MAX_RESYNC_RANGES)
    for index, byte_range in enumerate(request.ranges):
        fields.byte_range(f"ranges[{index}]", byte_range.offset, byte_range.length)
    fields.time("at_ms", request.at_ms)


def check_digest_request(request: DigestRequest) -> None:
    fields = _Fields(request)
    fields.header(request.vm, request.epoch)
    fields.name("site", "site", request.site)
    fields.names("replica_sites", "site", request.replica_sites, MAX_SITES_PER_RECORD)
    fields.text("reason", request.reason, MAX_TEXT_CHARS)
    fields.time("at_ms", request.at_ms)


def check_digest_map_fits(digest_map: DigestMap, disk_size: int) -> None:
    """A site about to digest its own disk of ``disk_size`` bytes at the map's block size.

    :raises InvalidEventError: that would make more than :data:`MAX_DIGEST_BLOCKS` digests: a
        block size too small for the disk (the sender picks one that keeps the map small).
    """
    block = digest_map.block_size
    blocks = -(-disk_size // block)
    if blocks > MAX_DIGEST_BLOCKS:
        raise InvalidEventError(
            "DigestMap",
            f"block_size {block} would cut disk {digest_map.disk!r} of "
            f"{disk_size} bytes into {blocks} blocks to compare; at most {MAX_DIGEST_BLOCKS} "
            "are allowed",
        )


_CHECKS: Final[dict[type[Any], Callable[[Any], None]]] = {
    WriteBatch: check_write_batch,
    CycleCommit: check_cycle_commit,
    SeedChunk: check_seed_chunk,
    EpochStart: check_epoch_start,
    FailoverPrepared: check_failover_prepared,
    VmConfig: check_vm_config,
    DiskResize: check_disk_resize,
    Heartbeat: check_heartbeat,
    ReplicaPosition: check_replica_position,
    DigestMap: check_digest_map,
    ResyncRequest: check_resync_request,
    DigestRequest: check_digest_request,
}


E = TypeVar("E", bound=Event)


def check_event(event: E) -> E:
    """Return ``event`` if every value in it is within bounds.

    :raises InvalidEventError: naming the first field that is not, and its value.
    """
    check = _CHECKS.get(type(event))
    if check is None:  # fail closed: a kind nobody wrote bounds for is not applied unchecked
        raise InvalidEventError(
            type(event).__name__,
            "no bounds are known for this kind of record; this release cannot check it",
        )
    check(event)
    return event
