"""Sequence integrity over whole journals: gaps, duplicates, reordering, replays and corruption
are refused at the first record out of place, and nothing after the last good cycle is applied.

:class:`RuleChecker` feeds records to the rules of ``consumers/journal_rules.py`` the way the
materialiser's step 1 does (a batch is checked as it arrives; at the commit the cycle is checked,
then decoded), without images, catalog or broker. Journals are built valid
(``tests/journal_records.py``), then hypothesis breaks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.journal_records import HASHED_FIELDS, Change, alter, cycle_commit, write_batch
from vmreplica.consumers.journal_rules import (
    check_batch,
    check_commit,
    decode_cycle,
)
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import JournalViolation
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import Compression, CycleCommit, ExtentKind, WriteBatch

VM: Final = "vm-p"
EPOCH: Final = 3
DISKS: Final = {"a": 8192, "b": 3000}
Record = WriteBatch | CycleCommit
Applied = tuple[int, list[tuple[str, int, int, ExtentKind, bytes]]]
"""A cycle number and its decoded extents."""


@dataclass
class RuleChecker:
    """The rules in the order the materialiser applies them, from a replica at cycle 0."""

    cycle: int = 0
    cycle_hash: bytes = GENESIS_HASH
    pending: list[WriteBatch] = field(default_factory=list)
    applied: list[Applied] = field(default_factory=list)

    def feed(self, records: Sequence[Record]) -> None:
        """:raises JournalViolation: at the first record a rule refuses (offset = index)."""
        for offset, record in enumerate(records):
            if isinstance(record, WriteBatch):
                check_batch(VM, offset, record, EPOCH, self.cycle + 1, len(self.pending))
                self.pending.append(record)
                continue
            check_commit(VM, offset, record, self.pending, EPOCH, self.cycle + 1, self.cycle_hash)
            extents = decode_cycle(VM, offset, self.pending, DISKS)
            self.applied.append(
                (
                    record.cycle,
                    [(e.disk, e.offset, e.length, e.kind, bytes(e.data)) for e in extents],
                )
            )
            self.cycle, self.cycle_hash, self.pending = record.cycle, record.cycle_hash, []


@st.composite
def changes(draw: st.DrawFn) -> Change:
    disk = draw(st.sampled_from(sorted(DISKS)))
    size = DISKS[disk]
    offset = draw(st.integers(0, size - 1))
    length = draw(st.integers(1, min(600, size - offset)))
    kind = draw(
        st.sampled_from([ExtentKind.DATA, ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.TRIM])
    )
    if kind is ExtentKind.DATA:
        return Change(disk, offset, draw(st.binary(min_size=length, max_size=length)))
    return Change(disk, offset, kind=kind, length=length)


CycleSpec = list[list[Change]]
"""The changes of each batch of one cycle (a cycle may have no batch: a cut with no change)."""
journals = st.lists(st.lists(st.lists(changes(), max_size=4), max_size=3), min_size=1, max_size=6)


def build(
    cycles: Sequence[CycleSpec],
    compression: Compression = Compression.NONE,
) -> list[Record]:
    """Cycles 1, 2, … as the shipper publishes them: each cycle's batches, then its commit."""
    records: list[Record] = []
    previous = GENESIS_HASH
    for number, spec in enumerate(cycles, start=1):
        batches = [
            write_batch(VM, EPOCH, number, index, batch, compression)
            for index, batch in enumerate(spec)
        ]
        commit = cycle_commit(VM, EPOCH, number, batches, previous, DISKS)
        records += [*batches, commit]
        previous = commit.cycle_hash
    return records


def expected(cycles: Sequence[CycleSpec]) -> list[Applied]:
    return [
        (number, [(c.disk, c.offset, c.size, c.kind, c.data) for batch in spec for c in batch])
        for number, spec in enumerate(cycles, start=1)
    ]


def commits_before(records: Sequence[Record], index: int) -> list[int]:
    return [r.cycle for r in records[:index] if isinstance(r, CycleCommit)]


@given(journals, st.sampled_from(Compression))
def test_a_valid_journal_is_applied_whole_and_exactly(
    cycles: list[CycleSpec], compression: Compression
) -> None:
    checker = RuleChecker()
    checker.feed(build(cycles, compression))
    assert checker.applied == expected(cycles)
    assert checker.pending == []


MUTATIONS: Final = ("drop", "duplicate", "swap", "replay", "newer-epoch")


