"""Payloads on the wire: how disk data is compressed and checksummed, the same for both sides.

A :class:`~vmreplica.schemas.events.WriteBatch` carries the data of its DATA extents back to back
as one payload; a :class:`~vmreplica.schemas.events.SeedChunk` carries one piece of a disk. A
payload travels as one zstd frame or raw, as its ``compression`` field says, and every piece of
data (an extent, a chunk) carries the CRC-32 (``zlib.crc32``) of its *uncompressed* bytes, so a
replica checks exactly what it is about to write, and the hash chain (:mod:`.chain`) pins it.

The sender (:class:`PayloadPacker`) decides per payload: data that does not compress (encrypted,
already compressed, media) is recognised from a few samples and sent raw without compressing it
whole, and whatever shrinks by less than :data:`INCOMPRESSIBLE_RATIO` is sent raw too, so the
replica skips decompressing it. The receiver (:class:`PayloadUnpacker`) decompresses into at most
a bound it is given; :func:`verify` checks each piece.

Packer and unpacker each keep one zstd context for their life: the shipper and the materialiser
are hot paths, and a new context per payload would cost more than compressing a small one.

**Encryption** (optional, per VM): a packer given a :class:`PayloadCipher` compresses, then
encrypts; an unpacker given one decrypts, then decompresses. The cipher itself (AES-256-GCM, the
keys) lives in :mod:`vmreplica.security.encryption`; what is bound to a payload as associated
data is fixed here, for both sides: :func:`batch_associated_data` and
:func:`seed_associated_data` — the VM, epoch, cycle and batch index (or seed id), and every
extent's disk, range, kind and checksum; never a Kafka offset.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Final, Protocol

import zstandard

from vmreplica.errors import CorruptEventError
from vmreplica.schemas.events import Compression, Encryption, Extent, SeedChunk, WriteBatch

ZSTD_LEVEL: Final = 1
"""Level 1 compresses disk blocks at hundreds of MB/s per core; higher levels cost throughput."""
INCOMPRESSIBLE_RATIO: Final = 0.95
"""Payloads that shrink less than this are sent raw: the replica then skips decompression."""
SAMPLE_BYTES: Final = 4096
SAMPLE_COUNT: Final = 8
"""A payload is first judged by compressing this many samples of this size, spread over it."""
SAMPLE_MIN_PAYLOAD_BYTES: Final = 4 * SAMPLE_BYTES * SAMPLE_COUNT
"""Smaller payloads are simply compressed: sampling would save little."""
MAX_PAYLOAD_BYTES: Final = 64 * 1024 * 1024
"""The most a receiver decompresses one payload into, whatever its frame claims."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The CRC-32 a piece of uncompressed data carries on the wire."""
    return zlib.crc32(data)


def verify(data: bytes | memoryview, crc32: int, length: int) -> bool:
    """True when ``data`` is the ``length`` bytes whose checksum the sender gave as ``crc32``."""
    return len(data) == length and zlib.crc32(data) == crc32


class PayloadCipher(Protocol):
    """Encrypts and decrypts payloads with a VM's keys (:mod:`vmreplica.security.encryption`)."""

    def seal(self, data: bytes, associated: bytes) -> tuple[Encryption, bytes]:
        """``data`` encrypted with the current key, bound to ``associated``."""
        ...

    def open(self, encryption: Encryption, data: bytes, associated: bytes) -> bytes:
        """The plaintext of ``data``.

        :raises CorruptEventError: unknown key id or algorithm, or the data or ``associated``
            differ from what was sealed.
        """
        ...


_FIELD = struct.Struct("<Q")


def _associated(label: bytes, texts: Iterable[str], numbers: Iterable[int]) -> bytes:
    parts = [label]
    for text in texts:
        raw = text.encode()
        parts.append(_FIELD.pack(len(raw)) + raw)
    parts.extend(_FIELD.pack(number & 0xFFFFFFFFFFFFFFFF) for number in numbers)
    return b"".join(parts)


def batch_associated_data(
    vm: str, epoch: int, cycle: int, batch: int, extents: Iterable[Extent]
) -> bytes:
    """What a WriteBatch's encrypted payload is bound to: replayed under another VM, epoch,
    cycle or batch index, or with its extents changed, it does not decrypt."""
    parts = [_associated(b"vmreplica WriteBatch payload v1\0", [vm], [epoch, cycle, batch])]
    parts.extend(
        _associated(
            b"",
            [e.disk, e.kind.value],
            [e.offset, e.length, e.payload_offset, e.crc32],
        )
        for e in extents
    )
    return b"".join(parts)


