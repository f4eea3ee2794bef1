"""One cycle applied batch by batch, in bounded memory, and still all or nothing.

A cycle may be far larger than the replica's memory (an over-budget cycle of several GiB), so
the materialiser does not gather its batches before applying them. Each batch, once its
signature was verified (:mod:`vmreplica.security.authorization`), is decoded and checked alone
(bounds, CRC-32: :func:`~vmreplica.consumers.journal_rules.decode_batch`), its extents added to
the running hash of the cycle, and held. Whenever the held data reaches
:data:`HELD_MAX_BYTES`, and at the commit:

1. the old content of every held range goes to the cycle's undo log (and to each open
   test-failover view, so it stays at its point);
2. the undo log is made durable (:meth:`~vmreplica.consumers.undo.UndoWriter.sync`), or sealed
   at the commit;
3. the held ranges are written into the images.

So every range written into an image has its old content in a durable undo record first. The
commit is checked (sequence, batch count, hash chain) before the last write; a cycle that fails
it, a violation in a later batch, an epoch change or a reconnect before the commit, all
:meth:`CycleApply.abandon` it: the undo log's records go back into the images, newest first,
and the file is removed. A crash does the same at the next start
(:meth:`~vmreplica.consumers.materializer.Materializer.recover`). A cycle that fits in
:data:`HELD_MAX_BYTES` — most do — is written only after its commit was checked, in the order
the undo log was designed for: undo sealed, then images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from vmreplica.consumers.journal_rules import (
    DecodedExtent,
    check_streamed_commit,
    decode_batch,
)
from vmreplica.consumers.undo import RECORD_DATA_MAX_BYTES, SealedUndo, UndoLog, UndoWriter
from vmreplica.consumers.views import PointView
from vmreplica.schemas.chain import CycleHasher
from vmreplica.schemas.events import CycleCommit, ExtentKind, WriteBatch
from vmreplica.schemas.payload import PayloadUnpacker
from vmreplica.storage.image import DiskImage

HELD_MAX_BYTES: Final = 32 * 1024 * 1024
"""Decoded data a cycle holds before writing it: a replica's memory per VM, however big the
cycle. Every flush fsyncs the undo log once, so larger means fewer fsyncs."""


class CycleApply:
    """The cycle ``cycle`` of ``epoch``, from its first batch until it is applied or abandoned."""

    def __init__(
        self,
        vm: str,
        epoch: int,
        cycle: int,
        previous_hash: bytes,
        images: Mapping[str, DiskImage],
        undo: UndoLog,
        views: Sequence[PointView],
        held_max_bytes: int = HELD_MAX_BYTES,
    ) -> None:
        self.vm = vm
        self.epoch = epoch
        self.cycle = cycle
        self.previous_hash = previous_hash
        self.images = images
        self.undo = undo
        self.views = views
        self.held_max_bytes = held_max_bytes
        self.batches = 0
        """Batches received so far (the next one must carry this number)."""
        self.written = False
        """Whether any range reached an image (then abandoning writes the old content back)."""
        self._hasher = CycleHasher(previous_hash, epoch, cycle)
        self._held: list[DecodedExtent] = []
        self._held_bytes = 0
        self._writer: UndoWriter | None = None

    def add(self, offset: int, batch: WriteBatch, unpacker: PayloadUnpacker) -> None:
        """Check and hold one batch (numbered and sequenced by the caller); write what is held
        once it reaches the bound.

        :raises JournalViolation: the batch fails a check; nothing of it was written.
        """
        sizes = {name: image.size for name, image in self.images.items()}
        extents = decode_batch(self.vm, offset, batch, sizes, unpacker)
        self._hasher.update(batch.extents)
        self.batches += 1
        self._held.extend(extents)
        self._held_bytes += sum(len(extent.data) for extent in extents)
        if self._held_bytes >= self.held_max_bytes:
            self._write_held(seal=False)

    def finish(self, offset: int, commit: CycleCommit) -> SealedUndo:
        """Check the commit against what arrived, then write the rest and seal the undo log;
        the images are not fsynced yet (the caller's next step).

        :raises JournalViolation: the commit does not match; the caller abandons the cycle.
        """
        check_streamed_commit(
            self.vm,
            offset,
            commit,
            self.batches,
            self._hasher.digest(),
            self.epoch,
            self.cycle,
            self.previous_hash,
        )
        sealed = self._write_held(seal=True)
        assert sealed is not None
        return sealed

    def abandon(self) -> None:
        """Give the cycle up: restore every range written so far from the undo log, fsync, and
        remove the undo log. Harmless when nothing was written."""
        self._held.clear()
        self._held_bytes = 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.undo.status(self.cycle) != "missing":
            self.undo.rollback(self.images, self.cycle)
            self.undo.discard(self.cycle)

    def close(self) -> None:
        """Close the undo log without touching it (a crash's effect: recovery rolls it back)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_held(self, seal: bool) -> SealedUndo | None:
        """Steps 1-3 of the module docstring for the held extents."""
        if self._writer is None:
            self._writer = UndoWriter(self.undo.folder, self.cycle)
        writer = self._writer
        for extent in self._held:  # 1
            image = self.images[extent.disk]
            if not self.views:  # holes are recorded as zeros without reading them
                writer.capture(extent.disk, image, extent.offset, extent.length)
                continue
            end = extent.offset + extent.length
            for start in range(extent.offset, end, RECORD_DATA_MAX_BYTES):
                old = image.read(start, min(RECORD_DATA_MAX_BYTES, end - start))
                writer.add(extent.disk, start, old)
                for view in self.views:  # test failovers stay at their point
                    view.preserve(extent.disk, start, old)
        sealed = writer.seal() if seal else None  # 2
        if not seal:
            writer.sync()
        for extent in self._held:  # 3
            _write(self.images[extent.disk], extent)
            self.written = True
        self._held.clear()
        self._held_bytes = 0
        return sealed


def _write(image: DiskImage, extent: DecodedExtent) -> None:
    if extent.kind is ExtentKind.DATA:
        image.write(extent.offset, extent.data)
    elif extent.kind is ExtentKind.ZERO:
        image.zero(extent.offset, extent.length)
    else:
        image.trim(extent.offset, extent.length)
