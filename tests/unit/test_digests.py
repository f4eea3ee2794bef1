"""The one block-digest scheme: SHA-256/16 per block, holes hashed as zeros without reading."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vmreplica.storage.digests import (
    DIGEST_BYTES,
    block_digest,
    data_block_ranges,
    differing_blocks,
    image_digests,
    zero_digest,
)
from vmreplica.storage.image import DiskImage

BLOCK = 64 * 1024


def test_block_digest_is_truncated_sha256_with_a_short_block_padded() -> None:
    data = os.urandom(BLOCK)
    assert block_digest(data, BLOCK) == hashlib.sha256(data).digest()[:DIGEST_BYTES]
    assert block_digest(data[:100], BLOCK) == block_digest(data[:100] + bytes(BLOCK - 100), BLOCK)
    assert block_digest(b"", BLOCK) == zero_digest(BLOCK) == block_digest(bytes(BLOCK), BLOCK)


def test_image_digests_equal_reading_every_block(tmp_path: Path) -> None:
    size = 10 * BLOCK + 1000  # a short last block
    path = tmp_path / "disk.img"
    with DiskImage.create(path, size) as image:
        image.write(BLOCK + 5, os.urandom(3 * BLOCK))  # unaligned: blocks 1..4
        image.write(7 * BLOCK, bytes(BLOCK))  # written zeros: allocated, same digest as a hole
        image.write(size - 11, b"end of disk")
        assert data_block_ranges(image, BLOCK)[0] == (1, 5)
        expected = b"".join(
            block_digest(image.read(offset, min(BLOCK, size - offset)), BLOCK)
            for offset in range(0, size, BLOCK)
        )
    digests = image_digests(path, BLOCK)
    assert digests == expected
    assert len(digests) == 11 * DIGEST_BYTES
    assert digests[:DIGEST_BYTES] == zero_digest(BLOCK)


def test_differing_blocks() -> None:
    a, b, z = (bytes([n]) * DIGEST_BYTES for n in (1, 2, 0))
    assert differing_blocks(a + b + z, a + z + z) == [1]
    assert differing_blocks(a + b, a + b + z) == [2]  # a block only one side has differs
    assert differing_blocks(a, a) == []
