"""Where the agent serves a VM's disks over NBD, and the URIs the hypervisor attaches to.

Each VM enabled with ``--capture nbd`` gets one Unix socket, ``<root>/vms/<vm>/nbd.sock`` (or
``<nbd_socket_dir>/<vm>.sock``), with one export per disk named after the disk::

    nbd+unix:///disk0?socket=/var/lib/vmreplica/vms/web01/nbd.sock

With ``nbd_tcp_port`` set, the agent also serves every VM's disks on one loopback TCP listener,
as exports named ``<vm>.<disk>`` (``nbd://127.0.0.1:10809/web01.disk0``). The URIs are known
from the configuration alone, so ``vmreplica enable`` prints them before the agent runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final
from urllib.parse import quote

from vmreplica.config import SiteConfig
from vmreplica.domain.model import VmRecord
from vmreplica.errors import ConfigurationError
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.journaling_device import JournalingDevice

UNIX_PATH_MAX_BYTES: Final = 107
"""sun_path holds 108 bytes, one of which is the terminating NUL."""


def socket_path(config: SiteConfig, vm: str) -> Path:
    """The Unix socket the agent serves ``vm``'s disks on.

    :raises ConfigurationError: the path is too long for a Unix socket.
    """
    if config.nbd_socket_dir is not None:
        path = config.nbd_socket_dir / f"{vm}.sock"
    else:
        path = config.vm_folder(vm) / "nbd.sock"
    if len(os.fsencode(path)) > UNIX_PATH_MAX_BYTES:
        raise ConfigurationError(
            f"NBD socket path {path} is {len(os.fsencode(path))} bytes, longer than the "
            f"{UNIX_PATH_MAX_BYTES} a Unix socket allows. Set `nbd_socket_dir` in the site "
            "configuration to a short folder (e.g. /run/vmreplica)")
    return path


def unix_uri(path: Path, disk: str) -> str:
    return f"nbd+unix:///{quote(disk, safe='')}?socket={quote(str(path), safe='/')}"


def tcp_export_name(vm: str, disk: str) -> str:
    """Export name on the shared TCP listener (names have no dots, so this is unambiguous)."""
    return f"{vm}.{disk}"


def tcp_uri(host: str, port: int, vm: str, disk: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"nbd://{host}:{port}/{tcp_export_name(vm, disk)}"


def nbd_uris(config: SiteConfig, record: VmRecord,
             tcp_port: int | None = None) -> dict[str, dict[str, str]]:
    """Per disk, the URIs the hypervisor attaches to: ``{"disk0": {"unix": ..., "tcp": ...}}``.

    ``tcp_port`` is the port actually listened on (when ``nbd_tcp_port`` is 0); without it a
    configured port 0 gives no TCP URI.
    """
    path = socket_path(config, record.name)
    port = tcp_port if tcp_port is not None else config.nbd_tcp_port
    uris = {}
    for disk in record.disks:
        entry = {"unix": unix_uri(path, disk.name)}
        if port:
            entry["tcp"] = tcp_uri(config.nbd_tcp_host, port, record.name, disk.name)
        uris[disk.name] = entry
    return uris


class VmExports:
    """A VM's disks served over NBD by the agent while it is the VM's primary.

    ``async with VmExports(...)``: the Unix socket listens (a stale socket left by a killed
    agent is replaced), each disk is an export backed by a :class:`JournalingDevice`, and on
    exit the exports close before the caller closes the capture.
    """

    def __init__(self, vm: str, capture: CapturedVm, path: Path,
                 tcp_server: NbdServer | None = None) -> None:
        self.vm = vm
        self.capture = capture
        self.path = path
        self.devices = {disk: JournalingDevice(capture, disk) for disk in capture.disk_names}
        self.server = NbdServer(dict(self.devices), unix_path=path)
        self._tcp = tcp_server

    def uri(self, disk: str) -> str:
        return self.server.uri(disk)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self.server.start()
        if self._tcp is not None:
            for disk, device in self.devices.items():
                self._tcp.set_export(tcp_export_name(self.vm, disk), device)

    def refuse_writes(self, reason: str) -> None:
        """Fence every export: writes, trims and zeroing get EPERM; reads still work."""
        for disk in self.devices:
            self.server.refuse_writes(disk, reason)
            if self._tcp is not None:
                self._tcp.refuse_writes(tcp_export_name(self.vm, disk), reason)

    async def stop(self) -> None:
        if self._tcp is not None:
            for disk in self.devices:
                if tcp_export_name(self.vm, disk) in self._tcp.exports:
                    self._tcp.remove_export(tcp_export_name(self.vm, disk))
        await self.server.stop()

    async def __aenter__(self) -> VmExports:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
