"""The NBD exports of every ``--capture nbd`` VM a site holds, kept up across role changes.

A VM's exports belong to the agent, not to one of its workers: they capture the VM's writes
while it is primary here (its :class:`~vmreplica.producers.capture_front.CaptureFront` takes
them), and otherwise serve its images read-only, answering writes with EPERM and a reason — so
a hypervisor still attached to an old primary sees an error rather than a vanished socket, and
the new primary of a failover serves the same export names. Only a worker that fails while
the VM is still primary here withdraws them (:meth:`SiteExports.withdraw`): the hypervisor then
waits and reconnects instead of being told its writes are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmreplica.config import SiteConfig, cannot_listen
from vmreplica.domain.model import VmRecord
from vmreplica.errors import ConfigurationError
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.nbd_exports import VmExports, socket_path, tcp_listener
from vmreplica.service import Service

log = logging.getLogger(__name__)


class SiteExports(Service):
    """Every VM's exports at one site, and the site's TCP listener (``nbd_tcp_port``; loopback
    unless TLS is required)."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.by_vm: dict[str, VmExports] = {}
        self.tcp: NbdServer | None = None
        """The loopback TCP listener for every export, once started (if configured)."""

    async def start(self) -> None:
        """Listen on ``nbd_tcp_port``, if set.

        :raises ConfigurationError: the port cannot be listened on (one line naming the setting),
            or the TLS credentials of ``nbd_tls_dir`` cannot be loaded.
        """
        config = self.config
        if config.nbd_tcp_port is None:
            return
        server = tcp_listener(config)  # with TLS when nbd_tls_dir is set
        try:
            await server.start()
        except OSError as error:
            raise cannot_listen(
                "nbd_tcp_port", "nbd_tcp_host", config.nbd_tcp_port, config.nbd_tcp_host, error
            ) from None
        self.tcp = server
        log.info("serving NBD exports on %s as <vm>.<disk>", server.tcp_address)

    async def stop(self) -> None:
        """Stop every VM's exports, then the TCP listener."""
        for exports in self.by_vm.values():
            await exports.stop()
        self.by_vm.clear()
        if self.tcp is not None:
            await self.tcp.stop()
            self.tcp = None

    async def of(self, record: VmRecord) -> VmExports | None:
        """The exports of a ``--capture nbd`` VM (None for other VMs), listening from the first
        call until :meth:`stop` or :meth:`withdraw` (they may serve nothing yet)."""
        if record.settings.capture != "nbd":
            return None
        exports = self.by_vm.get(record.name)
        if exports is None:
            exports = VmExports(record.name, socket_path(self.config, record.name), self.tcp)
            await exports.start()
            self.by_vm[record.name] = exports
        return exports

    async def serve(self, record: VmRecord, reason: str) -> None:
        """This site holds the VM but does not capture its writes (a replica, an old primary):
        its exports serve the images read-only and refuse writes for ``reason``."""
        exports = await self.of(record)
        if exports is not None:
            exports.serve_images({d.name: Path(d.path) for d in record.disks}, reason)

    async def serve_fenced(self, record: VmRecord, reason: str) -> None:
        """:meth:`serve`, where failing to (a socket path too long, taken) is logged and never
        stops replication or a failover."""
        try:
            await self.serve(record, reason)
        except (ConfigurationError, OSError) as error:
            log.warning("VM %s: not serving its images over NBD: %s", record.name, error)

    async def serve_replica(self, record: VmRecord) -> None:
        """Serve a replica's images, refusing writes with the name of the primary site."""
        await self.serve_fenced(
            record,
            (
                f"VM {record.name!r} is a replica at site {self.config.site}; its primary is "
                f"site {record.partner_site}, whose exports take the VM's writes"
            ),
        )

    async def withdraw(self, vm: str) -> None:
        """Stop serving ``vm``'s exports: its worker failed and is retried, still primary here.
        A hypervisor (QEMU with ``reconnect-delay``) then waits and reconnects to the capture,
        instead of being told its writes are refused by a site that is still the primary."""
        exports = self.by_vm.pop(vm, None)
        if exports is not None:
            await exports.stop()
