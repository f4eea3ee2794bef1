"""The :class:`~vmreplica.nbd.device.BlockDevice` contract, written once, run against every device
an NBD export serves:

- ``file``: :class:`FileBlockDevice`, a raw image served as it is;
- ``journaling``: :class:`JournalingDevice`, a primary's disk whose writes are captured for
  replication (what ``--capture nbd`` serves);
- ``view``: :class:`ViewDisk`, a replica's disk at a recovery point with a scratch layer (what a
  test failover serves): its content starts as the point's, not the head image's.

A new implementation joins by adding a builder to :data:`IMPLEMENTATIONS`. Each device starts
with known, non-zero content, so a zeroed or trimmed range and its neighbours both show.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmreplica.consumers.undo import UndoLog, UndoWriter
from vmreplica.consumers.views import PointView, ViewDisk
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.device import BlockDevice, FileBlockDevice
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.journaling_device import JournalingDevice
from vmreplica.storage.image import DiskImage, sha256_of

from .test_nbd_protocol import WireClient

KiB: Final = 1024
SIZE: Final = 256 * KiB + 1536
"""Not a multiple of 4 KiB: the last block of the device is a partial one."""
EXPORT: Final = "disk0"


def content(seed: int) -> bytes:
    """Deterministic disk content without zero bytes, so zeroing always shows."""
    return bytes(b | 1 for b in random.Random(seed).randbytes(SIZE))


@dataclass
class Implementation:
    """One device under test and what the contract needs to know about it."""

    device: BlockDevice
    initial: bytes
    """What the device reads as before any write."""
    backing: Path | None
    """The file its completed writes must reach and ``flush`` must fsync (None: the device
    keeps nothing — a test failover's writes are discarded when the test stops)."""
    refusing: Callable[[], BlockDevice] | None = None
    """The device after it was told to refuse writes (None: it has no such mode)."""
    refusal_errno: int = 0
    refusal_message: str = ""


Builder = Callable[[Path], contextlib.AbstractContextManager[Implementation]]


@contextlib.contextmanager
def file_device(folder: Path) -> Iterator[Implementation]:
    path = folder / "disk0.raw"
    path.write_bytes(content(1))
    with contextlib.ExitStack() as opened:

        def read_only() -> BlockDevice:
            return opened.enter_context(FileBlockDevice(path, read_only=True))

        yield Implementation(
            opened.enter_context(FileBlockDevice(path)),
            content(1),
            path,
            read_only,
            errno.EBADF,
            "Bad file descriptor",
        )


@contextlib.contextmanager
def journaling_device(folder: Path) -> Iterator[Implementation]:
    path = folder / "disk0.img"
    path.write_bytes(content(2))
    capture = CapturedVm("vm-contract", [(EXPORT, path, SIZE)], folder / "changelog")
    device = JournalingDevice(capture, EXPORT)

    def fenced() -> BlockDevice:
        capture.fenced_reason = "site-b is primary now"
        return device

    try:
        yield Implementation(device, content(2), path, fenced, errno.EPERM, "site-b is primary now")
    finally:
        capture.close()


POINT_RANGES: Final = ((0, 8 * KiB), (100 * KiB + 3, 5000), (SIZE - 1000, 1000))
"""Where the recovery point differs from the head image (cycle 2 overwrote them)."""


@contextlib.contextmanager
def view_disk(folder: Path) -> Iterator[Implementation]:
    """A view at cycle 1 of a replica whose head image is at cycle 2."""
    at_point, head = content(3), bytearray(content(4))
    head_path = folder / "head.img"
    head_path.write_bytes(bytes(head))
    undo = UndoWriter(folder / "undo", 2)
    initial = bytearray(head)
    for offset, length in POINT_RANGES:
        undo.add(EXPORT, offset, at_point[offset : offset + length])
        initial[offset : offset + length] = at_point[offset : offset + length]
    undo.seal()
    with DiskImage.open(head_path) as image:
        view = PointView({EXPORT: image}, UndoLog(folder / "undo"), 1, 2, folder / "scratch")
        try:
            yield Implementation(ViewDisk(view, EXPORT), bytes(initial), None)
        finally:
            view.close()


IMPLEMENTATIONS: Final[dict[str, Builder]] = {
    "file": file_device,
    "journaling": journaling_device,
    "view": view_disk,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Implementation]:
    with IMPLEMENTATIONS[request.param](tmp_path) as built:
        yield built


async def read_all(device: BlockDevice) -> bytes:
    return await device.read(0, device.size)


class Model:
    """What the device must read as: its initial content with every completed change."""

    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


# --- what every device does ----------------------------------------------------------------


async def test_it_is_a_block_device_of_fixed_size_with_its_content(
    implementation: Implementation,
) -> None:
    device = implementation.device
    assert isinstance(device, BlockDevice)
    assert device.size == SIZE
    assert await read_all(device) == implementation.initial
    assert await device.read(SIZE - 10, 10) == implementation.initial[-10:]
    assert await device.read(4095, 2) == implementation.initial[4095:4097]


WRITES: Final = (
    (0, b"\xa1" * 4096),  # aligned, over a range where a view differs from its head
    (4096 * 3 + 17, b"\xb2" * 1000),  # unaligned, inside one block
    (8 * KiB - 100, b"\xc3" * 300),  # across the end of a view's overlay range
    (4096 * 3 + 500, b"\xd4" * 40),  # overwrites part of an earlier write
    (SIZE - 1, b"\xe5"),  # the very last byte
    (SIZE - 5000, bytes(range(256)) * 19 + b"\xf6" * 136),  # ends on the last byte
    (64 * KiB, bytes(4096)),  # all-zero data is data too
)


async def test_a_read_returns_the_last_completed_write(implementation: Implementation) -> None:
    device, model = implementation.device, Model(implementation.initial)
    for offset, data in WRITES:
        await device.write(offset, data, fua=False)
        model.write(offset, data)
        assert await device.read(offset, len(data)) == data
    assert await read_all(device) == bytes(model.data)


@pytest.mark.parametrize("fua", [False, True])
@pytest.mark.parametrize("may_trim", [True, False])
async def test_written_zeroes_read_back_as_zeros_and_nothing_else_changes(
    implementation: Implementation, may_trim: bool, fua: bool
) -> None:
    device, model = implementation.device, Model(implementation.initial)
    for offset, length in ((0, 8 * KiB), (12 * KiB + 5, 70 * KiB + 3), (SIZE - 700, 700)):
        await device.write_zeroes(offset, length, fua=fua, may_trim=may_trim)
        model.zero(offset, length)
    assert await read_all(device) == bytes(model.data)


async def test_a_trimmed_range_reads_as_zeros_and_nothing_else_changes(
    implementation: Implementation,
) -> None:
    """NBD leaves a trimmed range's content unspecified; vmreplica needs zeros, because the
    replica punches a hole for a TRIM and both sites' images must hash alike."""
    device, model = implementation.device, Model(implementation.initial)
    await device.write(20 * KiB, b"\x77" * 8192, fua=False)
    model.write(20 * KiB, b"\x77" * 8192)
    for offset, length in ((20 * KiB + 100, 4000), (0, 4096), (SIZE - 1536, 1536)):
        await device.trim(offset, length)
        model.zero(offset, length)
    assert await read_all(device) == bytes(model.data)
    await device.write(SIZE - 1536, b"\x88" * 512, fua=False)  # a trimmed range is writable
    model.write(SIZE - 1536, b"\x88" * 512)
    assert await read_all(device) == bytes(model.data)


@pytest.fixture
def synced_inodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Inodes of the files fsynced or fdatasynced from now on."""
    synced: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real: Callable[[int], None] = real) -> None:
            synced.append(os.fstat(fd).st_ino)
            real(fd)

        monkeypatch.setattr(os, name, spy)
    return synced


async def test_flush_makes_every_completed_write_durable_in_its_file(
    implementation: Implementation, synced_inodes: list[int]
) -> None:
    device, model = implementation.device, Model(implementation.initial)
    await device.write(4 * KiB, b"\x5a" * 5000, fua=False)
    await device.write_zeroes(40 * KiB, 4096, fua=False, may_trim=True)
    await device.trim(60 * KiB, 4096)
    model.write(4 * KiB, b"\x5a" * 5000)
    model.zero(40 * KiB, 4096)
    model.zero(60 * KiB, 4096)
    synced_inodes.clear()
    await device.flush()
    assert await read_all(device) == bytes(model.data)
    if implementation.backing is None:
        return  # nothing to make durable: a view's scratch writes die with the test failover
    assert implementation.backing.stat().st_ino in synced_inodes
    assert implementation.backing.read_bytes() == bytes(model.data)


async def test_a_fua_write_is_durable_when_it_returns(
    implementation: Implementation, synced_inodes: list[int]
) -> None:
    if implementation.backing is None:
        pytest.skip("a view keeps nothing: FUA has nothing to make durable")
    device = implementation.device
    await device.write(SIZE - 4096, b"\x3c" * 4096, fua=True)
    assert implementation.backing.stat().st_ino in synced_inodes
    synced_inodes.clear()
    await device.write_zeroes(0, 4096, fua=True, may_trim=False)
    assert implementation.backing.stat().st_ino in synced_inodes
    assert implementation.backing.read_bytes()[:4096] == bytes(4096)


async def test_a_device_told_to_refuse_writes_refuses_them_and_still_reads(
    implementation: Implementation,
) -> None:
    if implementation.refusing is None:
        pytest.skip("a test-failover view is writable by design (its writes go to scratch)")
    device = implementation.refusing()
    calls: list[Callable[[], Awaitable[None]]] = [
        lambda: device.write(0, b"\x01" * 512, fua=False),
        lambda: device.write(0, b"\x01" * 512, fua=True),
        lambda: device.write_zeroes(0, 4096, fua=False, may_trim=True),
        lambda: device.write_zeroes(0, 4096, fua=False, may_trim=False),
        lambda: device.trim(0, 4096),
    ]
    for call in calls:
        with pytest.raises(OSError, match=implementation.refusal_message) as refused:
            await call()
        assert refused.value.errno == implementation.refusal_errno
    await device.flush()
    assert await read_all(device) == implementation.initial


# --- served over NBD: the server keeps the contract's preconditions --------------------------


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbd-") as directory:  # sun_path is 108 bytes
        yield os.path.join(directory, "nbd.sock")


@contextlib.asynccontextmanager
async def served(
    implementation: Implementation,
    socket_path: str,
    *,
    read_only: bool = False,
) -> AsyncIterator[tuple[NbdServer, WireClient]]:
    server = NbdServer(
        {EXPORT: implementation.device}, unix_path=socket_path, read_only={EXPORT: read_only}
    )
    async with server:
        client, size, _ = await WireClient.open_export(socket_path, EXPORT)
        assert size == SIZE
        try:
            yield server, client
        finally:
            await client.close()


async def test_requests_past_the_end_never_reach_the_device(
    implementation: Implementation, socket_path: str
) -> None:
    async with served(implementation, socket_path) as (_, client):
        assert await client.call(wire.NBD_CMD_READ, SIZE - 512, 1024) == (wire.NBD_EINVAL, b"")
        assert await client.call(wire.NBD_CMD_WRITE, SIZE - 512, 1024, b"\x09" * 1024) == (
            wire.NBD_ENOSPC,
            b"",
        )
        assert await client.call(wire.NBD_CMD_WRITE_ZEROES, SIZE, 4096) == (wire.NBD_ENOSPC, b"")
        assert await client.call(wire.NBD_CMD_TRIM, 2**40, 4096) == (wire.NBD_EINVAL, b"")
        assert await read_all(implementation.device) == implementation.initial
        # the last byte itself is in range
        assert await client.call(wire.NBD_CMD_WRITE, SIZE - 1, 1, b"\x09") == (0, b"")
        assert await client.call(wire.NBD_CMD_READ, SIZE - 2, 2) == (
            0,
            implementation.initial[-2:-1] + b"\x09",
        )
        await client.call(wire.NBD_CMD_FLUSH, 0, 0)
    if implementation.backing is not None:
        assert implementation.backing.stat().st_size == SIZE


@pytest.mark.parametrize("how", ["read-only export", "fenced export"])
async def test_a_read_only_or_fenced_export_refuses_every_write_with_eperm(
    implementation: Implementation, socket_path: str, how: str
) -> None:
    async with served(implementation, socket_path, read_only=how == "read-only export") as (
        server,
        client,
    ):
        if how == "fenced export":
            server.refuse_writes(EXPORT, "site-b is primary now")
        assert await client.call(wire.NBD_CMD_WRITE, 0, 512, b"\x01" * 512) == (wire.NBD_EPERM, b"")
        assert await client.call(wire.NBD_CMD_WRITE_ZEROES, 0, 4096) == (wire.NBD_EPERM, b"")
        assert await client.call(wire.NBD_CMD_TRIM, 0, 4096) == (wire.NBD_EPERM, b"")
        assert await client.call(wire.NBD_CMD_FLUSH, 0, 0) == (0, b"")
        assert await client.call(wire.NBD_CMD_READ, 0, 4096) == (0, implementation.initial[:4096])
    assert await read_all(implementation.device) == implementation.initial


# --- any sequence of changes ---------------------------------------------------------------


@st.composite
def changes(draw: st.DrawFn) -> tuple[str, int, int, bool]:
    """(kind, offset, length, flag): a write (flag: FUA), zeroes (flag: may trim), a trim."""
    offset = draw(st.integers(0, SIZE - 1))
    length = draw(st.integers(1, min(SIZE - offset, 20 * KiB)))
    return (
        draw(st.sampled_from(["write", "write", "zeroes", "trim"])),
        offset,
        length,
        draw(st.booleans()),
    )


async def _replay(
    build: Builder, folder: Path, steps: list[tuple[str, int, int, bool]], seed: int
) -> None:
    with build(folder) as implementation:
        device, model = implementation.device, Model(implementation.initial)
        rng = random.Random(seed)
        for kind, offset, length, flag in steps:
            if kind == "write":
                data = rng.randbytes(length)
                await device.write(offset, data, fua=flag)
                model.write(offset, data)
            elif kind == "zeroes":
                await device.write_zeroes(offset, length, fua=False, may_trim=flag)
                model.zero(offset, length)
            else:
                await device.trim(offset, length)
                model.zero(offset, length)
        assert await read_all(device) == bytes(model.data)
        await device.flush()
        if implementation.backing is not None:
            assert implementation.backing.read_bytes() == bytes(model.data)


@pytest.mark.parametrize("build", list(IMPLEMENTATIONS.values()), ids=list(IMPLEMENTATIONS))
@settings(max_examples=30, deadline=None)
@given(steps=st.lists(changes(), min_size=1, max_size=25), seed=st.integers(0, 2**32))
def test_any_sequence_of_changes_reads_back_like_a_model(
    build: Builder, steps: list[tuple[str, int, int, bool]], seed: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="device-") as folder:
        asyncio.run(_replay(build, Path(folder), steps, seed))


# --- what only a view promises -------------------------------------------------------------


async def test_writes_through_a_view_never_reach_the_replica_image(tmp_path: Path) -> None:
    with view_disk(tmp_path) as implementation:
        head = sha256_of(tmp_path / "head.img")
        device = implementation.device
        await device.write(0, b"\x42" * 8192, fua=True)
        await device.write_zeroes(SIZE - 2048, 2048, fua=True, may_trim=True)
        await device.trim(100 * KiB, 4096)
        await device.flush()
        assert sha256_of(tmp_path / "head.img") == head
