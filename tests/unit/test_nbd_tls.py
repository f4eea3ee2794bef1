"""NBD STARTTLS on the TCP listener, against a raw-bytes client (real clients: tests/e2e).

The spec's FORCEDTLS mode when TLS is required: every option but STARTTLS and ABORT gets
``NBD_REP_ERR_TLS_REQD`` and ``NBD_OPT_EXPORT_NAME`` hangs up, so no byte of an export moves
in clear. TLS admits only clients whose certificate the folder's CA signed. The Unix socket of
the same server stays plain.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_nbd_protocol import WireClient, info_request
from vmreplica.config import SiteConfig
from vmreplica.domain.model import DiskRecord, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.server import FileBlockDevice, NbdServer
from vmreplica.nbd.tls import load_server_tls
from vmreplica.producers.nbd_exports import nbd_uris
from vmreplica.security.certificates import NbdCertificates, make_nbd_certificates

DISK_BYTES = 1 << 20


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> NbdCertificates:
    return make_nbd_certificates(tmp_path_factory.mktemp("nbd-tls"), ("nbd.example",))


def client_context(files: NbdCertificates, *, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.ca_file)
    if with_certificate:
        context.load_cert_chain(files.client_cert_file, files.client_key_file)
    return context


async def tcp_server(
    tmp_path: Path, files: NbdCertificates, *, required: bool, unix_path: str | None = None
) -> NbdServer:
    path = tmp_path / "disk0.raw"
    path.write_bytes(b"")
    os.truncate(path, DISK_BYTES)
    tls = load_server_tls(files.folder, required=required)
    server = NbdServer(
        {"disk0": FileBlockDevice(path)}, tcp=("127.0.0.1", 0), unix_path=unix_path, tls=tls
    )
    await server.start()
    return server


@pytest.fixture
async def required(tmp_path: Path, certificates: NbdCertificates) -> AsyncIterator[NbdServer]:
    server = await tcp_server(tmp_path, certificates, required=True)
    yield server
    await server.stop()
    device = server.exports["disk0"]
    assert isinstance(device, FileBlockDevice)
    device.close()


async def connect(server: NbdServer) -> WireClient:
    assert server.tcp_address is not None
    reader, writer = await asyncio.open_connection(*server.tcp_address)
    assert await reader.readexactly(18) == wire.encode_greeting()
    client = WireClient(reader, writer)
    await client.send_client_flags()
    return client


async def start_tls(client: WireClient, context: ssl.SSLContext) -> None:
    assert await client.option(wire.NBD_OPT_STARTTLS) == [(wire.NBD_REP_ACK, b"")]
    await client.writer.start_tls(context, server_hostname="127.0.0.1")


async def test_a_required_tls_refuses_every_option_before_starttls(required: NbdServer) -> None:
    client = await connect(required)
    for option, data in (
        (wire.NBD_OPT_GO, info_request("disk0")),
        (wire.NBD_OPT_INFO, info_request("disk0")),
        (wire.NBD_OPT_LIST, b""),
        (wire.NBD_OPT_STRUCTURED_REPLY, b""),
    ):
        [(reply_type, message)] = await client.option(option, data)
        assert reply_type == wire.NBD_REP_ERR_TLS_REQD
        assert message == b"this server requires TLS: send NBD_OPT_STARTTLS first"
    assert await client.option(wire.NBD_OPT_ABORT) == [(wire.NBD_REP_ACK, b"")]
    assert await client.is_closed_by_server()

    client = await connect(required)  # EXPORT_NAME cannot be refused politely: hang up
    await client.send_option(wire.NBD_OPT_EXPORT_NAME, b"disk0")
    assert await client.is_closed_by_server()


async def test_inside_tls_the_export_reads_and_writes(
    required: NbdServer, certificates: NbdCertificates
) -> None:
    client = await connect(required)
    [(reply_type, _)] = await client.option(wire.NBD_OPT_STARTTLS, b"x")
    assert reply_type == wire.NBD_REP_ERR_INVALID
    await start_tls(client, client_context(certificates))
    [(reply_type, message)] = await client.option(wire.NBD_OPT_STARTTLS)
    assert (reply_type, message) == (wire.NBD_REP_ERR_INVALID, b"TLS is on already")
    replies = await client.option(wire.NBD_OPT_GO, info_request("disk0"))
    assert replies[-1] == (wire.NBD_REP_ACK, b"")
    assert struct.unpack(">HQH", replies[0][1])[1] == DISK_BYTES
    data = os.urandom(64 * 1024)
    assert await client.call(wire.NBD_CMD_WRITE, 4096, len(data), data) == (0, b"")
    assert await client.call(wire.NBD_CMD_READ, 4096, len(data)) == (0, data)
    await client.close()


async def test_a_client_without_a_certificate_the_ca_signed_is_dropped(
    required: NbdServer, certificates: NbdCertificates, tmp_path: Path
) -> None:
    stranger = make_nbd_certificates(tmp_path / "other")  # another CA's client certificate
    for context in (
        client_context(certificates, with_certificate=False),
        ssl.create_default_context(cafile=certificates.ca_file),
    ):
        client = await connect(required)
        await start_tls(client, context)
        # TLS 1.3 finishes the client's side first; the server's refusal arrives as an alert.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await client.option(wire.NBD_OPT_GO, info_request("disk0"))
    wrong = ssl.create_default_context(cafile=certificates.ca_file)
    wrong.load_cert_chain(stranger.client_cert_file, stranger.client_key_file)
    client = await connect(required)
    await start_tls(client, wrong)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await client.option(wire.NBD_OPT_GO, info_request("disk0"))
    healthy = await connect(required)  # the others are served on
    await start_tls(healthy, client_context(certificates))
    assert (await healthy.option(wire.NBD_OPT_GO, info_request("disk0")))[-1][0] == 1
    await healthy.close()


async def test_tls_offered_but_not_required_serves_both(
    tmp_path: Path, certificates: NbdCertificates
) -> None:
    with_unix = str(tmp_path.parent / f"tls-{os.getpid()}.sock")
    server = await tcp_server(tmp_path, certificates, required=False, unix_path=with_unix)
    try:
        plain = await connect(server)
        assert (await plain.option(wire.NBD_OPT_GO, info_request("disk0")))[-1][0] == 1
        await plain.close()
        secured = await connect(server)
        await start_tls(secured, client_context(certificates))
        assert (await secured.option(wire.NBD_OPT_GO, info_request("disk0")))[-1][0] == 1
        await secured.close()
        unix = await WireClient.connect(with_unix)  # the Unix socket offers no TLS
        await unix.send_client_flags()
        [(reply_type, _)] = await unix.option(wire.NBD_OPT_STARTTLS)
        assert reply_type == wire.NBD_REP_ERR_UNSUP
        await unix.close()
        assert server.uri("disk0").startswith("nbd+unix://")
    finally:
        await server.stop()
        device = server.exports["disk0"]
        assert isinstance(device, FileBlockDevice)
        device.close()


def test_missing_or_bad_credentials_are_named(
    tmp_path: Path, certificates: NbdCertificates
) -> None:
    with pytest.raises(ConfigurationError, match=r"server-cert\.pem.*vmreplica nbd-certificates"):
        load_server_tls(tmp_path, required=True)
    folder = tmp_path / "mixed"
    other = make_nbd_certificates(tmp_path / "other")
    folder.mkdir()
    (folder / "ca-cert.pem").write_bytes(certificates.ca_file.read_bytes())
    (folder / "server-cert.pem").write_bytes(certificates.server_cert_file.read_bytes())
    (folder / "server-key.pem").write_bytes(other.server_key_file.read_bytes())
    with pytest.raises(ConfigurationError, match="cannot load the NBD TLS credentials"):
        load_server_tls(folder, required=True)


def test_the_tcp_listener_leaves_loopback_only_with_required_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        SiteConfig(nbd_tcp_host="0.0.0.0")
    with pytest.raises(ValueError, match="not a loopback address"):
        SiteConfig(nbd_tcp_host="0.0.0.0", nbd_tls_dir=tmp_path, nbd_tls_required=False)
    config = SiteConfig(nbd_tcp_host="0.0.0.0", nbd_tls_dir=tmp_path, nbd_tcp_port=10809)
    assert config.nbd_tls_required
    record = VmRecord(
        "web01", "primary", "default", "site-b", VmSettings(capture="nbd"), 1,
        ReplicationState.REPLICATING, "", 0, (DiskRecord("system", "/x/system.img", 1 << 20),),
    )  # fmt: skip
    assert nbd_uris(config, record)["system"]["tcp"] == "nbds://0.0.0.0:10809/web01.system"
