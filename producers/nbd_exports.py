"""Where the agent serves a VM's disks over NBD, and the URIs the hypervisor attaches to.

Each VM enabled with ``--capture nbd`` gets one Unix socket, ``<root>/vms/<vm>/nbd.sock`` (or
``<nbd_socket_dir>/<vm>.sock``), with one export per disk named after the disk::

    nbd+unix:///disk0?socket=/var/lib/vmreplica/vms/web01/nbd.sock

With ``nbd_tcp_port`` set, the agent also serves every VM's disks on one loopback TCP listener,
as exports named ``<vm>.<disk>`` (``nbd://127.0.0.1:10809/web01.disk0``); with ``nbd_tls_dir``
that listener offers TLS, required by default (``nbds://...``), and may then listen beyond
loopback. The URIs are known from the configuration alone, so ``vmreplica enable`` prints them
before the agent runs.

The exports follow the VM through failovers (:class:`VmExports`): at the primary they capture
every write; at any other site that holds the VM — a replica, or the old primary after a
failover — they serve the images read-only and answer writes with EPERM, so a hypervisor still
attached to the old primary sees an error rather than a vanished socket, and the new primary
serves the same export names.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from vmreplica.config import SiteConfig
from vmreplica.domain.model import VmRecord
from vmreplica.errors import ConfigurationError
from vmreplica.nbd.device import BlockDevice, FileBlockDevice
from vmreplica.nbd.server import NbdServer
from vmreplica.nbd.tls import load_server_tls
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.journaling_device import JournalingDevice
from vmreplica.service import Service

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
            "configuration to a short folder (e.g. /run/vmreplica)"
        )
    return path


def unix_uri(path: Path, disk: str) -> str:
    return f"nbd+unix:///{quote(disk, safe='')}?socket={quote(str(path), safe='/')}"


def tcp_export_name(vm: str, disk: str) -> str:
    """Export name on the shared TCP listener (names have no dots, so this is unambiguous)."""
    return f"{vm}.{disk}"


def tcp_uri(host: str, port: int, vm: str, disk: str, *, tls: bool = False) -> str:
    """``nbd://`` or, when TLS is required, ``nbds://`` (libnbd's form; QEMU takes the TLS
    credentials as an object instead, see the README)."""
    host = f"[{host}]" if ":" in host else host
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{tcp_export_name(vm, disk)}"


def tcp_listener(config: SiteConfig) -> NbdServer:
    """The agent's NBD TCP listener (``nbd_tcp_port``), with TLS when ``nbd_tls_dir`` is set;
    not started.

    :raises ConfigurationError: the TLS credentials cannot be loaded.
    """
    assert config.nbd_tcp_port is not None
    tls = None
    if config.nbd_tls_dir is not None:
        tls = load_server_tls(config.nbd_tls_dir, required=config.nbd_tls_required)
    return NbdServer({}, tcp=(config.nbd_tcp_host, config.nbd_tcp_port), tls=tls)


def nbd_uris(
    config: SiteConfig, record: VmRecord, tcp_port: int | None = None
) -> dict[str, dict[str, str]]:
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
            tls = config.nbd_tls_dir is not None and config.nbd_tls_required
            entry["tcp"] = tcp_uri(config.nbd_tcp_host, port, record.name, disk.name, tls=tls)
        uris[disk.name] = entry
    return uris


class ServedDisk:
    """One disk as its export serves it, whatever serves it now.

    While this site is the VM's primary the disk is its :class:`JournalingDevice` (writes are
    captured); otherwise it is the image itself, read-only. The export stays the same object
    when that changes, so a connected hypervisor keeps its connection: reads go on, and writes
    get the error the server answers while writes are refused (EPERM). The methods hand over
    the device's own coroutine (no frame of their own on the I/O path).
    """

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self._size = device.size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> Coroutine[Any, Any, bytes]:
        return self.device.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> Coroutine[Any, Any, None]:
        return self.device.write(offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Coroutine[Any, Any, None]:
        return self.device.write_zeroes(offset, length, fua, may_trim)

    def trim(self, offset: int, length: int) -> Coroutine[Any, Any, None]:
        return self.device.trim(offset, length)

    def flush(self) -> Coroutine[Any, Any, None]:
        return self.device.flush()


class VmExports(Service):
    """A VM's disks served over NBD by the agent for as long as this site holds the VM.

    One export per disk on the VM's Unix socket (and on the shared TCP listener, if any). While
    this site is the VM's primary, :meth:`capture_through` puts the capture behind the exports
    and they accept writes; at every other moment — a replica, an old primary after a failover,
    a primary whose worker waits to be retried — :meth:`serve_images` serves the images
    read-only and writes get EPERM with the reason. The socket never goes away while the agent
    runs, so a hypervisor attached to it sees an error on write, not a dead socket. A stale
    socket left by a killed agent is replaced at :meth:`start`.
    """

    def __init__(self, vm: str, path: Path, tcp_server: NbdServer | None = None) -> None:
        self.vm = vm
        self.path = path
        self.disks: dict[str, ServedDisk] = {}
        self.server = NbdServer({}, unix_path=path)
        self._tcp = tcp_server
        self._files: dict[str, FileBlockDevice] = {}
        """Read-only image devices, by disk, while they are (or may again be) served."""
        self._refusal: str | None = None

    def uri(self, disk: str) -> str:
        return self.server.uri(disk)

    @property
    def write_refusal(self) -> str | None:
        """Why writes are refused now, or None while the capture takes them."""
        return self._refusal

    async def start(self) -> None:
        """Listen on the VM's socket (no export until the first serve call)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self.server.start()

    def capture_through(self, capture: CapturedVm) -> None:
        """This site is the VM's primary: every disk's writes go through ``capture``."""
        for disk in capture.disk_names:
            self._serve(disk, JournalingDevice(capture, disk))
        self._refusal = None
        for disk in self.disks:
            self.server.accept_writes(disk)
            if self._tcp is not None:
                self._tcp.accept_writes(tcp_export_name(self.vm, disk))

    def refuse_writes(self, reason: str) -> None:
        """Fence every export: writes, trims and zeroing get EPERM; reads still work."""
        self._refusal = reason
        for disk in self.disks:
            self.server.refuse_writes(disk, reason)
            if self._tcp is not None:
                self._tcp.refuse_writes(tcp_export_name(self.vm, disk), reason)

    def serve_images(self, images: Mapping[str, Path], reason: str) -> None:
        """Serve the images read-only, refusing writes for ``reason``; call before the
        capture that served them closes. A disk whose image does not exist yet is left out.
        """
        self.refuse_writes(reason)
        for disk, path in images.items():
            device = self._files.get(disk)
            if device is None or Path(device.path) != path:
                if not path.exists():
                    continue
                if device is not None:
                    device.close()
                device = self._files[disk] = FileBlockDevice(path, read_only=True)
            self._serve(disk, device)

    def _serve(self, disk: str, device: BlockDevice) -> None:
        served = self.disks.get(disk)
        if served is not None and served.size == device.size:
            served.device = device  # connected clients carry on with the new device
            return
        served = self.disks[disk] = ServedDisk(device)
        self.server.set_export(disk, served)
        if self._tcp is not None:
            self._tcp.set_export(tcp_export_name(self.vm, disk), served)
        if self._refusal is not None:
            self.server.refuse_writes(disk, self._refusal)
            if self._tcp is not None:
                self._tcp.refuse_writes(tcp_export_name(self.vm, disk), self._refusal)

    async def stop(self) -> None:
        """Stop serving (clients are disconnected); a second call does nothing."""
        if self._tcp is not None:
            for disk in self.disks:
                if tcp_export_name(self.vm, disk) in self._tcp.exports:
                    self._tcp.remove_export(tcp_export_name(self.vm, disk))
        await self.server.stop()
        for device in self._files.values():
            device.close()
        self._files.clear()
