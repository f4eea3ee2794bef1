"""Replay invariants of the undo log, over random cycles of writes, zeros and trims on two disks.

For any history of cycles, the image of every recovery point P rebuilt from the head and the undo
of cycles P+1 … head equals, digest for digest, the image as it was after cycle P; and rolling
back a cycle whose apply was interrupted part-way gives back the image from before the cycle.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from vmreplica.consumers.overlay import materialize_point
from vmreplica.consumers.undo import UndoLog
from vmreplica.storage.image import DiskImage, sha256_of

BLOCK = 4096
DISK_SIZES = {"sda": 8 * BLOCK, "sdb": 3 * BLOCK + 1234}
"""Two small disks; the second ends in a partial block, so the last block is exercised too."""


ChangeKind = Literal["write", "zero", "trim"]
Pattern = Literal["random", "repeated", "zeros"]
KINDS: list[ChangeKind] = ["write", "write", "zero", "trim"]
PATTERNS: list[Pattern] = ["random", "repeated", "zeros"]


@dataclass(frozen=True)
class Change:
    """One extent of a cycle: new content, zeros or a trim."""

    kind: ChangeKind
    disk: str
    offset: int
    length: int
    pattern: Pattern
    seed: int

    def content(self) -> bytes:
        if self.pattern == "zeros":
            return bytes(self.length)
        if self.pattern == "repeated":
            return bytes([self.seed % 255 + 1]) * self.length
        return random.Random(self.seed).randbytes(self.length)

    def apply(self, image: DiskImage) -> None:
        if self.kind == "write":
            image.write(self.offset, self.content())
        elif self.kind == "zero":
            image.zero(self.offset, self.length)
        else:
            image.trim(self.offset, self.length)


@st.composite
def changes(draw: st.DrawFn) -> Change:
    disk = draw(st.sampled_from(sorted(DISK_SIZES)))
    size = DISK_SIZES[disk]
    length = draw(st.integers(1, 2 * BLOCK + 100))
    at_end = draw(st.booleans())
    offset = size - length if at_end else draw(st.integers(0, size - length))
    return Change(
        draw(st.sampled_from(KINDS)),
        disk,
        offset,
        length,
        draw(st.sampled_from(PATTERNS)),
        draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class Cycle:
    changes: tuple[Change, ...]
    interleaved: bool
    """Capture each range just before writing it (overlaps then see earlier writes of the cycle)
    instead of capturing every range before the first write."""


cycles = st.builds(Cycle, st.lists(changes(), max_size=6).map(tuple), st.booleans())


def digests(images: dict[str, DiskImage]) -> dict[str, str]:
    return {disk: sha256_of(image) for disk, image in images.items()}


def apply_cycle(log: UndoLog, images: dict[str, DiskImage], number: int, cycle: Cycle) -> None:
    with log.writer(number) as writer:
        for change in cycle.changes:
            writer.capture(change.disk, images[change.disk], change.offset, change.length)
            if cycle.interleaved:
                change.apply(images[change.disk])
        writer.seal()
    if not cycle.interleaved:
        for change in cycle.changes:
            change.apply(images[change.disk])


def create_images(folder: Path) -> dict[str, DiskImage]:
    return {
        disk: DiskImage.create(folder / f"{disk}.img", size) for disk, size in DISK_SIZES.items()
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(cycles, min_size=1, max_size=6))
def test_every_point_rebuilds_to_its_digests(history: list[Cycle]) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        images = create_images(folder)
        log = UndoLog(folder / "undo")
        expected = [digests(images)]
        for number, cycle in enumerate(history, start=1):
            apply_cycle(log, images, number, cycle)
            expected.append(digests(images))
        head = len(history)
        for point in range(head + 1):
            overlay = log.overlay_at(point, head)
            outputs = {disk: folder / f"point-{point}-{disk}.img" for disk in images}
            materialize_point(images, overlay, outputs)
            assert {disk: sha256_of(path) for disk, path in outputs.items()} == expected[point]
            for disk, image in images.items():
                view = overlay.read(disk, 0, image.size, image)
                with DiskImage.open(outputs[disk], writable=False) as rebuilt:
                    assert view == rebuilt.read(0, rebuilt.size)
        for image in images.values():
            image.close()


@settings(max_examples=80, deadline=None)
@given(st.lists(cycles, max_size=4), cycles, st.data())
def test_rollback_of_a_partly_applied_cycle(
    history: list[Cycle], last: Cycle, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        images = create_images(folder)
        log = UndoLog(folder / "undo")
        for number, cycle in enumerate(history, start=1):
            apply_cycle(log, images, number, cycle)
        before = digests(images)
        number = len(history) + 1
        applied = data.draw(st.integers(0, len(last.changes)), label="changes applied")
        with log.writer(number) as writer:
            for index, change in enumerate(last.changes):
                writer.capture(change.disk, images[change.disk], change.offset, change.length)
                if last.interleaved and index < applied:
                    change.apply(images[change.disk])
            writer.seal()
        if not last.interleaved:
            for change in last.changes[:applied]:
                change.apply(images[change.disk])
        log.rollback(images, number)
        assert digests(images) == before
        log.rollback(images, number)
        assert digests(images) == before
        for image in images.values():
            image.close()