def mutate(records: list[Record], how: str, data: st.DataObject) -> list[Record]:
    """``records`` with one record dropped, doubled, swapped with the next, relabelled to the
    next epoch, or a whole earlier cycle replayed (what a re-sent transaction looks like)."""
    last = len(records) - 1
    if how == "drop":
        index = data.draw(st.integers(0, last))
        return records[:index] + records[index + 1 :]
    if how == "duplicate":
        index = data.draw(st.integers(0, last))
        return records[: index + 1] + records[index:]
    if how == "swap":
        index = data.draw(st.integers(0, max(last - 1, 0)))
        swapped = list(records)
        swapped[index : index + 2] = reversed(swapped[index : index + 2])
        return swapped
    if how == "newer-epoch":
        index = data.draw(st.integers(0, last))
        return [*records[:index], replace(records[index], epoch=EPOCH + 1), *records[index + 1 :]]
    commit_at = data.draw(
        st.sampled_from([i for i, r in enumerate(records) if isinstance(r, CycleCommit)])
    )
    start = max(
        (i + 1 for i, r in enumerate(records[:commit_at]) if isinstance(r, CycleCommit)), default=0
    )
    at = data.draw(st.integers(commit_at + 1, len(records)))
    return records[:at] + records[start : commit_at + 1] + records[at:]


@given(journals, st.sampled_from(MUTATIONS), st.data())
def test_the_first_record_out_of_place_is_refused_and_nothing_after_it_applies(
    cycles: list[CycleSpec], how: str, data: st.DataObject
) -> None:
    original = build(cycles)
    broken = mutate(original, how, data)
    first = next(
        (i for i, (a, b) in enumerate(zip(broken, original, strict=False)) if a != b),
        min(len(broken), len(original)),
    )
    checker = RuleChecker()
    if first == len(broken):  # the mutation only shortened the journal (its last commit)
        checker.feed(broken)
        assert checker.applied == expected(cycles)[: len(commits_before(broken, first))]
        return
    with pytest.raises(JournalViolation) as caught:
        checker.feed(broken)
    violation = caught.value
    assert (violation.vm, violation.offset, violation.state) == (
        VM,
        first,
        ReplicationState.RESYNCHRONIZATION_REQUIRED,
    ), (how, str(violation))
    assert str(violation).startswith(f"VM {VM!r}, journal offset {first}: ")
    assert [cycle for cycle, _ in checker.applied] == commits_before(original, first)
    assert checker.applied == expected(cycles)[: len(checker.applied)]


def _data_extents(records: Sequence[Record]) -> list[tuple[int, int]]:
    """(record index, extent index) of every DATA extent."""
    return [
        (i, e)
        for i, r in enumerate(records)
        if isinstance(r, WriteBatch)
        for e, extent in enumerate(r.extents)
        if extent.kind is ExtentKind.DATA
    ]


def _commit_after(records: Sequence[Record], index: int) -> int:
    return next(i for i in range(index, len(records)) if isinstance(records[i], CycleCommit))


@given(journals, st.data())
def test_any_flipped_payload_bit_fails_the_checksum_of_its_extent(
    cycles: list[CycleSpec], data: st.DataObject
) -> None:
    records = build(cycles)
    candidates = _data_extents(records)
    if not candidates:
        return
    index, number = data.draw(st.sampled_from(candidates))
    batch = records[index]
    assert isinstance(batch, WriteBatch)
    extent = batch.extents[number]
    byte = data.draw(st.integers(extent.payload_offset, extent.payload_offset + extent.length - 1))
    payload = bytearray(batch.payload)
    payload[byte] ^= 1 << data.draw(st.integers(0, 7))
    records[index] = replace(batch, payload=bytes(payload))
    checker = RuleChecker()
    with pytest.raises(JournalViolation) as caught:
        checker.feed(records)
    commit = _commit_after(records, index)
    assert str(caught.value) == (
        f"VM {VM!r}, journal offset {commit}: cycle {batch.cycle} batch {batch.batch}: "
        f"checksum mismatch for {extent.length} bytes at {extent.offset} of disk "
        f"{extent.disk!r}"
    )
    assert caught.value.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
    assert checker.applied == expected(cycles)[: batch.cycle - 1]


@given(journals, st.sampled_from(HASHED_FIELDS), st.data())
def test_any_altered_extent_breaks_the_hash_chain(
    cycles: list[CycleSpec], what: str, data: st.DataObject
) -> None:
    records = build(cycles)
    candidates = [
        (i, e)
        for i, r in enumerate(records)
        if isinstance(r, WriteBatch)
        for e in range(len(r.extents))
    ]
    if not candidates:
        return
    index, number = data.draw(st.sampled_from(candidates))
    batch = records[index]
    assert isinstance(batch, WriteBatch)
    extent = batch.extents[number]
    extents = list(batch.extents)
    extents[number] = alter(extent, what, "b" if extent.disk == "a" else "a")
    records[index] = replace(batch, extents=tuple(extents))
    checker = RuleChecker()
    with pytest.raises(JournalViolation) as caught:
        checker.feed(records)
    assert str(caught.value) == (
        f"VM {VM!r}, journal offset {_commit_after(records, index)}: cycle {batch.cycle}: "
        "hash chain mismatch; its records were altered"
    )
    assert checker.applied == expected(cycles)[: batch.cycle - 1]
