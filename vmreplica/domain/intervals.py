"""A set of byte ranges: sorted, disjoint, merged intervals ``[start, end)``.

Used wherever vmreplica must know which bytes of a disk something already covers: coalescing a
cycle's writes, and the scratch layer of a test-failover view.
"""

from __future__ import annotations

import bisect


class IntervalSet:
    """Disjoint, sorted, merged intervals; ``add`` merges touching ones."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __len__(self) -> int:
        return len(self.starts)

    def covered(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of ``[start, end)`` inside the set, in order."""
        result = []
        i = bisect.bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            low, high = max(start, self.starts[i]), min(end, self.ends[i])
            if low < high:
                result.append((low, high))
            i += 1
        return result

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Parts of ``[start, end)`` not in the set, in order."""
        result = []
        cursor = start
        for low, high in self.covered(start, end):
            if low > cursor:
                result.append((cursor, low))
            cursor = high
        if cursor < end:
            result.append((cursor, end))
        return result

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def total(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))
