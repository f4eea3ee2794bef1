"""Durable files: atomic replacement, append-only files with a header, locks, and holes.

The hole tests replace libc's ``fallocate`` with a fake that fails the way file systems that
cannot punch holes fail, so the fallback to written zeros runs on any machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmreplica.nbd.device import FileBlockDevice
from vmreplica.storage import safefile
from vmreplica.storage.image import DiskImage
from vmreplica.storage.safefile import (
    ZERO_FILL_BYTES,
    create_for_append,
    exclusive_lock,
    replace_atomically,
    zero_range,
)


def test_replace_atomically_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    def write(temporary: Path) -> None:
        temporary.write_bytes(b"new")

    replace_atomically(target, write)
    assert target.read_bytes() == b"new"
    assert [path.name for path in tmp_path.iterdir()] == ["state.bin"]


def test_replace_atomically_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    def fail(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_atomically(target, fail)
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["state.bin"]


def test_create_for_append_gives_a_descriptor_that_appends(tmp_path: Path) -> None:
    target = tmp_path / "segment"
    target.write_bytes(b"an older file")
    fd = create_for_append(target, (b"HEADER", b"|"))
    try:
        os.write(fd, b"record")
    finally:
        os.close(fd)
    assert target.read_bytes() == b"HEADER|record"
    assert [path.name for path in tmp_path.iterdir()] == ["segment"]


def test_create_for_append_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "segment"
    target.write_bytes(b"old")

    def parts() -> list[bytes]:
        raise OSError(errno.ENOSPC, "full")

    with pytest.raises(OSError, match="full"):
        create_for_append(target, (part for part in parts()))
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["segment"]


def test_exclusive_lock_excludes_other_holders_until_released(tmp_path: Path) -> None:
    lock_path = tmp_path / "vm" / ".apply.lock"

    def try_lock() -> bool:
        with lock_path.open("a") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
            return True

    with exclusive_lock(lock_path):
        assert not try_lock()
    assert try_lock()


FakeFallocate = Callable[[int, int, int, int], int]


def _failing_fallocate(code: int, calls: list[int]) -> FakeFallocate:
    """A libc ``fallocate`` that fails with ``code`` the way ctypes reports it."""

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(offset)
        ctypes.set_errno(code)
        return -1

    return fallocate


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\xee" * (ZERO_FILL_BYTES + 8192))
    return path


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS])
def test_zero_range_writes_zeros_where_holes_cannot_be_punched(
    filled: Path, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(safefile, "_fallocate", _failing_fallocate(code, calls))
    fd = os.open(filled, os.O_RDWR)
    try:
        assert zero_range(fd, 4096, ZERO_FILL_BYTES + 10) is False
    finally:
        os.close(fd)
    assert calls == [4096]
    content = filled.read_bytes()
    assert content == (b"\xee" * 4096 + bytes(ZERO_FILL_BYTES + 10) + b"\xee" * (4096 - 10))


def test_zero_range_without_punching_never_asks_for_a_hole(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(safefile, "_fallocate", _failing_fallocate(errno.EINVAL, calls))
    fd = os.open(filled, os.O_RDWR)
    try:
        assert zero_range(fd, 0, 100, punch=False) is True
        assert zero_range(fd, 0, 0) is True
    finally:
        os.close(fd)
    assert calls == []
    assert filled.read_bytes()[:101] == bytes(100) + b"\xee"


def test_other_fallocate_errors_are_raised(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safefile, "_fallocate", _failing_fallocate(errno.EIO, []))
    fd = os.open(filled, os.O_RDWR)
    try:
        with pytest.raises(OSError, match="Input/output error") as raised:
            zero_range(fd, 0, 100, name=str(filled))
    finally:
        os.close(fd)
    assert (raised.value.errno, raised.value.filename) == (errno.EIO, str(filled))
    assert filled.read_bytes()[:100] == b"\xee" * 100


def test_zero_range_punches_a_hole_where_it_can(filled: Path) -> None:
    fd = os.open(filled, os.O_RDWR)
    try:
        punched = zero_range(fd, 0, ZERO_FILL_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert punched is True
    assert filled.read_bytes() == bytes(ZERO_FILL_BYTES) + b"\xee" * 8192
    assert os.stat(filled).st_size == ZERO_FILL_BYTES + 8192


def test_disk_image_and_file_device_share_the_fallback(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(safefile, "_fallocate", _failing_fallocate(errno.EINVAL, calls))
    with DiskImage.open(filled) as image:
        image.trim(0, 4096)
        image.zero(8192, 4096)
    assert calls == [0, 8192]
    assert filled.read_bytes()[:12288] == bytes(4096) + b"\xee" * 4096 + bytes(4096)


async def test_file_device_falls_back_once_and_stops_asking(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(safefile, "_fallocate", _failing_fallocate(errno.EINVAL, calls))
    with FileBlockDevice(filled) as device:
        await device.trim(0, 4096)
        await device.write_zeroes(8192, 4096, fua=False, may_trim=True)
        await device.write_zeroes(16384, 4096, fua=True, may_trim=False)
    assert calls == [0]
    content = await asyncio.to_thread(filled.read_bytes)
    assert content[:20480] == (
        bytes(4096) + b"\xee" * 4096 + bytes(4096) + b"\xee" * 4096 + bytes(4096)
    )
