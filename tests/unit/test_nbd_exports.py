"""Where the agent serves NBD: socket paths, URIs, stale sockets, and the TCP option's checks."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.model import DiskRecord, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.nbd_exports import VmExports, nbd_uris, socket_path

from .test_nbd_protocol import WireClient


def record(vm: str = "web01") -> VmRecord:
    return VmRecord(
        vm,
        "primary",
        "default",
        "site-b",
        VmSettings(capture="nbd"),
        1,
        ReplicationState.REPLICATING,
        "",
        0,
        (
            DiskRecord("system", "/x/system.img", 1 << 20),
            DiskRecord("data", "/x/data.img", 1 << 20),
        ),
    )


def test_uris_per_disk_on_the_vm_socket_and_optionally_tcp() -> None:
    config = SiteConfig(root=Path("/var/lib/vmreplica"), nbd_tcp_port=10809)
    uris = nbd_uris(config, record())
    assert uris["system"] == {
        "unix": "nbd+unix:///system?socket=/var/lib/vmreplica/vms/web01/nbd.sock",
        "tcp": "nbd://127.0.0.1:10809/web01.system",
    }
    assert set(uris) == {"system", "data"}
    short = SiteConfig(root=Path("/var/lib/vmreplica"), nbd_socket_dir=Path("/run/vmr"))
    assert socket_path(short, "web01") == Path("/run/vmr/web01.sock")
    assert "tcp" not in nbd_uris(short, record())["data"]


def test_a_socket_path_too_long_for_unix_is_refused_with_the_fix() -> None:
    config = SiteConfig(root=Path("/" + "d" * 100))
    with pytest.raises(ConfigurationError, match="nbd_socket_dir"):
        socket_path(config, "web01")


def test_tcp_host_must_be_loopback() -> None:
    SiteConfig(nbd_tcp_host="::1")
    with pytest.raises(ValueError, match="loopback"):
        SiteConfig(nbd_tcp_host="0.0.0.0")


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    capture = CapturedVm("web01", [("system", tmp_path / "system.img", 1 << 20)], tmp_path / "log")
    with tempfile.TemporaryDirectory(prefix="nbdx-") as folder:
        path = Path(folder) / "web01.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # bound, never listening: what a killed server leaves
        async with VmExports("web01", path) as exports:
            exports.capture_through(capture)
            assert exports.uri("system") == f"nbd+unix:///system?socket={path}"
            second = NbdServer({}, unix_path=path)
            with pytest.raises(ConfigurationError, match="already serves"):
                await second.start()
            exports.refuse_writes("fenced")
            assert exports.server.write_refusal("system") == "fenced"
        assert not path.exists()
    capture.close()


async def test_exports_outlive_the_capture_refusing_writes_and_come_back_writable(
    tmp_path: Path,
) -> None:
    """A role change keeps the client's connection: reads go on, writes get EPERM, then a new
    capture (this site primary again) takes writes on the same export."""
    image = tmp_path / "system.img"
    capture = CapturedVm("web01", [("system", image, 1 << 20)], tmp_path / "log")
    await capture.write("system", 0, b"\x11" * 4096)
    with tempfile.TemporaryDirectory(prefix="nbdx-") as folder:
        path = Path(folder) / "web01.sock"
        async with VmExports("web01", path) as exports:
            exports.capture_through(capture)
            client, size, flags = await WireClient.open_export(str(path), "system")
            assert (size, flags & wire.NBD_FLAG_READ_ONLY) == (1 << 20, 0)
            assert await client.call(wire.NBD_CMD_WRITE, 4096, 4096, b"\x22" * 4096) == (0, b"")

            exports.serve_images({"system": image}, "site-b is the primary now")
            capture.close()  # the old primary's capture closes; the export stays
            assert exports.write_refusal == "site-b is the primary now"
            assert await client.call(wire.NBD_CMD_READ, 0, 8192) == (
                0,
                b"\x11" * 4096 + b"\x22" * 4096,
            )
            assert await client.call(wire.NBD_CMD_WRITE, 0, 4096, b"\x33" * 4096) == (
                wire.NBD_EPERM,
                b"",
            )
            fresh, _, flags = await WireClient.open_export(str(path), "system")
            assert flags & wire.NBD_FLAG_READ_ONLY
            await fresh.close()

            again = CapturedVm("web01", [("system", image, 1 << 20)], tmp_path / "log")
            exports.capture_through(again)
            assert exports.write_refusal is None
            assert await client.call(wire.NBD_CMD_WRITE, 0, 4096, b"\x44" * 4096) == (0, b"")
            await client.close()
            again.close()
    assert image.read_bytes()[:4096] == b"\x44" * 4096


async def test_a_disk_without_an_image_yet_is_served_once_it_exists(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="nbdx-") as folder:
        path = Path(folder) / "web01.sock"
        async with VmExports("web01", path) as exports:
            exports.serve_images({"system": tmp_path / "missing.img"}, "not yet")
            assert dict(exports.server.exports) == {}
            (tmp_path / "missing.img").write_bytes(bytes(4096))
            exports.serve_images({"system": tmp_path / "missing.img"}, "replica")
            assert exports.server.write_refusal("system") == "replica"
