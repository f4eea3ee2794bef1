"""Block digests: the one scheme both sides use to tell which blocks of a disk differ.

A block's digest is SHA-256 truncated to :data:`DIGEST_BYTES` (16) bytes of its content, a short
last block padded with zeros to the block size, so a hole, a zeroed block and an all-zero short
tail all have the digest of zeros. The change scan keeps one per 64 KiB block of the last
shipped state (``producers/scan.py``); a replica asked for a resynchronization
(``consumers/replica.py``) and the failover block-compare fallback send them in ``DigestMap``
events, and the primary compares them with its own (``vmreplica/failover/divergence.py``).

Why SHA-256 and not BLAKE2b: measured on 64 KiB blocks with ``timeit`` here (CPython 3.11,
OpenSSL 3.0 with the SHA extensions), ``hashlib.sha256`` takes 38–43 µs per block (1.5–1.7 GB/s)
and ``hashlib.blake2b(digest_size=16)`` 74–76 µs (0.86–0.88 GB/s): OpenSSL's SHA-256 uses the
CPU's SHA instructions (x86 SHA-NI, ARMv8 SHA2), CPython's BLAKE2b has no such help. It is
also what the scan's saved hash files already hold, so they stay valid across the change.
Sixteen bytes leave a random collision at 2^-128 per block pair: no attacker picks the
content of both disks being compared, so the truncation costs nothing that matters here.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

from vmreplica.storage.image import DiskImage

DIGEST_BYTES: Final = 16
"""Bytes of one block digest, as saved by the scan and carried by ``DigestMap``."""
DIGEST_BLOCK_BYTES_MIN: Final = 64 * 1024
"""Block size of a DigestMap for disks up to 16 GiB (:data:`DIGEST_BLOCKS_MAX` blocks)."""
DIGEST_BLOCKS_MAX: Final = 262_144
"""Blocks per DigestMap: keeps a record near 4 MiB; larger disks use larger blocks."""
PROGRESS_BLOCKS: Final = 256
""":func:`image_digests` reports progress every this many blocks (16 MiB of 64 KiB blocks)."""


def digest_block_bytes(size: int) -> int:
    """The block size of a disk's DigestMap: 64 KiB, doubled until the map stays small."""
    block = DIGEST_BLOCK_BYTES_MIN
    while size / block > DIGEST_BLOCKS_MAX:
        block *= 2
    return block


def digest_count(size: int, block_bytes: int) -> int:
    """How many digests cover a disk of ``size`` bytes in blocks of ``block_bytes``."""
    return -(-size // block_bytes)


def block_digest(data: bytes | bytearray | memoryview, block_bytes: int) -> bytes:
    """The digest of one block; a short last block is hashed as if padded with zeros."""
    hasher = hashlib.sha256(data)
    if len(data) < block_bytes:
        hasher.update(bytes(block_bytes - len(data)))
    return hasher.digest()[:DIGEST_BYTES]


@functools.lru_cache(maxsize=8)
def zero_digest(block_bytes: int) -> bytes:
    """The digest of a block of zeros (a hole): computed once per block size."""
    return block_digest(bytes(block_bytes), block_bytes)


def data_block_ranges(image: DiskImage, block_bytes: int) -> list[tuple[int, int]]:
    """``[first, end)`` block numbers that hold allocated data, merged, in order.

    Every other block is a hole: all zeros, known without reading it.
    """
    ranges: list[tuple[int, int]] = []
    for start, length in image.allocated_extents():
        first, end = start // block_bytes, -(-(start + length) // block_bytes)
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
        else:
            ranges.append((first, end))
    return ranges


def image_digests(
    path: str | Path, block_bytes: int, progress: Callable[[int], None] | None = None
) -> bytes:
    """The digest of every block of the image at ``path``, concatenated in block order.

    Holes are hashed as zeros without reading them. ``progress``, if given, is called now and
    then with how many bytes from the start of the disk are done (holes count as done).
    """
    with DiskImage.open(path, writable=False) as image:
        count = digest_count(image.size, block_bytes)
        out = bytearray(zero_digest(block_bytes) * count)
        for first, end in data_block_ranges(image, block_bytes):
            for number in range(first, end):
                offset = number * block_bytes
                data = image.read(offset, min(block_bytes, image.size - offset))
                out[number * DIGEST_BYTES : (number + 1) * DIGEST_BYTES] = block_digest(
                    data, block_bytes
                )
                if progress is not None and number % PROGRESS_BLOCKS == 0:
                    progress(offset)
        if progress is not None:
            progress(image.size)
    return bytes(out)


def differing_blocks(ours: bytes, theirs: bytes) -> list[int]:
    """Numbers of the blocks whose digests differ between two digest strings.

    Blocks present in only one of them (disks of different sizes) count as differing.
    """
    count = max(len(ours), len(theirs)) // DIGEST_BYTES
    return [
        number
        for number in range(count)
        if ours[number * DIGEST_BYTES : (number + 1) * DIGEST_BYTES]
        != theirs[number * DIGEST_BYTES : (number + 1) * DIGEST_BYTES]
    ]
