"""Block devices behind the NBD server: the file device, and how the server drives slow ones.

A device whose calls suspend (as the journaling device will, on fsync or a journal append)
takes the server's task path; these tests check that replies then come out of order, that
FLUSH waits for writes still in flight, and that device errors reach the client as NBD errors.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmreplica.nbd import protocol as wire
from vmreplica.nbd.server import BlockDevice, FileBlockDevice, NbdServer

from .test_nbd_protocol import WireClient


class GatedDevice:
    """A memory disk whose writes wait at a gate, so a test decides when they complete."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.gate = asyncio.Event()
        self.gate.set()
        self.completed_writes = 0
        self.writes_seen_by_flush: list[int] = []
        self.failure: OSError | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        if self.failure is not None:
            raise self.failure
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        self.data[offset : offset + len(data)] = data
        self.completed_writes += 1

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self.write(offset, bytes(length), fua)

    async def trim(self, offset: int, length: int) -> None:
        await self.gate.wait()

    async def flush(self) -> None:
        self.writes_seen_by_flush.append(self.completed_writes)


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="nbd-") as directory:
        yield os.path.join(directory, "nbd.sock")


@pytest.fixture
async def gated(socket_path: str) -> AsyncIterator[tuple[GatedDevice, WireClient]]:
    device = GatedDevice(1 << 16)
    async with NbdServer({"slow": device}, unix_path=socket_path):
        client, _, _ = await WireClient.open_export(socket_path, "slow")
        yield device, client
        device.gate.set()
        await client.close()


def test_both_devices_satisfy_the_protocol(tmp_path: Path) -> None:
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(512))
    with FileBlockDevice(image) as device:
        assert isinstance(device, BlockDevice)
    assert isinstance(GatedDevice(512), BlockDevice)


async def test_reads_overtake_a_suspended_write(gated: tuple[GatedDevice, WireClient]) -> None:
    device, client = gated
    device.gate.clear()
    write = client.send_request(wire.NBD_CMD_WRITE, 0, 4, b"slow")
    read = client.send_request(wire.NBD_CMD_READ, 0, 4)
    await client.writer.drain()
    assert await client.receive_reply() == (read, 0, bytes(4))
    device.gate.set()
    assert await client.receive_reply() == (write, 0, b"")
    assert await client.call(wire.NBD_CMD_READ, 0, 4) == (0, b"slow")


async def test_flush_waits_for_writes_in_flight(
    gated: tuple[GatedDevice, WireClient], socket_path: str
) -> None:
    device, client = gated
    device.gate.clear()
    write = client.send_request(wire.NBD_CMD_WRITE, 0, 4, b"data")
    await client.writer.drain()
    # The FLUSH comes on another connection: CAN_MULTI_CONN makes it cover this write too.
    other, _, _ = await WireClient.open_export(socket_path, "slow")
    flush = other.send_request(wire.NBD_CMD_FLUSH, 0, 0)
    await other.writer.drain()
    flush_reply = asyncio.create_task(other.receive_reply())
    done, _ = await asyncio.wait([flush_reply], timeout=0.1)
    assert not done
    assert device.writes_seen_by_flush == []
    device.gate.set()
    assert await client.receive_reply() == (write, 0, b"")
    assert await flush_reply == (flush, 0, b"")
    assert device.writes_seen_by_flush == [1]
    await other.close()


async def test_device_errors_become_nbd_errors(gated: tuple[GatedDevice, WireClient]) -> None:
    device, client = gated
    device.failure = OSError(errno.ENOSPC, "journal full")
    assert await client.call(wire.NBD_CMD_WRITE, 0, 4, b"full") == (wire.NBD_ENOSPC, b"")
    device.gate.clear()
    suspended = client.send_request(wire.NBD_CMD_WRITE, 0, 4, b"full")
    await client.writer.drain()
    device.failure = OSError(errno.EIO, "disk gone")
    device.gate.set()
    assert await client.receive_reply() == (suspended, wire.NBD_EIO, b"")
    assert await client.call(wire.NBD_CMD_READ, 0, 4) == (wire.NBD_EIO, b"")
    device.failure = None
    assert await client.call(wire.NBD_CMD_READ, 0, 4) == (0, bytes(4))


async def test_stop_lets_suspended_requests_finish(socket_path: str) -> None:
    device = GatedDevice(4096)
    server = NbdServer({"slow": device}, unix_path=socket_path)
    await server.start()
    client, _, _ = await WireClient.open_export(socket_path, "slow")
    device.gate.clear()
    write = client.send_request(wire.NBD_CMD_WRITE, 0, 2, b"ok")
    await client.writer.drain()
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.05)
    device.gate.set()
    await stopping
    assert await client.receive_reply() == (write, 0, b"")
    assert bytes(device.data[:2]) == b"ok"
    assert await client.is_closed_by_server()


async def test_file_device_reads_writes_zeroes_trims_and_flushes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xee" * (4 << 20))
    with FileBlockDevice(image) as device:
        assert device.size == 4 << 20
        await device.write(4096, b"hello", fua=True)
        assert await device.read(4096, 5) == b"hello"
        await device.write_zeroes(0, 8192, fua=False, may_trim=True)
        await device.write_zeroes(65536, 3 << 19, fua=True, may_trim=False)
        await device.trim(3 << 20, 4096)
        await device.flush()
        content = image.read_bytes()
        assert content[:8192] == bytes(8192)
        assert content[65536 : 65536 + (3 << 19)] == bytes(3 << 19)
        assert content[8192:65536] == b"\xee" * (65536 - 8192)
        assert content[(3 << 20) + 4096 :] == b"\xee" * ((1 << 20) - 4096)
    with FileBlockDevice(image, read_only=True) as read_only:
        with pytest.raises(OSError, match="Bad file descriptor"):
            await read_only.write(0, b"x", fua=False)
        read_only.close()  # a second close is harmless
