"""Journal and status events as frozen dataclasses, one per Avro record in ``schemas/*.avsc``.

These are the values producers build and consumers apply; the codec turns them into Avro
single-object encoded bytes and back. Class, field and enum-symbol names are exactly the Avro
names, in the same order, which the codec checks when it loads the schemas: a field added to an
``.avsc`` file without its twin here fails loudly at first use, not on a replica at 3 a.m.

Everything here is pure data: no I/O, no validation beyond what the types say. Arrays are tuples
so that events stay immutable and hashable. Times are milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias


class ExtentKind(Enum):
    """What an extent's byte range now holds."""

    DATA = "DATA"
    """The bytes are carried in the batch payload."""
    ZERO = "ZERO"
    """The range reads as zeros; no payload."""
    TRIM = "TRIM"
    """The range was discarded; the replica punches a hole (reads as zeros)."""


class Compression(Enum):
    """How a payload is compressed (vmreplica compresses itself; Kafka compression stays off)."""

    NONE = "NONE"
    ZSTD = "ZSTD"


class Consistency(Enum):
    """What kind of recovery point a cycle boundary is."""

    CRASH = "CRASH"
    """As after a power loss: every write before the cut, none after."""
    APPLICATION = "APPLICATION"
    """Applications were quiesced before the cut."""


@dataclass(frozen=True, slots=True)
class Extent:
    """One changed byte range of one disk inside a :class:`WriteBatch`."""

    disk: str
    offset: int
    length: int
    kind: ExtentKind
    payload_offset: int
    """For DATA: offset of this extent's bytes in the uncompressed payload; 0 otherwise."""
    crc32: int
    """CRC-32 (``zlib.crc32``) of the extent's uncompressed data; 0 for ZERO and TRIM."""


@dataclass(frozen=True, slots=True)
class Encryption:
    """End-to-end payload encryption parameters; the key itself never travels."""

    algorithm: str
    key_id: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class DiskSize:
    """A disk of a VM and its size in bytes."""

    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class DiskDigest:
    """A disk's sha256 (hex) at some cycle."""

    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A range of bytes on a disk."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Writes of one cycle, many extents per record, payload compressed (maybe encrypted)."""

    vm: str
    epoch: int
    cycle: int
    batch: int
    """Index of this batch within its cycle, from 0, without gaps."""
    extents: tuple[Extent, ...]
    compression: Compression
    payload: bytes
    signature: bytes | None = None
    encryption: Encryption | None = None


@dataclass(frozen=True, slots=True)
class CycleCommit:
    """Closes a cycle: the last record of the cycle's Kafka transaction, a recovery point."""

    vm: str
    epoch: int
    cycle: int
    started_at_ms: int
    cut_at_ms: int
    batches: int
    extents: int
    bytes_written: int
    """Logical bytes the cycle's extents cover, zero and trim ranges included."""
    payload_bytes: int
    """Payload bytes as sent, after compression and encryption."""
    consistency: Consistency
    disks: tuple[DiskSize, ...]
    previous_hash: bytes
    cycle_hash: bytes
    signature: bytes | None = None


@dataclass(frozen=True, slots=True)
class SeedChunk:
    """A piece of the initial copy of one disk."""

    vm: str
    epoch: int
    disk: str
    offset: int
    length: int
    compression: Compression
    payload: bytes
    crc32: int
    seed_id: str
    done: bool
    signature: bytes | None = None
    encryption: Encryption | None = None


