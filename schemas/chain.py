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


def cycle_hash(previous_hash: bytes, epoch: int, cycle: int, extents: Iterable[Extent]) -> bytes:
    digest = hashlib.sha256(previous_hash)
    digest.update(_HEAD.pack(epoch, cycle))
    for extent in extents:
        name = extent.disk.encode()
        digest.update(len(name).to_bytes(2, "little") + name)
        digest.update(
            _EXTENT.pack(
                extent.offset,
                extent.length,
                _KIND_CODE[extent.kind.value],
                extent.crc32 & 0xFFFFFFFF,
            )
        )
    return digest.digest()
