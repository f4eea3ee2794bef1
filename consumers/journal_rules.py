"""The rules a replica checks before any byte of a cycle touches an image (pure functions).

Sequence integrity is explicit: within the current epoch the next cycle is exactly ``last + 1``,
batches of a cycle are numbered from 0 without gaps, the commit's hash chains to the previous
cycle, every extent lies inside its disk and its data inside its batch's payload, and every data
extent's CRC-32 matches; a seed chunk lies inside its disk. A violation raises
:class:`JournalViolation` naming the VM, what was expected and what arrived, and whether the
remedy is a resynchronization or operator attention.

These are the checks that need the replica's own state (its disks' sizes, its position). What a
record may hold whoever reads it — names, non-negative offsets, bounded sizes and counts — was
checked when it was decoded (:mod:`vmreplica.schemas.validation`); the range checks are repeated
here, with their own messages, so these functions are safe on records built in memory too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import CorruptEventError, JournalViolation
from vmreplica.schemas.chain import CycleHasher
from vmreplica.schemas.events import CycleCommit, Extent, ExtentKind, SeedChunk, WriteBatch
from vmreplica.schemas.payload import PayloadUnpacker, verify
from vmreplica.schemas.validation import range_problem


@dataclass(frozen=True, slots=True)
class DecodedExtent:
    """An extent ready to apply: DATA carries its bytes, ZERO and TRIM none.

    ``data`` is a view into its batch's (decompressed) payload, not a copy.
    """

    disk: str
    offset: int
    length: int
    kind: ExtentKind
    data: bytes | memoryview


def _check_sequence(
    vm: str, offset: int, what: str, event: WriteBatch | CycleCommit, epoch: int, next_cycle: int
) -> None:
    """The next record of the current epoch belongs to cycle ``last + 1``, nothing else."""
    if event.epoch != epoch or event.cycle != next_cycle:
        raise JournalViolation(
            vm,
            offset,
            f"expected {what} of cycle {next_cycle} in epoch {epoch}, got cycle "
            f"{event.cycle} of epoch {event.epoch} (a gap or a replay in the journal)",
        )


def check_batch(
    vm: str, offset: int, batch: WriteBatch, epoch: int, next_cycle: int, batches_so_far: int
) -> None:
    _check_sequence(vm, offset, "a batch", batch, epoch, next_cycle)
    if batch.batch != batches_so_far:
        raise JournalViolation(
            vm,
            offset,
            f"cycle {batch.cycle}: expected batch {batches_so_far}, got batch {batch.batch}",
        )


def check_commit(
    vm: str,
    offset: int,
    commit: CycleCommit,
    batches: Sequence[WriteBatch],
    epoch: int,
    next_cycle: int,
    previous_hash: bytes,
) -> None:
    hasher = CycleHasher(previous_hash, epoch, commit.cycle)
    for batch in batches:
        hasher.update(batch.extents)
    check_streamed_commit(
        vm, offset, commit, len(batches), hasher.digest(), epoch, next_cycle, previous_hash
    )


def check_streamed_commit(
    vm: str,
    offset: int,
    commit: CycleCommit,
    batch_count: int,
    received_hash: bytes,
    epoch: int,
    next_cycle: int,
    previous_hash: bytes,
) -> None:
    """:func:`check_commit` of a cycle whose ``batch_count`` batches were hashed as they came
    (``received_hash``: a :class:`~vmreplica.schemas.chain.CycleHasher` from ``previous_hash``
    over them)."""
    _check_sequence(vm, offset, "the commit", commit, epoch, next_cycle)
    if commit.batches != batch_count:
        raise JournalViolation(
            vm,
            offset,
            f"cycle {commit.cycle} commits {commit.batches} batches but {batch_count} arrived",
        )
    if commit.previous_hash != previous_hash:
        raise JournalViolation(
            vm,
            offset,
            f"cycle {commit.cycle} does not chain to the cycle this replica applied "
            "last (previous hash differs): the journal was rewritten or another primary wrote it",
        )
    if received_hash != commit.cycle_hash:
        raise JournalViolation(
            vm, offset, f"cycle {commit.cycle}: hash chain mismatch; its records were altered"
        )


def decode_cycle(
    vm: str,
    offset: int,
    batches: Sequence[WriteBatch],
    disk_sizes: Mapping[str, int],
    unpacker: PayloadUnpacker | None = None,
) -> list[DecodedExtent]:
    """Every extent of a cycle with its data, checked against disk bounds and CRC-32.

    ``unpacker`` is the caller's long-lived one (the materialiser's), so its zstd context is
    reused from cycle to cycle; without one, a new one serves this cycle.
    """
    unpacker = PayloadUnpacker() if unpacker is None else unpacker
    return [
        extent
        for batch in batches
        for extent in decode_batch(vm, offset, batch, disk_sizes, unpacker)
    ]


def decode_batch(
    vm: str,
    offset: int,
    batch: WriteBatch,
    disk_sizes: Mapping[str, int],
    unpacker: PayloadUnpacker,
) -> list[DecodedExtent]:
    """The extents of one batch with their data, checked against disk bounds and CRC-32: what
    a replica applying a cycle batch by batch checks before any of the batch is written."""
    try:
        payload = unpacker.open(batch)
    except CorruptEventError as error:
        raise JournalViolation(
            vm,
            offset,
            f"cycle {batch.cycle} batch {batch.batch}: payload does not decompress ({error})",
        ) from error
    view = memoryview(payload)
    return [_decoded(vm, offset, batch, extent, view, disk_sizes) for extent in batch.extents]


def _decoded(
    vm: str,
    offset: int,
    batch: WriteBatch,
    extent: Extent,
    payload: memoryview,
    disk_sizes: Mapping[str, int],
) -> DecodedExtent:
    size = disk_sizes.get(extent.disk)
    if size is None:
        raise JournalViolation(
            vm, offset, f"{_where(batch)}: unknown disk {extent.disk!r}", ReplicationState.ERROR
        )
    if extent.offset < 0 or extent.length <= 0:
        raise JournalViolation(
            vm,
            offset,
            f"{_where(batch)}: extent of {extent.length} bytes at {extent.offset} "
            f"of disk {extent.disk!r}: "
            f"{range_problem(extent.offset, extent.length, size, 'the disk')}",
            ReplicationState.ERROR,
        )
    if extent.offset + extent.length > size:
        raise JournalViolation(
            vm,
            offset,
            f"{_where(batch)}: extent of {extent.length} bytes at {extent.offset} "
            f"lies past the end of disk {extent.disk!r} ({size} bytes)",
            ReplicationState.ERROR,
        )
    if extent.kind is not ExtentKind.DATA:
        return DecodedExtent(extent.disk, extent.offset, extent.length, extent.kind, b"")
    problem = range_problem(extent.payload_offset, extent.length, len(payload), "the payload")
    if problem is not None:
        raise JournalViolation(
            vm,
            offset,
            f"{_where(batch)}: data of {extent.length} bytes at {extent.offset} of "
            f"disk {extent.disk!r} is not in the batch's payload: {problem}",
        )
    data = payload[extent.payload_offset : extent.payload_offset + extent.length]
    if not verify(data, extent.crc32, extent.length):
        raise JournalViolation(
            vm,
            offset,
            f"{_where(batch)}: checksum mismatch for {extent.length} bytes at "
            f"{extent.offset} of disk {extent.disk!r}",
        )
    return DecodedExtent(extent.disk, extent.offset, extent.length, extent.kind, data)


def check_seed_chunk(vm: str, offset: int, chunk: SeedChunk, disk_sizes: Mapping[str, int]) -> None:
    """A seed chunk (not the ``done`` marker) names a disk of this replica and lies inside it."""
    size = disk_sizes.get(chunk.disk)
    if size is None:
        raise JournalViolation(
            vm, offset, f"seed chunk for unknown disk {chunk.disk!r}", ReplicationState.ERROR
        )
    problem = range_problem(chunk.offset, chunk.length, size, f"disk {chunk.disk!r}")
    if problem is not None:
        raise JournalViolation(
            vm, offset, f"seed chunk does not fit: {problem}", ReplicationState.ERROR
        )


def _where(batch: WriteBatch) -> str:
    return f"cycle {batch.cycle} batch {batch.batch}"
