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
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.nbd_exports import VmExports, nbd_uris, socket_path


def record(vm: str = "web01") -> VmRecord:
    return VmRecord(vm, "primary", "default", "site-b", VmSettings(capture="nbd"), 1,
                    ReplicationState.REPLICATING, "", 0,
                    (DiskRecord("system", "/x/system.img", 1 << 20),
                     DiskRecord("data", "/x/data.img", 1 << 20)))


def test_uris_per_disk_on_the_vm_socket_and_optionally_tcp() -> None:
    config = SiteConfig(root=Path("/var/lib/vmreplica"), nbd_tcp_port=10809)
    uris = nbd_uris(config, record())
    assert uris["system"] == {
        "unix": "nbd+unix:///system?socket=/var/lib/vmreplica/vms/web01/nbd.sock",
        "tcp": "nbd://127.0.0.1:10809/web01.system"}
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
    capture = CapturedVm("web01", [("system", tmp_path / "system.img", 1 << 20)],
                         tmp_path / "log")
    with tempfile.TemporaryDirectory(prefix="nbdx-") as folder:
        path = Path(folder) / "web01.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # bound, never listening: what a killed server leaves
        async with VmExports("web01", capture, path) as exports:
            assert exports.uri("system") == f"nbd+unix:///system?socket={path}"
            second = NbdServer({}, unix_path=path)
            with pytest.raises(ConfigurationError, match="already serves"):
                await second.start()
            exports.refuse_writes("fenced")
            assert exports.server.write_refusal("system") == "fenced"
        assert not path.exists()
    capture.close()
