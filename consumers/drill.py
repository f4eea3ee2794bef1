"""Test failover as the agent runs it: ``<vm> - Test`` disks served over NBD on the replica.

The CLI asks through the catalog (a ``test_failover`` row in state ``requested``); the replica's
worker calls :meth:`FailoverDrill.poll` between two fetches, builds a
:class:`~vmreplica.consumers.views.PointView` at the point (cost: the changes since it), serves
one NBD export per disk on ``<vm folder>/test.sock`` and marks the row ``ready`` with the URIs.
The replica keeps applying cycles meanwhile; the view stays at its point. ``stopping`` tears it
down and discards the scratch writes.
"""

from __future__ import annotations

import logging
import shutil

from vmreplica.consumers.replica import ReplicaVm
from vmreplica.consumers.views import PointView, ViewDisk
from vmreplica.errors import ReplicationError
from vmreplica.nbd.server import NbdServer
from vmreplica.storage.catalog import Catalog

log = logging.getLogger(__name__)


class FailoverDrill:
    """The test failover of one replica VM, driven by its catalog row."""

    def __init__(self, catalog: Catalog, replica: ReplicaVm) -> None:
        self.catalog = catalog
        self.replica = replica
        self.view: PointView | None = None
        self.server: NbdServer | None = None

    @property
    def socket_path(self) -> str:
        return str(self.replica.folder / "test.sock")

    async def poll(self) -> None:
        row = await self.catalog.test_failover(self.replica.name)
        if row is None:
            if self.view is not None:
                await self.stop()
            return
        point, status, _ = row
        if status == "requested" and self.view is None:
            try:
                uris = await self.start(point)
            except (ReplicationError, OSError) as error:
                await self.catalog.set_test_failover(self.replica.name, point, "failed", str(error))
                return
            await self.catalog.set_test_failover(self.replica.name, point, "ready", " ".join(uris))
        elif status == "stopping":
            await self.stop()
            await self.catalog.clear_test_failover(self.replica.name)

    async def start(self, point: int) -> list[str]:
        """Build the view at ``point`` and serve it; return one NBD URI per disk."""
        materializer = self.replica.materializer
        view = PointView(
            self.replica.images,
            materializer.undo,
            point,
            materializer.cursor.cycle,
            self.replica.folder / "test-scratch",
        )
        materializer.views.append(view)
        self.view = view
        server = NbdServer(
            {disk: ViewDisk(view, disk) for disk in self.replica.images}, unix_path=self.socket_path
        )
        await server.start()
        self.server = server
        log.info("VM %s - Test is served at point %d", self.replica.name, point)
        return [server.uri(disk) for disk in self.replica.images]

    async def stop(self) -> None:
        """Stop serving and discard the view and its scratch layer. Harmless when stopped."""
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
        if self.view is not None:
            view, self.view = self.view, None
            self.replica.materializer.views.remove(view)
            view.close()
            shutil.rmtree(view.scratch_folder, ignore_errors=True)
