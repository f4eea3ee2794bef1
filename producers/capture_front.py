"""What stands in front of a primary VM's disks while the agent runs it, by capture mode.

- ``nbd``: the VM's disks are served over NBD (:class:`~vmreplica.producers.nbd_exports.VmExports`)
  through journaling devices; the hypervisor writes through them.
- ``scan``: nothing is in the write path; each cycle runs the pre-cut hook, scans the images for
  changed blocks (:class:`~vmreplica.producers.scan.ChangeScanner`), runs the post-cut hook, and
  only then cuts.
- ``api``: a program writes through ``PrimaryVm.capture``; nothing to start.

:meth:`CaptureFront.cycle` is what the agent's scheduler calls each period instead of
``PrimaryVm.replicate``: it moves the slow parts of a cut (copying dirty blocks of an over-budget
cycle, fsyncing) off the event loop first, ships, and logs what was shipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Protocol

from vmreplica.config import SiteConfig
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import FencedError, HookError
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.nbd_exports import VmExports, socket_path
from vmreplica.producers.primary import PrimaryVm
from vmreplica.producers.scan import ChangeScanner, ScanResult
from vmreplica.producers.shipper import ShippedCycle
from vmreplica.storage.hooks import run_hook

log = logging.getLogger(__name__)


class Quiescer(Protocol):
    """What quiesces the guest around an application-consistent cut: its hypervisor adapter
    (:class:`vmreplica.hypervisor.Hypervisor`)."""

    async def freeze(self) -> None: ...

    async def thaw(self) -> None: ...


class CaptureFront:
    """``async with CaptureFront(primary, config) as front``: serve or scan while it runs."""

    def __init__(
        self,
        primary: PrimaryVm,
        config: SiteConfig,
        tcp_server: NbdServer | None = None,
        exports: VmExports | None = None,
    ) -> None:
        """``exports``: the VM's exports, kept by the caller across role changes (the agent);
        without them an ``nbd`` front serves its own while it runs."""
        self.primary = primary
        self.config = config
        self.mode = primary.record.settings.capture
        self.exports = exports
        self.scanner: ChangeScanner | None = None
        self._tcp_server = tcp_server
        self._own_exports = False
        self._refusing = False
        self.freeze_error: str | None = None
        """Why the last application-consistent cycle asked of :meth:`cycle` is crash-consistent
        (its freeze or thaw failed), or None."""

    async def __aenter__(self) -> CaptureFront:
        primary = self.primary
        folder = self.config.vm_folder(primary.name)
        if self.mode == "nbd":
            exports = self.exports
            if exports is None:
                exports = VmExports(
                    primary.name, socket_path(self.config, primary.name), self._tcp_server
                )
                await exports.start()
                self.exports, self._own_exports = exports, True
            exports.capture_through(primary.capture)
            log.info(
                "VM %s: serving NBD for the hypervisor: %s",
                primary.name,
                ", ".join(exports.uri(disk) for disk in primary.capture.disk_names),
            )
            self.check_fenced()
        elif self.mode == "scan":
            self.scanner = ChangeScanner(primary.capture, Path(folder) / "scan")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """The capture is about to close: the exports serve the images read-only from now on
        (or stop, if this front started them)."""
        exports, self.exports = self.exports, None
        if exports is None or self.mode != "nbd":
            return
        if self._own_exports:
            await exports.stop()
            return
        primary = self.primary
        reason = primary.capture.fenced_reason or (
            f"site {self.config.site} stopped capturing the writes of VM {primary.name!r} "
            "(a failover, or its agent's worker for the VM stopped); writes are refused until "
            "a site captures them again"
        )
        exports.serve_images({d.name: Path(d.path) for d in primary.record.disks}, reason)
        log.warning("VM %s: NBD exports now refuse writes: %s", primary.name, reason)

    def check_fenced(self) -> None:
        """Once the capture is fenced, the exports refuse writes (EPERM) to every client."""
        reason = self.primary.capture.fenced_reason
        if reason is not None and not self._refusing and self.exports is not None:
            self.exports.refuse_writes(reason)
            self._refusing = True
            log.warning("VM %s: NBD exports now refuse writes: %s", self.primary.name, reason)

    async def initial_replication(self) -> None:
        """Seed the replica; a scanned VM records the digests of what the seed read."""
        primary = self.primary
        if self.scanner is None:
            await primary.initial_replication()
            return
        resumed = {}
        if primary.record.state is ReplicationState.INITIAL_REPLICATION_IN_PROGRESS:
            resumed = await primary.catalog.seed_progress(primary.name)
        async with self.scanner.recording_seed(resumed):
            await primary.initial_replication()

    async def cycle(self, quiesce: Quiescer | None = None) -> list[ShippedCycle]:
        """Cut and ship one cycle the way this capture mode needs. Empty if a cut hook failed
        (or nothing waited to ship).

        With ``quiesce`` the cycle is application-consistent: the guest's file systems are
        frozen, the cycle is cut (scanned first, with ``--capture scan``), the guest is thawed
        and the cycle ships marked so. A freeze that fails or times out leaves
        :attr:`freeze_error` saying why, and the cycle is cut all the same, crash-consistent.
        """
        primary = self.primary
        capture = primary.capture
        self.check_fenced()
        self.freeze_error = None
        frozen = False
        if quiesce is not None:
            try:
                await quiesce.freeze()
                frozen = True
            except HookError as error:
                self.freeze_error = str(error)
                log.error("%s; this cycle is cut crash-consistent", error)
        thawed = quiesce is None

        async def thaw() -> None:
            nonlocal thawed
            if thawed or quiesce is None:
                return
            thawed = True
            try:  # after a failed freeze too: one that timed out may have frozen the guest
                await quiesce.thaw()
            except HookError as error:
                if frozen:
                    self.freeze_error = str(error)
                    log.error("%s; the guest may still be frozen", error)

        try:
            if self.scanner is not None:
                if not await self._scan():
                    return []
            else:
                await capture.prepare_cut()
                await capture.flush()
            shipped = await primary.replicate(frozen, after_cut=thaw)
        except FencedError:
            self.check_fenced()
            raise
        finally:
            await thaw()
        for cycle in shipped:
            dirty = capture.last_cut_dirty_bytes
            log.info(
                "VM %s: cycle %d shipped%s: %d extents, %d bytes written, %d bytes on the wire%s",
                primary.name,
                cycle.cycle,
                " (application-consistent)" if frozen else "",
                cycle.extents,
                cycle.bytes_written,
                cycle.wire_bytes,
                f" ({dirty} bytes from the dirty-block map)" if dirty else "",
            )
        return shipped

    async def _scan(self) -> bool:
        """Hooks around the scan; the scanned state is durable and saved before the cut."""
        scanner = self.scanner
        assert scanner is not None
        primary = self.primary
        settings = primary.record.settings
        disks = {d.name: d.path for d in primary.record.disks}
        result: ScanResult | None = None
        try:
            if settings.pre_cut_hook:
                await run_hook(
                    settings.pre_cut_hook,
                    "pre-cut",
                    vm=primary.name,
                    site=self.config.site,
                    disks=disks,
                )
            result = await scanner.scan()
        except HookError as error:
            log.error("%s; this cycle is skipped", error)
        finally:
            if settings.post_cut_hook:
                try:
                    await run_hook(
                        settings.post_cut_hook,
                        "post-cut",
                        vm=primary.name,
                        site=self.config.site,
                        disks=disks,
                    )
                except HookError as error:
                    log.error("%s", error)
        if result is None:
            return False
        await primary.capture.flush()
        await scanner.commit(result)
        return True
