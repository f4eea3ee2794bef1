"""The rules a replica checks before a cycle touches an image, one rule at a time, no broker.

Each test builds a valid cycle (``tests/journal_records.py``), breaks one thing, and checks the
exact :class:`JournalViolation`: its type, message, state, VM and journal offset. The broker
tests (``tests/integration/test_bad_events.py``) show the same rules stopping a real replica.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Final

import pytest

from tests.journal_records import HASHED_FIELDS, Change, alter, cycle_commit, write_batch
from vmreplica.consumers.journal_rules import (
    DecodedExtent,
    check_batch,
    check_commit,
    decode_cycle,
)
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import JournalIntegrityError, JournalViolation, ReplicationError
from vmreplica.schemas.chain import GENESIS_HASH, cycle_hash
from vmreplica.schemas.events import Compression, Extent, ExtentKind, WriteBatch

VM: Final = "web01"
EPOCH: Final = 2
CYCLE: Final = 5
"""The cycle the replica expects next (it applied cycle 4)."""
OFFSET: Final = 41
DISKS: Final = {"system": 64 * 1024, "data": 10_000}
"""``data`` ends inside a 4 KiB block: the last byte of a disk is not block-aligned."""
PREVIOUS: Final = cycle_hash(GENESIS_HASH, EPOCH, CYCLE - 1, [])
RESYNC, ERROR = ReplicationState.RESYNCHRONIZATION_REQUIRED, ReplicationState.ERROR


def raised(call: Callable[[], object]) -> JournalViolation:
    with pytest.raises(JournalViolation) as caught:
        call()
    return caught.value


def prefix(offset: int = OFFSET) -> str:
    return f"VM {VM!r}, journal offset {offset}: "


def two_batches() -> list[WriteBatch]:
    return [
        write_batch(
            VM,
            EPOCH,
            CYCLE,
            0,
            [Change("system", 0, b"\x11" * 4096), Change("data", 4096, b"\x22" * 512)],
        ),
        write_batch(
            VM, EPOCH, CYCLE, 1, [Change("system", 8192, kind=ExtentKind.ZERO, length=4096)]
        ),
    ]


# --- the violation itself ----------------------------------------------------------------


def test_a_violation_is_an_integrity_error_naming_vm_offset_and_remedy() -> None:
    violation = JournalViolation(VM, 7, "something broke")
    assert isinstance(violation, JournalIntegrityError)
    assert isinstance(violation, ReplicationError)
    assert isinstance(violation, ValueError)
    assert str(violation) == "VM 'web01', journal offset 7: something broke"
    assert (violation.vm, violation.offset, violation.state) == (VM, 7, RESYNC)
    assert JournalViolation(VM, 7, "bad input", ERROR).state is ERROR


# --- sequence: batches ---------------------------------------------------------------------


def test_the_expected_batch_passes() -> None:
    batches = two_batches()
    check_batch(VM, OFFSET, batches[0], EPOCH, CYCLE, 0)
    check_batch(VM, OFFSET, batches[1], EPOCH, CYCLE, 1)


@pytest.mark.parametrize(
    ("epoch", "cycle", "what"),
    [
        (EPOCH, CYCLE + 1, "a gap: cycle 5 never arrived"),
        (EPOCH, CYCLE + 7, "a longer gap"),
        (EPOCH, CYCLE - 1, "a replay of the cycle applied last"),
        (EPOCH, 1, "a replay of an old cycle"),
        # (the materialiser drops records of superseded epochs before this rule sees them)
        (EPOCH - 1, CYCLE, "the right number in a superseded epoch"),
        (EPOCH + 1, CYCLE, "a newer epoch whose EpochStart was not seen"),
    ],
)
def test_a_batch_of_another_cycle_or_epoch_is_refused(epoch: int, cycle: int, what: str) -> None:
    batch = write_batch(VM, epoch, cycle, 0, [Change("system", 0, b"x" * 512)])
    violation = raised(lambda: check_batch(VM, OFFSET, batch, EPOCH, CYCLE, 0))
    assert str(violation) == (
        f"{prefix()}expected a batch of cycle {CYCLE} in epoch {EPOCH}, got cycle {cycle} of "
        f"epoch {epoch} (a gap or a replay in the journal)"
    ), what
    assert (violation.vm, violation.offset, violation.state) == (VM, OFFSET, RESYNC)


@pytest.mark.parametrize(
    ("index", "so_far"),
    [(1, 0), (2, 1), (0, 1), (1, 2), (5, 3)],
    ids=["first-missing", "one-missing", "replayed-first", "duplicate", "gap"],
)
def test_batches_of_a_cycle_are_numbered_from_zero_without_gap_or_duplicate(
    index: int, so_far: int
) -> None:
    batch = write_batch(VM, EPOCH, CYCLE, index, [Change("system", 0, b"x" * 512)])
    violation = raised(lambda: check_batch(VM, OFFSET, batch, EPOCH, CYCLE, so_far))
    assert str(violation) == f"{prefix()}cycle {CYCLE}: expected batch {so_far}, got batch {index}"
    assert violation.state is RESYNC


# --- sequence and hash chain: commits ------------------------------------------------------


def test_the_expected_commit_passes_and_chains() -> None:
    batches = two_batches()
    commit = cycle_commit(VM, EPOCH, CYCLE, batches, PREVIOUS, DISKS)
    check_commit(VM, OFFSET, commit, batches, EPOCH, CYCLE, PREVIOUS)
    following = cycle_commit(VM, EPOCH, CYCLE + 1, [], commit.cycle_hash, DISKS)
    check_commit(VM, OFFSET + 4, following, [], EPOCH, CYCLE + 1, commit.cycle_hash)


@pytest.mark.parametrize(
    ("epoch", "cycle"),
    [(EPOCH, CYCLE + 1), (EPOCH, CYCLE - 1), (EPOCH - 1, CYCLE), (EPOCH + 1, CYCLE)],
)
def test_a_commit_of_another_cycle_or_epoch_is_refused(epoch: int, cycle: int) -> None:
    commit = cycle_commit(VM, epoch, cycle, [], PREVIOUS, DISKS)
    violation = raised(lambda: check_commit(VM, OFFSET, commit, [], EPOCH, CYCLE, PREVIOUS))
    assert str(violation) == (
        f"{prefix()}expected the commit of cycle {CYCLE} in epoch {EPOCH}, got cycle {cycle} "
        f"of epoch {epoch} (a gap or a replay in the journal)"
    )
    assert violation.state is RESYNC


def test_a_commit_counting_other_batches_than_arrived_is_refused() -> None:
    batches = two_batches()
    commit = cycle_commit(VM, EPOCH, CYCLE, batches, PREVIOUS, DISKS)
    violation = raised(
        lambda: check_commit(VM, OFFSET, commit, batches[:1], EPOCH, CYCLE, PREVIOUS)
    )
    assert str(violation) == f"{prefix()}cycle {CYCLE} commits 2 batches but 1 arrived"
    assert violation.state is RESYNC


def test_a_commit_that_does_not_chain_to_the_last_applied_cycle_is_refused() -> None:
    batches = two_batches()
    other = cycle_hash(
        GENESIS_HASH, EPOCH, CYCLE - 1, [Extent("system", 0, 1, ExtentKind.ZERO, 0, 0)]
    )
    commit = cycle_commit(VM, EPOCH, CYCLE, batches, other, DISKS)
    violation = raised(lambda: check_commit(VM, OFFSET, commit, batches, EPOCH, CYCLE, PREVIOUS))
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE} does not chain to the cycle this replica applied last "
        "(previous hash differs): the journal was rewritten or another primary wrote it"
    )
    assert violation.state is RESYNC


@pytest.mark.parametrize("field", HASHED_FIELDS)
def test_a_commit_whose_hash_does_not_cover_the_records_is_refused(field: str) -> None:
    batches = two_batches()
    commit = cycle_commit(VM, EPOCH, CYCLE, batches, PREVIOUS, DISKS)
    altered = replace(
        batches[0], extents=(batches[0].extents[0], alter(batches[0].extents[1], field, "system"))
    )
    violation = raised(
        lambda: check_commit(VM, OFFSET, commit, [altered, batches[1]], EPOCH, CYCLE, PREVIOUS)
    )
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE}: hash chain mismatch; its records were altered"
    )
    assert violation.state is RESYNC


@pytest.mark.parametrize(("epoch", "cycle"), [(EPOCH + 1, CYCLE), (EPOCH, CYCLE + 1)])
def test_the_hash_covers_the_epoch_and_the_cycle_number(epoch: int, cycle: int) -> None:
    """A commit hashed for another place in the journal, relabelled to fit here, is refused."""
    batches = two_batches()
    relabelled = replace(
        cycle_commit(VM, epoch, cycle, batches, PREVIOUS, DISKS), epoch=EPOCH, cycle=CYCLE
    )
    violation = raised(
        lambda: check_commit(VM, OFFSET, relabelled, batches, EPOCH, CYCLE, PREVIOUS)
    )
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE}: hash chain mismatch; its records were altered"
    )


# --- bounds and checksums: decoding a cycle ------------------------------------------------


def test_a_valid_cycle_decodes_to_its_extents_with_their_data() -> None:
    batches = two_batches()
    decoded = decode_cycle(VM, OFFSET, batches, DISKS)
    assert [(d.disk, d.offset, d.length, d.kind, bytes(d.data)) for d in decoded] == [
        ("system", 0, 4096, ExtentKind.DATA, b"\x11" * 4096),
        ("data", 4096, 512, ExtentKind.DATA, b"\x22" * 512),
        ("system", 8192, 4096, ExtentKind.ZERO, b""),
    ]
    assert all(isinstance(d, DecodedExtent) for d in decoded)


def test_a_zstd_payload_decodes_like_an_uncompressed_one() -> None:
    changes = [
        Change("system", 4096, bytes(range(256)) * 32),
        Change("data", 0, b"z" * 3000),
        Change("data", 3000, kind=ExtentKind.TRIM, length=7000),
    ]
    plain = decode_cycle(VM, OFFSET, [write_batch(VM, EPOCH, CYCLE, 0, changes)], DISKS)
    packed = write_batch(VM, EPOCH, CYCLE, 0, changes, Compression.ZSTD)
    assert len(packed.payload) < 8192 + 3000
    zstd = decode_cycle(VM, OFFSET, [packed], DISKS)
    assert [(d.disk, d.offset, d.length, d.kind, bytes(d.data)) for d in zstd] == [
        (d.disk, d.offset, d.length, d.kind, bytes(d.data)) for d in plain
    ]


@pytest.mark.parametrize(("disk", "offset"), [("system", 64 * 1024 - 512), ("data", 10_000 - 512)])
def test_an_extent_ending_on_the_last_byte_of_its_disk_is_in_bounds(disk: str, offset: int) -> None:
    batch = write_batch(VM, EPOCH, CYCLE, 0, [Change(disk, offset, b"e" * 512)])
    [decoded] = decode_cycle(VM, OFFSET, [batch], DISKS)
    assert (decoded.offset + decoded.length, bytes(decoded.data)) == (DISKS[disk], b"e" * 512)


def out_of_bounds(offset: int, length: int, kind: ExtentKind) -> JournalViolation:
    data = b"o" * length if kind is ExtentKind.DATA else b""
    batch = write_batch(
        VM,
        EPOCH,
        CYCLE,
        3,
        [Change("system", 0, b"ok" * 256), Change("data", offset, data, kind, length)],
    )
    return raised(lambda: decode_cycle(VM, OFFSET, [batch], DISKS))


@pytest.mark.parametrize(
    ("offset", "length", "kind"),
    [
        (10_000 - 511, 512, ExtentKind.DATA),  # one byte past the end
        (10_000, 512, ExtentKind.DATA),  # starts at the end
        (2**40, 512, ExtentKind.DATA),
        (8192, 4096, ExtentKind.ZERO),  # zero and trim extents are bounded too
        (0, 10_001, ExtentKind.TRIM),
    ],
)
def test_an_extent_past_the_end_of_its_disk_is_an_error_not_a_resync(
    offset: int, length: int, kind: ExtentKind
) -> None:
    violation = out_of_bounds(offset, length, kind)
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE} batch 3: extent of {length} bytes at {offset} lies past the "
        "end of disk 'data' (10000 bytes)"
    )
    assert violation.state is ERROR


@pytest.mark.parametrize(
    ("offset", "length", "kind", "problem"),
    [
        (-512, 512, ExtentKind.DATA, "offset -512 is negative"),
        (0, 0, ExtentKind.ZERO, "length 0 is not positive: a range covers at least one byte"),
        (
            512,
            -4096,
            ExtentKind.TRIM,
            "length -4096 is not positive: a range covers at least one byte",
        ),
    ],
)
def test_a_malformed_extent_is_an_error_with_its_own_message(
    offset: int, length: int, kind: ExtentKind, problem: str
) -> None:
    """Not "past the end of disk": a negative offset or an empty range says what it is."""
    violation = out_of_bounds(offset, length, kind)
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE} batch 3: extent of {length} bytes at {offset} of disk "
        f"'data': {problem}"
    )
    assert violation.state is ERROR


def test_an_extent_of_an_unknown_disk_is_an_error() -> None:
    batch = write_batch(VM, EPOCH, CYCLE, 0, [Change("swap", 0, b"s" * 512)])
    violation = raised(lambda: decode_cycle(VM, OFFSET, [batch], DISKS))
    assert str(violation) == f"{prefix()}cycle {CYCLE} batch 0: unknown disk 'swap'"
    assert violation.state is ERROR


def test_a_flipped_bit_fails_the_checksum_of_its_extent() -> None:
    batches = two_batches()
    payload = bytearray(batches[0].payload)
    payload[4096 + 100] ^= 0x04  # in the second extent's bytes
    corrupt = replace(batches[0], payload=bytes(payload))
    violation = raised(lambda: decode_cycle(VM, OFFSET, [corrupt, batches[1]], DISKS))
    assert str(violation) == (
        f"{prefix()}cycle {CYCLE} batch 0: checksum mismatch for 512 bytes at 4096 of disk 'data'"
    )
    assert violation.state is RESYNC


@pytest.mark.parametrize(
    ("payload_offset", "crc", "problem"),
    [
        (4096 + 1, None, "4096 bytes at 4097 lie past the end of the payload (4096 bytes)"),
        (2**31, None, "4096 bytes at 2147483648 lie past the end of the payload (4096 bytes)"),
        (-1, None, "offset -1 is negative"),
        (0, 0, None),  # in bounds, wrong CRC
    ],
    ids=["past-payload", "far-past-payload", "negative", "wrong-crc"],
)
def test_an_extent_whose_bytes_are_not_in_the_payload_is_refused_like_a_bad_checksum(
    payload_offset: int, crc: int | None, problem: str | None
) -> None:
    """Same remedy as a checksum mismatch (the data reference is damaged), its own message."""
    batch = write_batch(VM, EPOCH, CYCLE, 0, [Change("data", 0, b"d" * 4096)])
    extent = batch.extents[0]
    moved = replace(
        extent,
        payload_offset=payload_offset,
        crc32=extent.crc32 if crc is None else zlib.crc32(b"other"),
    )
    violation = raised(lambda: decode_cycle(VM, OFFSET, [replace(batch, extents=(moved,))], DISKS))
    what = (
        "checksum mismatch for 4096 bytes at 0 of disk 'data'"
        if problem is None
        else f"data of 4096 bytes at 0 of disk 'data' is not in the batch's payload: {problem}"
    )
    assert str(violation) == f"{prefix()}cycle {CYCLE} batch 0: {what}"
    assert violation.state is RESYNC


def test_a_payload_that_is_not_zstd_does_not_decompress() -> None:
    batch = replace(
        write_batch(VM, EPOCH, CYCLE, 2, [Change("data", 0, b"d" * 4096)]),
        compression=Compression.ZSTD,
    )
    violation = raised(lambda: decode_cycle(VM, OFFSET, [batch], DISKS))
    assert str(violation).startswith(
        f"{prefix()}cycle {CYCLE} batch 2: payload does not decompress ("
    )
    assert violation.state is RESYNC
