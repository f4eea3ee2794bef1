"""One VM at a replica site: its images, its materialiser and the journal it reads.

:class:`ReplicaVm` resumes from the catalog's position (rolling back an interrupted cycle first),
reads committed records, applies them, and reports its position on the VM's status topic. A
journal violation stops this VM only — its state says why — and the agent carries on with the
others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from vmreplica.consumers.materializer import Materializer
from vmreplica.consumers.points import apply_lock
from vmreplica.consumers.retention import RetentionPolicy
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import VmRecord
from vmreplica.domain.names import check_name
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import BrokerError, ConfigurationError, JournalViolation
from vmreplica.journal.kafka import JournalReader, KafkaConnection, StatusPublisher
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import CycleCommit, ReplicaPosition
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage

log = logging.getLogger(__name__)

FETCH_SECONDS = 0.5
"""How long one fetch waits for new records: bounds the reaction time to a stop request."""


def retention_policy(record: VmRecord) -> RetentionPolicy:
    """The VM's recovery-point policy from its replication settings."""
    settings = record.settings
    if settings.continuous_points_hours:
        return RetentionPolicy("every_cycle", settings.continuous_points_hours,
                               settings.app_consistent_hours)
    if settings.recovery_history:
        return RetentionPolicy("hourly", settings.recovery_history,
                               settings.app_consistent_hours)
    return RetentionPolicy("latest")


def image_path(folder: Path, disk: str) -> Path:
    """Where a replica keeps the image of ``disk``: ``<folder>/disks/<disk>.img``.

    :raises ConfigurationError: ``disk`` is not a valid disk name. Disk names come from the
        primary's VmConfig record; one like ``../../x`` or ``/var/lib/x`` must never become a
        path, and a name that passes :func:`check_name` has no dot or slash.
    """
    return folder / "disks" / f"{check_name('disk', disk)}.img"


def _open_images(record: VmRecord) -> dict[str, DiskImage]:
    """The VM's images, created sparse where missing (a returning old primary keeps its own).

    :raises ConfigurationError: an image cannot be created or opened (a size this file system
        does not allow, a full disk, no permission); none stays open.
    """
    images: dict[str, DiskImage] = {}
    for disk in record.disks:
        path = Path(disk.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            images[disk.name] = (DiskImage.open(path) if path.exists()
                                 else DiskImage.create(path, disk.size_bytes))
        except OSError as error:
            for image in images.values():
                image.close()
            raise ConfigurationError(
                f"VM {record.name!r}: cannot create or open replica image {path} of "
                f"{disk.size_bytes} bytes ({error.strerror}). Operator action: check the disk "
                "sizes the primary sent and the space and permissions of the site's root"
            ) from error
    return images


class ReplicaVm:
    """A replicated VM at a replica site. ``async with ReplicaVm(...) as vm: await vm.run()``."""

    def __init__(self, record: VmRecord, site: str, folder: Path, connection: KafkaConnection,
                 catalog: Catalog, journal_topic: str, status_topic: str,
                 status: StatusPublisher | None = None) -> None:
        self.record = record
        self.site = site
        self.folder = folder
        self.catalog = catalog
        self.status_topic = status_topic
        self.status = status
        self.images = _open_images(record)
        self.materializer = Materializer(record.name, self.images, folder / "undo", catalog,
                                         retention_policy(record), self._report, site)
        self.reader = JournalReader(connection, journal_topic)
        self.violation: JournalViolation | None = None
        self.apply_seconds = 0.0
        """Time spent applying fetched records so far (the agent's apply-time metric)."""

    @property
    def name(self) -> str:
        return self.record.name

    async def start(self) -> None:
        cursor = await self.materializer.recover()
        await self.reader.start(cursor.next_offset)

    async def stop(self) -> None:
        await self.reader.stop()
        for image in self.images.values():
            image.close()

    async def __aenter__(self) -> ReplicaVm:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _report(self, commit: CycleCommit, offset: int) -> None:
        if self.status is None:
            return
        position = ReplicaPosition(self.name, commit.epoch, self.site, commit.cycle, offset,
                                   ReplicationState.REPLICATING.value, "normal", now_ms(),
                                   now_ms())
        try:
            await self.status.publish(self.status_topic, self.name.encode(), encode(position))
        except BrokerError as error:
            log.warning("VM %s: could not report position: %s", self.name, error)

    async def step(self, timeout_seconds: float = FETCH_SECONDS) -> int:
        """Fetch and apply once; return how many records were read (0 when none or stopped)."""
        if self.violation is not None:
            return 0
        records = await self.reader.fetch(timeout_seconds)
        if not records:
            return 0
        started = time.monotonic()
        try:
            with apply_lock(self.folder):
                await self.materializer.apply_records(records)
        except JournalViolation as violation:
            self.violation = violation
            await self.catalog.set_state(self.name, violation.state, str(violation))
            log.error("%s", violation)
        self.apply_seconds += time.monotonic() - started
        return len(records)

    async def catch_up(self, timeout_seconds: float = 30.0) -> int:
        """Apply everything committed so far; return the applied cycle.

        :raises TimeoutError: the journal's end was not reached in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        end = await self.reader.end_offset()
        # Transaction markers take offsets but are never returned as records, so progress is
        # the reader's position, not the last applied record's offset.
        while await self.reader.position() < end and self.violation is None:
            if loop.time() > deadline:
                raise TimeoutError(f"VM {self.name!r}: replica did not reach journal offset "
                                   f"{end} within {timeout_seconds} s")
            await self.step()
        return self.materializer.cursor.cycle

    async def run(self, stopping: asyncio.Event) -> None:
        """Apply records until ``stopping`` is set or a violation stops this VM."""
        while not stopping.is_set() and self.violation is None:
            await self.step()
