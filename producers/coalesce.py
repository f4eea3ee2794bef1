"""Coalescing a cycle's writes: only the last content of each byte survives.

Only cycle boundaries are ever exposed on a replica, so a block rewritten fifty times inside one
cycle need be sent once. Pure functions, no I/O: the input is the cycle's change records in log
order, the output non-overlapping pieces, each pointing into the record that wrote it last.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vmreplica.domain.intervals import IntervalSet
from vmreplica.schemas.events import ExtentKind

Source = TypeVar("Source")


@dataclass(frozen=True, slots=True)
class Change(Generic[Source]):
    """A write, zero or trim of ``length`` bytes at ``offset`` of disk ``disk``."""

    disk: int
    offset: int
    length: int
    kind: ExtentKind
    source: Source
    """Where the data lives (for DATA), opaque to coalescing."""


@dataclass(frozen=True, slots=True)
class Piece(Generic[Source]):
    """The surviving part of one change: bytes ``[start, start+length)`` of its source."""

    disk: int
    offset: int
    length: int
    kind: ExtentKind
    source: Source
    start: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(changes: Iterable[Change[Source]]) -> list[Piece[Source]]:
    """The pieces that determine the disks' content after all ``changes``, sorted by position.

    Walks the changes newest first and keeps the parts no newer change overwrote; cost is
    O(n log n) in the number of changes, independent of how many bytes they carry.
    """
    covered: dict[int, IntervalSet] = {}
    pieces: list[Piece[Source]] = []
    for change in reversed(list(changes)):
        if change.length <= 0:
            continue
        claimed = covered.setdefault(change.disk, IntervalSet())
        end = change.offset + change.length
        for gap_start, gap_end in claimed.gaps(change.offset, end):
            pieces.append(
                Piece(
                    change.disk,
                    gap_start,
                    gap_end - gap_start,
                    change.kind,
                    change.source,
                    gap_start - change.offset,
                )
            )
        claimed.add(change.offset, end)
    pieces.sort(key=lambda piece: (piece.disk, piece.offset))
    return pieces


def merge_adjacent(pieces: list[Piece[Source]]) -> list[Piece[Source]]:
    """Join neighbouring ZERO or TRIM pieces of the same disk into one (fewer extents)."""
    merged: list[Piece[Source]] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if (
            last is not None
            and piece.kind is not ExtentKind.DATA
            and last.kind is piece.kind
            and last.disk == piece.disk
            and last.end == piece.offset
        ):
            merged[-1] = Piece(
                last.disk,
                last.offset,
                last.length + piece.length,
                last.kind,
                last.source,
                last.start,
            )
        else:
            merged.append(piece)
    return merged
