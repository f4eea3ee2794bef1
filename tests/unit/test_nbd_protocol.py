"""The NBD server against a raw-bytes client: encoding, handshake rules, error replies, ordering.

The client here speaks the wire format directly (not through libnbd) so that tests can also
misbehave — bad magic, bad flags, oversized payloads — and check that only the offending
connection suffers. Real clients (qemu-io, nbdinfo, nbdcopy, fio) are in tests/e2e.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmreplica.errors import ConfigurationError, NbdProtocolError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.server import FileBlockDevice, NbdServer

DISK_BYTES = 1 << 20
OTHER_DISK_BYTES = 3 << 20


class WireClient:
    """A minimal NBD client over a Unix socket that sends exactly the bytes a test asks for."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._next_cookie = 1
        self._pending: dict[int, tuple[int, int]] = {}

    @classmethod
    async def connect(cls, socket_path: str) -> WireClient:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        greeting = await reader.readexactly(18)
        assert greeting == wire.encode_greeting()
        return cls(reader, writer)

    @classmethod
    async def open_export(cls, socket_path: str, name: str) -> tuple[WireClient, int, int]:
        """Connect and NBD_OPT_GO to ``name``; return the client, export size and flags."""
        client = await cls.connect(socket_path)
        await client.send_client_flags()
        replies = await client.option(wire.NBD_OPT_GO, info_request(name))
        assert replies[-1] == (wire.NBD_REP_ACK, b"")
        _, size, flags = struct.unpack(">HQH", replies[0][1])
        return client, size, flags

    async def send_client_flags(self, flags: int = wire.KNOWN_CLIENT_FLAGS) -> None:
        self.writer.write(struct.pack(">I", flags))
        await self.writer.drain()

    async def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">QII", wire.IHAVEOPT, option, len(data)) + data)
        await self.writer.drain()

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option and collect its replies up to the final one."""
        await self.send_option(option, data)
        replies = []
        while True:
            magic, echoed, reply_type, length = struct.unpack(
                ">QIII", await self.reader.readexactly(20)
            )
            assert (magic, echoed) == (wire.OPTION_REPLY_MAGIC, option)
            replies.append((reply_type, await self.reader.readexactly(length)))
            if reply_type not in (wire.NBD_REP_INFO, wire.NBD_REP_SERVER):
                return replies

    def send_request(
        self, command: int, offset: int, length: int, data: bytes = b"", flags: int = 0
    ) -> int:
        cookie = self._next_cookie
        self._next_cookie += 1
        self._pending[cookie] = (command, length)
        header = struct.pack(
            ">IHHQQI", wire.NBD_REQUEST_MAGIC, flags, command, cookie, offset, length
        )
        self.writer.write(header + data)
        return cookie

    async def receive_reply(self) -> tuple[int, int, bytes]:
        """Return ``(cookie, error, data)`` of the next reply, in whatever order it comes."""
        magic, error, cookie = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert magic == wire.NBD_SIMPLE_REPLY_MAGIC
        command, length = self._pending.pop(cookie)
        data = b""
        if command == wire.NBD_CMD_READ and error == 0:
            data = await self.reader.readexactly(length)
        return cookie, error, data

    async def call(
        self, command: int, offset: int, length: int, data: bytes = b"", flags: int = 0
    ) -> tuple[int, bytes]:
        cookie = self.send_request(command, offset, length, data, flags)
        await self.writer.drain()
        received, error, payload = await self.receive_reply()
        assert received == cookie
        return error, payload

    async def is_closed_by_server(self) -> bool:
        """Whether the server hangs up (within 5 s) with nothing more to say; then close too."""
        closed = await asyncio.wait_for(self.reader.read(1), timeout=5) == b""
        await self.close()
        return closed

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def info_request(name: str, *info_types: int) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(info_types))
    return body + b"".join(struct.pack(">H", t) for t in info_types)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="nbd-") as directory:
        yield directory


@pytest.fixture
async def server(tmp_path: Path, socket_dir: str) -> AsyncIterator[NbdServer]:
    images = {"disk0": DISK_BYTES, "disk1": OTHER_DISK_BYTES}
    devices = {}
    for name, size in images.items():
        path = tmp_path / f"{name}.raw"
        path.write_bytes(b"")
        os.truncate(path, size)
        devices[name] = FileBlockDevice(path)
    nbd = NbdServer(devices, unix_path=os.path.join(socket_dir, "nbd.sock"))
    async with nbd:
        yield nbd
    for device in devices.values():
        device.close()


def socket_of(server: NbdServer) -> str:
    assert server.unix_path is not None
    return server.unix_path


# --- pure encoding and decoding --------------------------------------------------------------


def test_greeting_is_magic_ihaveopt_and_flags() -> None:
    assert wire.encode_greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


def test_unknown_client_flag_is_a_protocol_error() -> None:
    assert wire.decode_client_flags(struct.pack(">I", 3)) is True
    assert wire.decode_client_flags(struct.pack(">I", 1)) is False
    with pytest.raises(NbdProtocolError, match="unknown handshake flags 0x4"):
        wire.decode_client_flags(struct.pack(">I", 4))


def test_option_header_rejects_bad_magic_and_huge_data() -> None:
    assert wire.decode_option_header(struct.pack(">QII", wire.IHAVEOPT, 7, 10)) == (7, 10)
    with pytest.raises(NbdProtocolError, match="bad option magic"):
        wire.decode_option_header(struct.pack(">QII", 1, 7, 10))
    with pytest.raises(NbdProtocolError, match="more than we accept"):
        wire.decode_option_header(struct.pack(">QII", wire.IHAVEOPT, 7, 1 << 20))


def test_info_request_round_trip_and_malformed() -> None:
    request = wire.decode_info_request(info_request("disk0", 3, 1))
    assert request == wire.ExportInfoRequest(name="disk0", info_types=(3, 1))
    with pytest.raises(NbdProtocolError, match="overruns"):
        wire.decode_info_request(struct.pack(">I", 99) + b"disk0\x00\x00")
    with pytest.raises(NbdProtocolError, match="do not match"):
        wire.decode_info_request(info_request("disk0") + b"\x00")
    with pytest.raises(NbdProtocolError, match="too short"):
        wire.decode_info_request(b"\x00")


def test_export_name_reply_honours_no_zeroes() -> None:
    assert wire.encode_export_name_reply(512, 1, no_zeroes=True) == struct.pack(">QH", 512, 1)
    assert len(wire.encode_export_name_reply(512, 1, no_zeroes=False)) == 10 + 124


def test_transmission_flags() -> None:
    writable = wire.transmission_flags(read_only=False)
    assert writable == (
        wire.NBD_FLAG_HAS_FLAGS
        | wire.NBD_FLAG_SEND_FLUSH
        | wire.NBD_FLAG_SEND_FUA
        | wire.NBD_FLAG_SEND_TRIM
        | wire.NBD_FLAG_SEND_WRITE_ZEROES
        | wire.NBD_FLAG_CAN_MULTI_CONN
    )
    read_only = wire.transmission_flags(read_only=True)
    assert read_only & wire.NBD_FLAG_READ_ONLY
    assert not read_only & (wire.NBD_FLAG_SEND_TRIM | wire.NBD_FLAG_SEND_FUA)


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length", "expected"),
    [
        (wire.NBD_CMD_READ, 0, 0, 4096, 0),
        (wire.NBD_CMD_READ, 0, 4096, 4096, 0),
        (wire.NBD_CMD_READ, 0, 4097, 4096, wire.NBD_EINVAL),
        (wire.NBD_CMD_WRITE, 0, 4097, 4096, wire.NBD_ENOSPC),
        (wire.NBD_CMD_WRITE_ZEROES, 0, 8000, 200, wire.NBD_ENOSPC),
        (wire.NBD_CMD_TRIM, 0, 8000, 200, wire.NBD_EINVAL),
        (wire.NBD_CMD_READ, 0, 0, 8193, wire.NBD_EOVERFLOW),
        (wire.NBD_CMD_WRITE, 0, 0, 8193, wire.NBD_EOVERFLOW),
        (wire.NBD_CMD_WRITE_ZEROES, wire.NBD_CMD_FLAG_NO_HOLE, 0, 8192, 0),
        (wire.NBD_CMD_WRITE, 1 << 2, 0, 512, wire.NBD_EINVAL),  # DF: not negotiated
        (wire.NBD_CMD_FLUSH, 0, 0, 0, 0),
        (7, 0, 0, 512, wire.NBD_EINVAL),  # BLOCK_STATUS: not negotiated
    ],
)
def test_check_request(command: int, flags: int, offset: int, length: int, expected: int) -> None:
    assert (
        wire.check_request(command, flags, offset, length, size=8192, max_request_bytes=8192)
        == expected
    )


def test_device_errors_map_to_nbd_errors() -> None:
    assert wire.nbd_error_for(OSError(errno.ENOSPC, "full")) == wire.NBD_ENOSPC
    assert wire.nbd_error_for(OSError(errno.EROFS, "ro")) == wire.NBD_EPERM
    assert wire.nbd_error_for(OSError(errno.ENOENT, "gone")) == wire.NBD_EIO
    assert wire.nbd_error_for(ValueError("bug")) == wire.NBD_EIO


# --- handshake -------------------------------------------------------------------------------


async def test_list_names_every_export(server: NbdServer) -> None:
    client = await WireClient.connect(socket_of(server))
    await client.send_client_flags()
    replies = await client.option(wire.NBD_OPT_LIST)
    names = [data[4 : 4 + struct.unpack(">I", data[:4])[0]] for _, data in replies[:-1]]
    assert names == [b"disk0", b"disk1"]
    assert replies[-1] == (wire.NBD_REP_ACK, b"")
    assert (await client.option(wire.NBD_OPT_LIST, b"x"))[0][0] == wire.NBD_REP_ERR_INVALID
    assert await client.option(wire.NBD_OPT_ABORT) == [(wire.NBD_REP_ACK, b"")]
    assert await client.is_closed_by_server()


async def test_info_reports_size_flags_and_block_sizes(server: NbdServer) -> None:
    client = await WireClient.connect(socket_of(server))
    await client.send_client_flags()
    replies = await client.option(wire.NBD_OPT_INFO, info_request("disk1", 3, 1))
    assert replies[0] == (
        wire.NBD_REP_INFO,
        struct.pack(">HQH", 0, OTHER_DISK_BYTES, wire.transmission_flags(read_only=False)),
    )
    assert replies[1] == (wire.NBD_REP_INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
    assert replies[2] == (wire.NBD_REP_INFO, struct.pack(">H", 1) + b"disk1")
    assert replies[3] == (wire.NBD_REP_ACK, b"")
    # INFO stays in negotiation: GO may follow on the same connection.
    assert (await client.option(wire.NBD_OPT_GO, info_request("disk0")))[-1][0] == 1
    assert await client.call(wire.NBD_CMD_READ, 0, 512) == (0, bytes(512))
    await client.close()


async def test_unsupported_and_unknown_options_are_refused_politely(server: NbdServer) -> None:
    client = await WireClient.connect(socket_of(server))
    await client.send_client_flags()
    for option in (wire.NBD_OPT_STRUCTURED_REPLY, 4242):
        [(reply_type, message)] = await client.option(option)
        assert (reply_type, message) == (wire.NBD_REP_ERR_UNSUP, b"not supported")
    [(reply_type, message)] = await client.option(wire.NBD_OPT_STARTTLS)
    assert (reply_type, message) == (wire.NBD_REP_ERR_UNSUP, b"no TLS on this socket")
    [(reply_type, message)] = await client.option(wire.NBD_OPT_GO, info_request("nope"))
    assert (reply_type, message) == (wire.NBD_REP_ERR_UNKNOWN, b"no export named 'nope'")
    [(reply_type, _)] = await client.option(wire.NBD_OPT_GO, b"\x00\x00\x00\x09disk")
    assert reply_type == wire.NBD_REP_ERR_INVALID
    assert (await client.option(wire.NBD_OPT_GO, info_request("disk0")))[-1][0] == 1
    await client.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
async def test_export_name_reply_with_and_without_zeroes(
    server: NbdServer, no_zeroes: bool
) -> None:
    client = await WireClient.connect(socket_of(server))
    await client.send_client_flags(1 | (2 if no_zeroes else 0))
    await client.send_option(wire.NBD_OPT_EXPORT_NAME, b"disk1")
    size, flags = struct.unpack(">QH", await client.reader.readexactly(10))
    assert (size, flags) == (OTHER_DISK_BYTES, wire.transmission_flags(read_only=False))
    if not no_zeroes:
        assert await client.reader.readexactly(124) == bytes(124)
    assert await client.call(wire.NBD_CMD_READ, 0, 16) == (0, bytes(16))
    await client.close()


@pytest.mark.parametrize(
    "handshake",
    [
        struct.pack(">I", 8),  # unknown client flag
        struct.pack(">IQII", 3, 0xDEAD, wire.NBD_OPT_GO, 0),  # bad option magic
        struct.pack(">IQII", 3, wire.IHAVEOPT, wire.NBD_OPT_EXPORT_NAME, 4) + b"nope",
        struct.pack(">IQII", 3, wire.IHAVEOPT, wire.NBD_OPT_GO, 1 << 30),  # absurd length
    ],
    ids=["client-flags", "option-magic", "unknown-export-name", "option-length"],
)
async def test_malformed_handshake_closes_only_that_connection(
    server: NbdServer, handshake: bytes
) -> None:
    healthy, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    bad = await WireClient.connect(socket_of(server))
    bad.writer.write(handshake)
    assert await bad.is_closed_by_server()
    assert await healthy.call(wire.NBD_CMD_WRITE, 0, 4, b"live") == (0, b"")
    assert await healthy.call(wire.NBD_CMD_READ, 0, 4) == (0, b"live")
    await healthy.close()


# --- transmission ----------------------------------------------------------------------------


async def test_bad_request_magic_closes_only_that_connection(server: NbdServer) -> None:
    bad, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    good, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    bad.writer.write(b"\xff" * 28)
    assert await bad.is_closed_by_server()
    assert await good.call(wire.NBD_CMD_WRITE, 512, 3, b"abc") == (0, b"")
    assert await good.call(wire.NBD_CMD_READ, 512, 3) == (0, b"abc")
    other, _, _ = await WireClient.open_export(socket_of(server), "disk1")
    assert await other.call(wire.NBD_CMD_READ, 0, 4) == (0, bytes(4))
    await good.close()
    await other.close()


async def test_requests_past_the_end_get_errors_and_the_connection_goes_on(
    server: NbdServer,
) -> None:
    client, size, _ = await WireClient.open_export(socket_of(server), "disk0")
    assert size == DISK_BYTES
    assert await client.call(wire.NBD_CMD_WRITE, size - 2, 4, b"over") == (wire.NBD_ENOSPC, b"")
    assert await client.call(wire.NBD_CMD_READ, size, 1) == (wire.NBD_EINVAL, b"")
    assert await client.call(wire.NBD_CMD_TRIM, size - 1, 2) == (wire.NBD_EINVAL, b"")
    assert await client.call(wire.NBD_CMD_WRITE, size - 4, 4, b"tail") == (0, b"")
    assert await client.call(wire.NBD_CMD_READ, size - 4, 4) == (0, b"tail")
    assert await client.call(99, 0, 0) == (wire.NBD_EINVAL, b"")
    await client.close()


async def test_oversized_write_payload_is_skipped_and_refused(
    tmp_path: Path, socket_dir: str
) -> None:
    image = tmp_path / "small.raw"
    image.write_bytes(bytes(1 << 16))
    with FileBlockDevice(image) as device:
        path = os.path.join(socket_dir, "s.sock")
        async with NbdServer({"d": device}, unix_path=path, max_request_bytes=4096):
            client, _, _ = await WireClient.open_export(path, "d")
            assert await client.call(wire.NBD_CMD_WRITE, 0, 8192, b"\x11" * 8192) == (
                wire.NBD_EOVERFLOW,
                b"",
            )
            assert await client.call(wire.NBD_CMD_READ, 0, 8192) == (wire.NBD_EOVERFLOW, b"")
            assert await client.call(wire.NBD_CMD_WRITE, 0, 4, b"next") == (0, b"")
            assert await client.call(wire.NBD_CMD_READ, 0, 8) == (0, b"next" + bytes(4))
            await client.close()


async def test_pipelined_requests_all_get_their_replies(server: NbdServer) -> None:
    client, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    blocks = {i: os.urandom(4096) for i in range(32)}
    cookies = {
        client.send_request(wire.NBD_CMD_WRITE, i * 4096, 4096, b) for i, b in blocks.items()
    }
    cookies.add(client.send_request(wire.NBD_CMD_FLUSH, 0, 0))
    await client.writer.drain()
    replies = [await client.receive_reply() for _ in cookies]
    assert {cookie for cookie, _, _ in replies} == cookies
    assert all(error == 0 for _, error, _ in replies)
    reads = {client.send_request(wire.NBD_CMD_READ, i * 4096, 4096): i for i in blocks}
    for _ in reads:
        cookie, error, data = await client.receive_reply()
        assert (error, data) == (0, blocks[reads[cookie]])
    await client.close()


async def test_zeroes_trim_and_fua(server: NbdServer) -> None:
    client, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    fua = wire.NBD_CMD_FLAG_FUA
    assert await client.call(wire.NBD_CMD_WRITE, 0, 8192, b"\x7f" * 8192, fua) == (0, b"")
    assert await client.call(wire.NBD_CMD_WRITE_ZEROES, 100, 5000) == (0, b"")
    no_hole = wire.NBD_CMD_FLAG_NO_HOLE | fua
    assert await client.call(wire.NBD_CMD_WRITE_ZEROES, 6000, 100, flags=no_hole) == (0, b"")
    _, data = await client.call(wire.NBD_CMD_READ, 0, 8192)
    assert data == b"\x7f" * 100 + bytes(5000) + b"\x7f" * 900 + bytes(100) + b"\x7f" * 2092
    assert await client.call(wire.NBD_CMD_TRIM, 0, 8192, flags=fua) == (0, b"")
    await client.close()


async def test_disc_closes_after_replies_in_flight(server: NbdServer) -> None:
    client, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    write = client.send_request(wire.NBD_CMD_WRITE, 0, 2, b"ok")
    client.writer.write(struct.pack(">IHHQQI", wire.NBD_REQUEST_MAGIC, 0, 2, 0, 0, 0))
    client.send_request(wire.NBD_CMD_READ, 0, 2)  # after DISC: never served
    assert (await client.receive_reply())[:2] == (write, 0)
    assert await client.is_closed_by_server()


async def test_fenced_export_refuses_writes_but_serves_reads(server: NbdServer) -> None:
    client, _, _ = await WireClient.open_export(socket_of(server), "disk0")
    assert await client.call(wire.NBD_CMD_WRITE, 0, 4, b"mine") == (0, b"")
    server.refuse_writes("disk0", "epoch 7 belongs to site B")
    assert server.write_refusal("disk0") == "epoch 7 belongs to site B"
    for command, length, data in [(1, 4, b"late"), (6, 4, b""), (4, 4, b"")]:
        assert await client.call(command, 0, length, data) == (wire.NBD_EPERM, b"")
    assert await client.call(wire.NBD_CMD_READ, 0, 4) == (0, b"mine")
    assert await client.call(wire.NBD_CMD_FLUSH, 0, 0) == (0, b"")
    newcomer, _, flags = await WireClient.open_export(socket_of(server), "disk0")
    assert flags & wire.NBD_FLAG_READ_ONLY
    await newcomer.close()
    server.accept_writes("disk0")
    assert await client.call(wire.NBD_CMD_WRITE, 0, 4, b"back") == (0, b"")
    with pytest.raises(ConfigurationError, match="no export named 'disk9'"):
        server.refuse_writes("disk9", "x")
    await client.close()


async def test_exports_come_and_go_at_runtime(server: NbdServer, tmp_path: Path) -> None:
    client, _, _ = await WireClient.open_export(socket_of(server), "disk1")
    server.remove_export("disk1")  # the fixture closes its file
    assert await client.call(wire.NBD_CMD_READ, 0, 4) == (wire.NBD_ESHUTDOWN, b"")
    probe = await WireClient.connect(socket_of(server))
    await probe.send_client_flags()
    [(reply_type, _)] = await probe.option(wire.NBD_OPT_GO, info_request("disk1"))
    assert reply_type == wire.NBD_REP_ERR_UNKNOWN
    await probe.close()
    image = tmp_path / "new.raw"
    image.write_bytes(b"N" * 4096)
    with FileBlockDevice(image) as device:
        server.set_export("disk2", device, read_only=True)
        assert set(server.exports) == {"disk0", "disk2"}
        fresh, size, flags = await WireClient.open_export(socket_of(server), "disk2")
        assert (size, flags & wire.NBD_FLAG_READ_ONLY) == (4096, wire.NBD_FLAG_READ_ONLY)
        assert await fresh.call(wire.NBD_CMD_READ, 0, 2) == (0, b"NN")
        assert await fresh.call(wire.NBD_CMD_WRITE, 0, 2, b"xx") == (wire.NBD_EPERM, b"")
        await fresh.close()
    await client.close()


async def test_stop_twice_is_harmless_and_uri_forms(tmp_path: Path, socket_dir: str) -> None:
    image = tmp_path / "u.raw"
    image.write_bytes(bytes(4096))
    with FileBlockDevice(image) as device:
        path = os.path.join(socket_dir, "u.sock")
        nbd = NbdServer({"vm 1/disk": device}, unix_path=path, tcp=("127.0.0.1", 0))
        await nbd.start()
        assert nbd.uri("vm 1/disk") == f"nbd+unix:///vm%201%2Fdisk?socket={path}"
        assert nbd.tcp_address is not None
        tcp_only = NbdServer({"d": device}, tcp=nbd.tcp_address)
        assert tcp_only.uri("d") == f"nbd://127.0.0.1:{nbd.tcp_address[1]}/d"
        client, _, _ = await WireClient.open_export(path, "vm 1/disk")
        await nbd.stop()
        await nbd.stop()
        assert await client.is_closed_by_server()
        with pytest.raises(FileNotFoundError):  # the socket file is gone
            await asyncio.open_unix_connection(path)
    with pytest.raises(ConfigurationError, match="unix_path, a tcp address"):
        NbdServer({})
