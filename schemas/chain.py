"""The hash chain over cycles, which both sides compute the same way.

``cycle_hash = sha256(previous_hash | epoch | cycle | every extent's disk, offset, length, kind and
CRC-32)``. The CRC-32 covers each extent's data, so the chain pins the content of every cycle; a
replica recomputes it from what it received and refuses a cycle whose hash or predecessor differ.
An epoch starts from the ``last_cycle_hash`` its EpochStart names.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Final

from vmreplica.schemas.events import Extent

GENESIS_HASH: Final = bytes(32)
"""The predecessor of a VM's first cycle."""
_HEAD = struct.Struct("<QQ")
_EXTENT = struct.Struct("<QQBI")
_KIND_CODE: Final = {"DATA": 0, "ZERO": 1, "TRIM": 2}


class CycleHasher:
    """:func:`cycle_hash` computed batch by batch, as a cycle's records arrive."""

    def __init__(self, previous_hash: bytes, epoch: int, cycle: int) -> None:
        self._digest = hashlib.sha256(previous_hash)
        self._digest.update(_HEAD.pack(epoch, cycle))

    def update(self, extents: Iterable[Extent]) -> None:
        for extent in extents:
            name = extent.disk.encode()
            self._digest.update(len(name).to_bytes(2, "little") + name)
            self._digest.update(
                _EXTENT.pack(
                    extent.offset,
                    extent.length,
                    _KIND_CODE[extent.kind.value],
                    extent.crc32 & 0xFFFFFFFF,
                )
            )

    def digest(self) -> bytes:
        return self._digest.digest()


def cycle_hash(previous_hash: bytes, epoch: int, cycle: int, extents: Iterable[Extent]) -> bytes:
    hasher = CycleHasher(previous_hash, epoch, cycle)
    hasher.update(extents)
    return hasher.digest()