def seed_associated_data(
    vm: str, epoch: int, seed_id: str, disk: str, offset: int, length: int, crc32: int
) -> bytes:
    """What a SeedChunk's encrypted payload is bound to."""
    return _associated(
        b"vmreplica SeedChunk payload v1\0", [vm, seed_id, disk], [epoch, offset, length, crc32]
    )


class PayloadPacker:
    """Compresses payloads for the wire (or passes them raw); one per sender.

    ``compress=False`` sends every payload raw (a VM whose compression is off); with a
    ``cipher``, :meth:`seal` encrypts what :meth:`pack` made.
    """

    def __init__(self, compress: bool = True, cipher: PayloadCipher | None = None) -> None:
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else None
        self.cipher = cipher

    def seal(
        self, payload: bytes, associated: bytes
    ) -> tuple[Compression, bytes, Encryption | None]:
        """Compress, then (with a cipher) encrypt bound to ``associated``."""
        compression, packed = self.pack(payload)
        if self.cipher is None:
            return compression, packed, None
        encryption, sealed = self.cipher.seal(packed, associated)
        return compression, sealed, encryption

    def pack(self, payload: bytes) -> tuple[Compression, bytes]:
        """The payload as sent and how it is compressed; raw when zstd would gain too little."""
        compressor = self._compressor
        if compressor is None or not payload or self._looks_incompressible(payload, compressor):
            return Compression.NONE, payload
        packed: bytes = compressor.compress(payload)
        if len(packed) > INCOMPRESSIBLE_RATIO * len(payload):
            return Compression.NONE, payload
        return Compression.ZSTD, packed

    @staticmethod
    def _looks_incompressible(payload: bytes, compressor: zstandard.ZstdCompressor) -> bool:
        """Judge a payload by compressing a few spread-out samples (a few percent of the work).

        Encrypted, already-compressed and media data shrink by nothing, and compressing all of it
        only to send it raw would cost the sender most of its time.
        """
        if len(payload) < SAMPLE_MIN_PAYLOAD_BYTES:
            return False
        step = len(payload) // SAMPLE_COUNT
        sample = b"".join(payload[i * step : i * step + SAMPLE_BYTES] for i in range(SAMPLE_COUNT))
        return len(compressor.compress(sample)) > INCOMPRESSIBLE_RATIO * len(sample)


class PayloadUnpacker:
    """Restores payloads as they were before packing; one per receiver."""

    def __init__(self, cipher: PayloadCipher | None = None) -> None:
        self._decompressor = zstandard.ZstdDecompressor()
        self.cipher = cipher

    def open(self, record: WriteBatch | SeedChunk, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
        """The uncompressed payload of a batch or chunk, decrypted first when it is encrypted.

        :raises CorruptEventError: it does not decrypt (no cipher, unknown key, altered data or
            context) or does not decompress.
        """
        payload = record.payload
        if record.encryption is not None:
            if self.cipher is None:
                raise CorruptEventError(
                    f"the payload is encrypted (key {record.encryption.key_id!r}) and this site "
                    "holds no key of the VM; it learns them from the VM's signed VmConfig"
                )
            if isinstance(record, WriteBatch):
                associated = batch_associated_data(
                    record.vm, record.epoch, record.cycle, record.batch, record.extents
                )
            else:
                associated = seed_associated_data(
                    record.vm,
                    record.epoch,
                    record.seed_id,
                    record.disk,
                    record.offset,
                    record.length,
                    record.crc32,
                )
            payload = self.cipher.open(record.encryption, payload, associated)
        return self.unpack(record.compression, payload, max_bytes)

    def unpack(
        self, compression: Compression, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> bytes:
        """The uncompressed payload (a raw one is returned as it is, without a copy).

        :raises CorruptEventError: the payload says zstd but is not a frame that decompresses
            into at most ``max_bytes``; the message is zstd's.
        """
        if compression is not Compression.ZSTD:
            return payload
        try:
            data: bytes = self._decompressor.decompress(payload, max_output_size=max_bytes)
        except zstandard.ZstdError as error:
            raise CorruptEventError(str(error)) from error
        return data
