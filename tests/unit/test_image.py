"""Sparse raw images: bounds, holes, digests and sparse copies."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmreplica.errors import ConfigurationError, JournalIntegrityError, OutOfBoundsError
from vmreplica.storage import safefile
from vmreplica.storage.image import (
    IO_CHUNK_BYTES,
    DiskImage,
    copy_allocated,
    is_zero,
    sha256_of,
    sparse_copy,
)

BLOCK = 4096
MIB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskImage]:
    with DiskImage.create(tmp_path / "disk.img", 16 * MIB) as created:
        yield created


def test_create_is_sparse_and_reads_zeros(disk: DiskImage) -> None:
    assert disk.size == 16 * MIB
    assert os.stat(disk.path).st_size == 16 * MIB
    assert os.stat(disk.path).st_blocks == 0
    assert disk.read(16 * MIB - 10, 10) == bytes(10)
    assert list(disk.allocated_extents()) == []


def test_create_refuses_an_existing_file(disk: DiskImage) -> None:
    with pytest.raises(ConfigurationError, match="already exists"):
        DiskImage.create(disk.path, 1)


def test_write_then_read_and_reopen(disk: DiskImage) -> None:
    disk.write(BLOCK + 5, b"hello")
    disk.fsync()
    with DiskImage.open(disk.path, writable=False) as reopened:
        assert reopened.size == 16 * MIB
        assert reopened.read(BLOCK, 12) == b"\0" * 5 + b"hello" + b"\0" * 2


def test_out_of_bounds_names_disk_offset_length_and_size(disk: DiskImage) -> None:
    with pytest.raises(OutOfBoundsError) as raised:
        disk.write(16 * MIB - 2, b"abc")
    error = raised.value
    assert isinstance(error, JournalIntegrityError)
    assert (error.path, error.offset, error.length, error.size) == (
        str(disk.path),
        16 * MIB - 2,
        3,
        16 * MIB,
    )
    assert str(error) == (
        f"{disk.path}: range at offset {16 * MIB - 2} of 3 bytes is outside the disk of "
        f"{16 * MIB} bytes. Operator action: check that the disk was resized on both sites, "
        "then resynchronize it."
    )
    for bad in (
        lambda: disk.read(-1, 1),
        lambda: disk.zero(16 * MIB, 1),
        lambda: disk.trim(0, 16 * MIB + 1),
    ):
        with pytest.raises(OutOfBoundsError):
            bad()
    assert os.stat(disk.path).st_size == 16 * MIB


def test_allocated_extents_and_zero_punch_holes(disk: DiskImage) -> None:
    disk.write(BLOCK, b"x" * 2 * BLOCK)
    disk.write(8 * MIB, b"y" * BLOCK)
    assert list(disk.allocated_extents()) == [(BLOCK, 2 * BLOCK), (8 * MIB, BLOCK)]
    assert list(disk.allocated_extents(2 * BLOCK, 8 * MIB)) == [
        (2 * BLOCK, BLOCK),
        (8 * MIB, BLOCK),
    ]
    disk.zero(BLOCK, BLOCK)
    disk.trim(8 * MIB, BLOCK)
    assert list(disk.allocated_extents()) == [(2 * BLOCK, BLOCK)]
    assert disk.read(BLOCK, 2 * BLOCK) == bytes(BLOCK) + b"x" * BLOCK


def test_zero_of_a_partial_block_keeps_the_rest(disk: DiskImage) -> None:
    disk.write(0, b"a" * BLOCK)
    disk.zero(100, 10)
    assert disk.read(0, BLOCK) == b"a" * 100 + bytes(10) + b"a" * (BLOCK - 110)


def test_zero_falls_back_to_writing_zeros(disk: DiskImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safefile, "_fallocate", None)
    disk.write(0, b"z" * (IO_CHUNK_BYTES + 10))
    disk.zero(5, IO_CHUNK_BYTES)
    assert disk.read(0, IO_CHUNK_BYTES + 10) == b"z" * 5 + bytes(IO_CHUNK_BYTES) + b"z" * 5


def test_resize_grows_with_a_hole_and_shrinks(disk: DiskImage) -> None:
    disk.write(0, b"q" * 10)
    disk.resize(32 * MIB)
    assert (disk.size, os.stat(disk.path).st_size) == (32 * MIB, 32 * MIB)
    assert disk.read(32 * MIB - 1, 1) == b"\0"
    disk.resize(5)
    assert disk.read(0, 5) == b"q" * 5
    with pytest.raises(OutOfBoundsError):
        disk.read(0, 6)


def test_close_twice_is_harmless(tmp_path: Path) -> None:
    opened = DiskImage.create(tmp_path / "x.img", 1)
    opened.close()
    opened.close()


def test_sha256_of_equals_hash_of_full_content(disk: DiskImage, tmp_path: Path) -> None:
    assert sha256_of(disk) == hashlib.sha256(bytes(16 * MIB)).hexdigest()
    payload = os.urandom(3 * BLOCK + 17)
    disk.write(6 * MIB + 3, payload)
    disk.write(16 * MIB - 1, b"\xff")
    expected = bytearray(16 * MIB)
    expected[6 * MIB + 3 : 6 * MIB + 3 + len(payload)] = payload
    expected[-1] = 0xFF
    digest = hashlib.sha256(expected).hexdigest()
    assert sha256_of(disk) == digest
    assert sha256_of(disk.path) == digest
    odd = DiskImage.create(tmp_path / "odd.img", 12345)
    odd.write(12340, b"12345")
    assert sha256_of(odd) == hashlib.sha256(bytes(12340) + b"12345").hexdigest()
    odd.close()


def test_sparse_copy_keeps_content_and_holes(disk: DiskImage, tmp_path: Path) -> None:
    disk.write(MIB, os.urandom(BLOCK))
    disk.write(2 * MIB, bytes(BLOCK))
    target = tmp_path / "copy.img"
    sparse_copy(disk, target)
    with DiskImage.open(target, writable=False) as copy:
        assert copy.size == disk.size
        assert sha256_of(copy) == sha256_of(disk)
        assert list(copy.allocated_extents()) == [(MIB, BLOCK)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy.img", "disk.img"]


def test_copy_allocated_refuses_other_sizes(disk: DiskImage, tmp_path: Path) -> None:
    with (
        DiskImage.create(tmp_path / "small.img", 10) as small,
        pytest.raises(ConfigurationError, match="the sizes differ"),
    ):
        copy_allocated(disk, small)


def test_is_zero_compares_every_byte_of_any_length() -> None:
    assert is_zero(b"")
    assert is_zero(memoryview(bytearray(IO_CHUNK_BYTES + 10)))
    late = bytearray(2 * IO_CHUNK_BYTES + 3)
    late[IO_CHUNK_BYTES + 1] = 1
    assert not is_zero(late)
    assert not is_zero(memoryview(late)[IO_CHUNK_BYTES:])
    assert is_zero(memoryview(late)[: IO_CHUNK_BYTES + 1])
