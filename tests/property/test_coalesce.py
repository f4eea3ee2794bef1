"""Coalescing keeps exactly the last content of every byte, whatever the order of rewrites."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from vmreplica.domain.intervals import IntervalSet
from vmreplica.producers.coalesce import Change, coalesce
from vmreplica.schemas.events import ExtentKind

SIZE = 256
changes = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.integers(0, SIZE - 1),
        st.integers(1, 64),
        st.sampled_from(list(ExtentKind)),
    ),
    max_size=40,
)


@given(changes)
def test_applying_the_pieces_equals_applying_every_change(
    raw: list[tuple[int, int, int, ExtentKind]],
) -> None:
    items = [
        Change(disk, offset, min(length, SIZE - offset), kind, index)
        for index, (disk, offset, length, kind) in enumerate(raw)
    ]

    def fill(index: int) -> int:
        return index % 250 + 1

    expected = [bytearray(SIZE), bytearray(SIZE)]
    for change in items:
        value = fill(change.source) if change.kind is ExtentKind.DATA else 0
        expected[change.disk][change.offset : change.offset + change.length] = (
            bytes([value]) * change.length
        )
    got = [bytearray(SIZE), bytearray(SIZE)]
    pieces = coalesce(items)
    for piece in pieces:
        value = fill(piece.source) if piece.kind is ExtentKind.DATA else 0
        got[piece.disk][piece.offset : piece.end] = bytes([value]) * piece.length
    assert got == expected
    for disk in (0, 1):  # pieces never overlap
        spans = sorted((p.offset, p.end) for p in pieces if p.disk == disk)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in pairwise(spans))


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=30),
    st.integers(0, 250),
    st.integers(0, 250),
)
def test_interval_set_covered_and_gaps_partition_a_range(
    ranges: list[tuple[int, int]], low: int, span: int
) -> None:
    intervals = IntervalSet()
    truth: set[int] = set()
    for start, length in ranges:
        intervals.add(start, start + length)
        truth.update(range(start, start + length))
    high = low + span
    covered = {b for s, e in intervals.covered(low, high) for b in range(s, e)}
    gaps = {b for s, e in intervals.gaps(low, high) for b in range(s, e)}
    assert covered == {b for b in range(low, high) if b in truth}
    assert gaps == {b for b in range(low, high) if b not in truth}
    assert intervals.total() == len(truth)
