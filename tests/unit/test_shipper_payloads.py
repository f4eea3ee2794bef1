"""What the cycle builder puts in write batches: zero detection, compression decisions, checksums.

The builder skips zstd (through :class:`PayloadPacker`) for payloads whose samples do not compress
and turns all-zero writes into ZERO extents without scanning ordinary data; these tests pin that
the shortcuts never change what a replica reconstructs.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import zstandard

from vmreplica.producers.changelog import ChangeLog, CutMark
from vmreplica.producers.shipper import BATCH_PAYLOAD_BYTES, CycleBuilder
from vmreplica.schemas.events import Compression, DiskSize, ExtentKind
from vmreplica.schemas.payload import PayloadPacker
from vmreplica.storage.image import is_zero

MiB = 1024 * 1024


def test_all_zero_looks_at_every_byte() -> None:
    assert is_zero(bytes(1))
    assert is_zero(bytes(BATCH_PAYLOAD_BYTES))
    assert not is_zero(b"\x01")
    middle = bytearray(64 * 1024)
    middle[12345] = 7
    assert not is_zero(bytes(middle))


def test_incompressible_payloads_are_sent_raw_and_compressible_ones_compressed() -> None:
    packer = PayloadPacker()
    noise = os.urandom(4 * MiB)
    assert packer.pack(noise) == (Compression.NONE, noise)
    text = b"".join(
        b"block %08d of a file system full of ordinary text\n" % i for i in range(80_000)
    )
    compression, packed = packer.pack(text)
    assert compression is Compression.ZSTD
    assert zstandard.ZstdDecompressor().decompress(packed) == text
    small = b"abc" * 100
    assert packer.pack(small)[0] is Compression.ZSTD
    # Half noise, half text: the samples see both, and the payload still shrinks by half.
    mixed = noise[: 2 * MiB] + text[: 2 * MiB]
    compression, packed = packer.pack(mixed)
    assert compression is Compression.ZSTD
    assert zstandard.ZstdDecompressor().decompress(packed) == mixed


def test_extents_carry_the_newest_data_with_checksums_and_zero_writes_become_zero_extents(
    tmp_path: Path,
) -> None:
    log = ChangeLog(tmp_path)
    log.open()
    first, newest = os.urandom(MiB), os.urandom(64 * 1024)
    log.write(0, 0, first)
    log.write(0, 4096, newest)  # overwrites part of the first write
    log.write(0, 2 * MiB, bytes(128 * 1024))
    log.write(1, 0, os.urandom(5 * MiB))  # spans two batches
    log.cut(CutMark(False, 1, 2))
    segment = next(iter(log.sealed_segments()))
    builder = CycleBuilder("vm", 1, (DiskSize("a", 8 * MiB), DiskSize("b", 8 * MiB)), True)
    content: dict[tuple[str, int], bytes] = {}
    kinds = []
    for extents, payload in builder.extents_and_payloads(segment):
        assert len(payload) <= BATCH_PAYLOAD_BYTES
        for extent in extents:
            kinds.append((extent.disk, extent.offset, extent.kind))
            if extent.kind is ExtentKind.DATA:
                data = payload[extent.payload_offset : extent.payload_offset + extent.length]
                assert zlib.crc32(data) == extent.crc32
                content[(extent.disk, extent.offset)] = data
    log.close()
    assert ("a", 2 * MiB, ExtentKind.ZERO) in kinds
    assert content[("a", 0)] == first[:4096]
    assert content[("a", 4096)] == newest
    assert content[("a", 4096 + len(newest))] == first[4096 + len(newest) :]
    assert sum(len(data) for (disk, _), data in content.items() if disk == "b") == 5 * MiB
