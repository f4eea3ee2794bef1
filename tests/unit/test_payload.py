"""The payload contract both sides share: packing, unpacking and checking extent data.

Also pins the two decompression failures a replica reports, word for word, now that the shipper's
batches and the seeder's chunks are unpacked by the same code.
"""

from __future__ import annotations

import os
import zlib

import pytest
import zstandard

from vmreplica.consumers.journal_rules import decode_cycle
from vmreplica.errors import CorruptEventError, JournalViolation
from vmreplica.schemas.events import Compression, Extent, ExtentKind, WriteBatch
from vmreplica.schemas.payload import PayloadPacker, PayloadUnpacker, checksum, verify

TEXT = b"".join(b"line %06d of something that compresses\n" % i for i in range(4000))


def test_pack_then_unpack_gives_the_payload_back() -> None:
    packer, unpacker = PayloadPacker(), PayloadUnpacker()
    for payload in (TEXT, os.urandom(300_000), b"", b"x"):
        compression, packed = packer.pack(payload)
        assert unpacker.unpack(compression, packed) == payload
    assert packer.pack(TEXT)[0] is Compression.ZSTD


def test_packing_can_be_switched_off_and_raw_payloads_are_not_copied() -> None:
    assert PayloadPacker(compress=False).pack(TEXT) == (Compression.NONE, TEXT)
    assert PayloadUnpacker().unpack(Compression.NONE, TEXT) is TEXT


def test_the_zstd_frame_is_a_plain_one_any_zstd_reads() -> None:
    _, packed = PayloadPacker().pack(TEXT)
    assert zstandard.ZstdDecompressor().decompress(packed) == TEXT
    assert (
        PayloadUnpacker().unpack(Compression.ZSTD, zstandard.ZstdCompressor().compress(TEXT))
        == TEXT
    )


def test_a_garbled_frame_is_a_corrupt_event_with_zstds_message() -> None:
    garbled = b"not a zstd frame at all"
    with pytest.raises(zstandard.ZstdError) as original:
        zstandard.ZstdDecompressor().decompress(garbled, max_output_size=64 << 20)
    with pytest.raises(CorruptEventError) as raised:
        PayloadUnpacker().unpack(Compression.ZSTD, garbled)
    assert str(raised.value) == str(original.value)


def test_unpack_never_returns_more_than_its_bound() -> None:
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(TEXT)
    with pytest.raises(CorruptEventError):
        PayloadUnpacker().unpack(Compression.ZSTD, packed, max_bytes=1000)


def test_verify_checks_length_and_crc32() -> None:
    data = b"some disk data"
    crc = zlib.crc32(data)
    assert checksum(data) == crc
    assert verify(data, crc, len(data))
    assert verify(memoryview(data), crc, len(data))
    assert not verify(data[:-1], crc, len(data))
    assert not verify(data, crc ^ 1, len(data))


def test_a_batch_that_does_not_decompress_is_a_violation_naming_it() -> None:
    batch = WriteBatch(
        "vm", 1, 5, 0, (Extent("sda", 0, 4, ExtentKind.DATA, 0, 0),), Compression.ZSTD, b"garbage"
    )
    with pytest.raises(JournalViolation) as raised:
        decode_cycle("vm", 42, [batch], {"sda": 4096})
    assert str(raised.value) == (
        "VM 'vm', journal offset 42: cycle 5 batch 0: payload does not "
        "decompress (error determining content size from frame header)"
    )
    assert isinstance(raised.value.__cause__, CorruptEventError)


def test_decode_cycle_reuses_the_unpacker_it_is_given() -> None:
    data = TEXT[:8192]
    compression, packed = PayloadPacker().pack(data)
    batch = WriteBatch(
        "vm",
        1,
        5,
        0,
        (Extent("sda", 4096, 8192, ExtentKind.DATA, 0, checksum(data)),),
        compression,
        packed,
    )
    unpacker = PayloadUnpacker()
    for _ in range(2):
        [extent] = decode_cycle("vm", 1, [batch], {"sda": 65536}, unpacker)
        assert bytes(extent.data) == data