@dataclass(frozen=True, slots=True)
class EpochStart:
    """First record of a new epoch; replicas then ignore records of older epochs."""

    vm: str
    epoch: int
    previous_epoch: int
    primary_site: str
    start_cycle: int
    reason: str
    at_ms: int
    last_cycle_hash: bytes
    resync_sites: tuple[str, ...] = ()
    """Replicas that diverged (a returning old primary) and resynchronize from this epoch."""
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class FailoverPrepared:
    """Planned failover: the primary shipped ``final_cycle`` and stopped writing."""

    vm: str
    epoch: int
    final_cycle: int
    cycle_hash: bytes
    at_ms: int
    site: str
    start_vm: bool = False
    """Whether the new primary starts the VM once it has taken over."""
    disk_sha256: tuple[DiskDigest, ...] = ()
    """With ``--verify``: (disk, sha256 hex) at the final cycle, checked before the takeover."""
    target: str = ""
    """The replica site that takes over; the other replica sites follow it. Empty in records
    written before schema version 3: any caught-up replica may take over."""
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """The primary asks replica sites for block digests of their disks (a resynchronization).

    Each site in ``replica_sites`` answers on the status topic with a :class:`DigestMap` of every
    disk as of the last cycle it applied before this record.
    """

    vm: str
    epoch: int
    site: str
    replica_sites: tuple[str, ...]
    reason: str
    at_ms: int
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A VM's payload key, wrapped for one replica site (:mod:`vmreplica.security.encryption`)."""

    site: str
    key_id: str
    ephemeral_public: bytes
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Replication settings of a VM."""

    vm: str
    epoch: int
    disks: tuple[DiskSize, ...]
    frequency_seconds: int
    """Seconds between cycles; 0 means continuous."""
    recovery_history: int
    """Additional recovery points the replica keeps; 0 keeps only the latest."""
    app_consistent_hours: int | None
    primary_site: str
    at_ms: int
    replica_sites: tuple[str, ...] = ()
    """Sites that should keep a replica; empty lets any accepting site of the trust group."""
    continuous_points_hours: int | None = None
    """When set, every cycle of the last N hours is a recovery point."""
    capture: str = "api"
    """How the primary captures writes (``nbd``, ``scan``, ``api``): a replica that takes over
    captures the same way. The scan's cut hooks are shell commands and never travel: the
    journal is not trusted to say what a site runs."""
    compression: bool = True
    continuous_max_bytes: int = 64 * 1024 * 1024
    changelog_budget_bytes: int | None = None
    wrapped_keys: tuple[WrappedKey, ...] = ()
    """The VM's payload keys for its replica sites; empty when payloads travel in clear."""
    initial: str = "network"
    """How the replica gets its first copy: ``network``, ``export`` or ``existing``
    (:mod:`vmreplica.producers.seed`)."""
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class DiskResize:
    """A disk changed size; applies from ``cycle`` on."""

    vm: str
    epoch: int
    cycle: int
    disk: str
    old_size: int
    new_size: int
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The primary is alive; ``last_cycle`` is -1 before the first cycle.

    ``idle_at_ms`` is set when nothing waited to ship: every write the primary held at that
    instant is in cycles up to ``last_cycle``. None while writes wait (or from older primaries).
    """

    vm: str
    epoch: int
    site: str
    at_ms: int
    last_cycle: int
    idle_at_ms: int | None = None
    signature: bytes | None = None
    """Ed25519 signature by the writing site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class ReplicaPosition:
    """A replica reports its applied position and health."""

    vm: str
    epoch: int
    site: str
    cycle: int
    offset: int
    """Journal topic offset of the applied cycle's CycleCommit."""
    state: str
    health: str
    applied_at_ms: int
    at_ms: int
    signature: bytes | None = None
    """Ed25519 signature by the reporting site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class DigestMap:
    """Block digests of a replica disk, for a block-compare resync."""

    vm: str
    epoch: int
    site: str
    disk: str
    cycle: int
    block_size: int
    digests: bytes
    """Fixed-size digests of consecutive blocks from offset 0, concatenated."""
    signature: bytes | None = None
    """Ed25519 signature by the reporting site (:mod:`vmreplica.security.signing`)."""


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """A replica asks for ranges to be resent; no disk means every disk, no ranges the whole."""

    vm: str
    epoch: int
    site: str
    reason: str
    disk: str | None
    ranges: tuple[ByteRange, ...]
    at_ms: int
    signature: bytes | None = None
    """Ed25519 signature by the reporting site (:mod:`vmreplica.security.signing`)."""


JournalEvent: TypeAlias = (
    WriteBatch
    | CycleCommit
    | SeedChunk
    | EpochStart
    | FailoverPrepared
    | DigestRequest
    | VmConfig
    | DiskResize
    | Heartbeat
)
"""Any record of a VM's journal topic."""

StatusEvent: TypeAlias = ReplicaPosition | DigestMap | ResyncRequest
"""Any record of a VM's status topic."""

Event: TypeAlias = JournalEvent | StatusEvent
"""Any record the codec encodes."""

JOURNAL_EVENT_TYPES: Final[tuple[type[JournalEvent], ...]] = (
    WriteBatch,
    CycleCommit,
    SeedChunk,
    EpochStart,
    FailoverPrepared,
    DigestRequest,
    VmConfig,
    DiskResize,
    Heartbeat,
)
"""The journal kinds, for ``isinstance`` checks and for iterating (tests, tooling)."""

STATUS_EVENT_TYPES: Final[tuple[type[StatusEvent], ...]] = (
    ReplicaPosition,
    DigestMap,
    ResyncRequest,
)
"""The status kinds."""

JOURNAL_NAMESPACE: Final = "io.vmreplica.journal"
"""Avro namespace of the journal records."""

STATUS_NAMESPACE: Final = "io.vmreplica.status"
"""Avro namespace of the status records."""
