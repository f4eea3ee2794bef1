"""Initial replication on external media: ``vmreplica initial export`` at the primary and
``vmreplica initial import`` at the replica (Hyper-V's ``Import-VMInitialReplication``).

A VM enabled with ``--initial export`` publishes its epoch and settings but no SeedChunk
(:mod:`vmreplica.producers.seed`); its cycles ship as usual from then on. Its replica site
adopts it and waits, applying nothing (:func:`awaits_import`), until the folder is imported.

**Export**, at the primary (the agent may run and the VM keep writing):

1. the VM's seed position: its initial replication is made here first when neither it nor an
   agent has made it;
2. ``export.json`` names that position and the disks, once; a resumed export keeps it;
3. every allocated, non-zero chunk of every disk is written as its own file, the progress saved
   every :data:`PROGRESS_CHUNKS` chunks (a resumed export starts after the last saved chunk);
4. ``manifest.json`` is written, ``export.json`` removed: the folder is complete.

**Import**, at the replica (its agent may run: it leaves the VM alone until the import ends):

1. the manifest is checked against the VM as this site adopted it: the same VM, primary, disk
   names and sizes, or a refusal that names what differs, before any byte is written;
2. every chunk is checked (SHA-256) and written into the replica's image; every
   :data:`PROGRESS_CHUNKS` chunks the images are fsynced and then ``import.json`` records how
   many are done (a resumed import starts there);
3. the images are fsynced, then the position the seed stands for is recorded and the state
   becomes replicating, in one catalog transaction each: the agent reads the journal from
   that position on;
4. ``import.json`` is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Position, VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, InitialReplicationRefused, ReplicationError
from vmreplica.producers.seed import SEED_CHUNK_BYTES
from vmreplica.runtime.site import Site
from vmreplica.schemas.payload import PayloadPacker, PayloadUnpacker
from vmreplica.storage.image import DiskImage, nonzero_chunks
from vmreplica.storage.mailbox import Mailbox
from vmreplica.storage.safefile import replace_atomically
from vmreplica.storage.seed_media import (
    EXPORT_PROGRESS_FILE,
    MANIFEST_FILE,
    SeedManifest,
    finished,
    load_manifest,
    read_chunk,
    save_manifest,
    write_chunk,
)

PROGRESS_CHUNKS: Final = 16
"""Progress is saved every this many chunks (64 MiB): at most this much is done again after a
kill."""
IMPORT_PROGRESS_FILE: Final = "import.json"
IMPORT_LOCK_FILE: Final = ".import.lock"

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) as an export or import advances."""


@dataclass(frozen=True)
class MediaResult:
    """What an export or import did."""

    vm: str
    folder: Path
    manifest: SeedManifest
    media_bytes: int
    """Bytes written to (export) or read from (import) the folder this run."""

    def summary(self, verb: str) -> str:
        m = self.manifest
        return (
            f"VM {self.vm}: {verb} {len(m.chunks)} chunks, {m.data_bytes} bytes of data "
            f"(disks: {sum(m.disks.values())} bytes), standing for cycle {m.cycle} of epoch "
            f"{m.epoch}; {self.media_bytes} bytes {verb} this run, folder {self.folder}"
        )


def awaits_import(record: VmRecord) -> bool:
    """A replica of a VM seeded on external media whose folder is not imported yet: its
    worker must apply nothing (the journal holds no seed for it)."""
    return (
        record.role == "replica"
        and record.settings.initial == "export"
        and record.state
        in (
            ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
            ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
        )
    )


async def export_seed(
    site: Site, vm: str, folder: Path, progress: Progress | None = None
) -> MediaResult:
    """Steps 1-4 of the export (module docstring); resumes an export cut short in ``folder``.

    :raises ConfigurationError: not this site's primary VM, not enabled with
        ``--initial export``, or a folder that holds another VM's seed (exit 2).
    :raises InitialReplicationRefused: its agent has not started the initial replication yet.
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary":
        raise ConfigurationError(
            f"VM {vm!r} is a replica at site {site.config.site}; export its seed at its primary "
            f"{record.partner_site}, and import it here with `vmreplica initial import`"
        )
    if record.settings.initial != "export":
        raise ConfigurationError(
            f"VM {vm!r} is seeded {record.settings.initial!r}, not on external media: its "
            "replica would not wait for an import. Enable it with --initial export"
        )
    done = load_manifest(folder)
    if done is not None:
        _same_vm(done, vm, folder)
        return MediaResult(vm, folder, done, 0)
    position = await site.catalog.position(vm)  # step 1
    if position is None:
        async with Mailbox(site.config.catalog_path) as mailbox:
            if await mailbox.agent_running(site.config.site):
                raise InitialReplicationRefused(
                    f"VM {vm!r}: this site's agent is starting its initial replication; run "
                    "the export again once `vmreplica status` shows it replicating"
                )
        async with site.primary(record) as primary:
            await primary.initial_replication()
        position = await site.catalog.position(vm)
        assert position is not None
    manifest = load_manifest(folder, EXPORT_PROGRESS_FILE)  # step 2
    if manifest is not None:
        _same_vm(manifest, vm, folder)
    else:
        manifest = SeedManifest(
            vm,
            site.config.site,
            position.epoch,
            position.cycle,
            position.cycle_hash.hex(),
            position.next_offset,
            {d.name: d.size_bytes for d in record.disks},
            record.settings.compression,
            now_ms(),
        )
        save_manifest(folder, manifest, EXPORT_PROGRESS_FILE)
    paths = [(d.name, Path(d.path)) for d in record.disks]
    written = await asyncio.to_thread(_export_chunks, paths, folder, manifest, progress)
    complete = finished(manifest, now_ms())
    save_manifest(folder, complete)  # step 4
    (folder / EXPORT_PROGRESS_FILE).unlink(missing_ok=True)
    return MediaResult(vm, folder, complete, written)


def _export_chunks(
    disks: list[tuple[str, Path]], folder: Path, manifest: SeedManifest, progress: Progress | None
) -> int:
    """Step 3 of the export (in a thread: it reads and writes whole disks)."""
    packer = PayloadPacker(compress=manifest.compression)
    total = sum(manifest.disks.values())
    written = 0
    base = 0
    for name, path in disks:
        with DiskImage.open(path, writable=False) as image:
            pending = 0
            for offset, data in nonzero_chunks(image, manifest.reached(name), SEED_CHUNK_BYTES):
                chunk, size = write_chunk(folder, name, offset, data, packer)
                manifest.chunks.append(chunk)
                written += size
                pending += 1
                if pending == PROGRESS_CHUNKS:
                    save_manifest(folder, manifest, EXPORT_PROGRESS_FILE)
                    pending = 0
                if progress is not None:
                    progress(base + offset + len(data), total)
            save_manifest(folder, manifest, EXPORT_PROGRESS_FILE)
        base += manifest.disks[name]
        if progress is not None:
            progress(base, total)
    return written


def _same_vm(manifest: SeedManifest, vm: str, folder: Path) -> None:
    if manifest.vm != vm:
        raise ConfigurationError(
            f"{folder} holds the seed of VM {manifest.vm!r}, not of {vm!r}: give another "
            "folder (or the right VM)"
        )


@contextlib.contextmanager
def _importing(folder: Path) -> Iterator[None]:
    """Held by the one process that imports a VM's seed."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / IMPORT_LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InitialReplicationRefused(
                f"another `vmreplica initial import` of VM {folder.name!r} is running"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def check_fits(manifest: SeedManifest, record: VmRecord, folder: Path) -> None:
    """Step 1 of the import.

    :raises ConfigurationError: another VM's seed, another primary's, other disks or sizes.
    """
    _same_vm(manifest, record.name, folder)
    if manifest.primary_site != record.partner_site:
        raise ConfigurationError(
            f"{folder} was exported at site {manifest.primary_site!r}, but this site "
            f"replicates VM {record.name!r} from {record.partner_site!r}: export it again there"
        )
    ours = {d.name: d.size_bytes for d in record.disks}
    if manifest.disks != ours:
        differences = [
            f"{name}: {manifest.disks.get(name, 'missing')} in the folder, "
            f"{ours.get(name, 'missing')} here"
            for name in sorted(set(ours) | set(manifest.disks))
            if manifest.disks.get(name) != ours.get(name)
        ]
        raise ConfigurationError(
            f"{folder} does not fit VM {record.name!r} as this site replicates it (disk sizes "
            f"in bytes — {'; '.join(differences)}). Export the seed again from the VM's "
            "current disks"
        )


async def import_seed(
    site: Site, vm: str, folder: Path, progress: Progress | None = None
) -> MediaResult:
    """Steps 1-4 of the import (module docstring); resumes one cut short.

    :raises ConfigurationError: an unknown VM, a folder that does not fit it (exit 2).
    :raises InitialReplicationRefused: the VM is not waiting for an import (exit 1).
    """
    manifest = load_manifest(folder)
    if manifest is None:
        partial = (folder / EXPORT_PROGRESS_FILE).exists()
        raise ConfigurationError(
            f"{folder} holds no {MANIFEST_FILE}: "
            + (
                "its export has not finished; run `vmreplica initial export` at the primary "
                "again, to its end"
                if partial
                else "give the folder that `vmreplica initial export` wrote"
            )
        )
    record = await site.catalog.find_vm(vm)
    if record is None:
        await site.discover()  # the agent may not have looked yet
        record = await site.catalog.find_vm(vm)
    if record is None:
        raise ConfigurationError(
            f"VM {vm!r} is not known at site {site.config.site}, and its trust group's topics "
            "name no such VM this site accepts: check the name, the trust group and the "
            "authorization entries"
        )
    if record.role != "replica":
        raise ConfigurationError(f"VM {vm!r} is primary at this site; import at its replica")
    check_fits(manifest, record, folder)  # step 1
    if not awaits_import(record):
        raise InitialReplicationRefused(
            f"VM {vm!r} is {record.state.value!r} here"
            + (
                f" and is seeded {record.settings.initial!r}, not from external media"
                if record.settings.initial != "export"
                else ": its seed was imported already"
            )
        )
    vm_folder = site.config.vm_folder(vm)
    with _importing(vm_folder):
        done = _imported_chunks(vm_folder, manifest)
        await site.catalog.set_state(
            vm,
            ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
            f"importing the seed from {folder}",
        )
        read = await asyncio.to_thread(
            _import_chunks, record, vm_folder, folder, manifest, done, progress
        )  # step 2
        await site.catalog.set_epoch(vm, manifest.epoch)  # step 3
        await site.catalog.advance_position(
            vm,
            Position(
                manifest.epoch,
                manifest.cycle,
                bytes.fromhex(manifest.cycle_hash),
                manifest.next_offset,
                now_ms(),
            ),
        )
        await site.catalog.set_state(
            vm,
            ReplicationState.REPLICATING,
            f"seed imported from {folder}; the journal follows from cycle {manifest.cycle + 1}",
        )
        (vm_folder / IMPORT_PROGRESS_FILE).unlink(missing_ok=True)  # step 4
    return MediaResult(vm, folder, manifest, read)


def _imported_chunks(vm_folder: Path, manifest: SeedManifest) -> int:
    """How many chunks of ``manifest`` an earlier run imported (0 for another seed)."""
    try:
        saved = json.loads((vm_folder / IMPORT_PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return 0
    if saved.get("started_ms") != manifest.started_ms or saved.get("vm") != manifest.vm:
        return 0
    return min(int(saved.get("chunks", 0)), len(manifest.chunks))


def _save_imported(vm_folder: Path, manifest: SeedManifest, chunks: int) -> None:
    text = json.dumps({"vm": manifest.vm, "started_ms": manifest.started_ms, "chunks": chunks})

    def write(path: Path) -> None:
        path.write_text(text)

    replace_atomically(vm_folder / IMPORT_PROGRESS_FILE, write)


def _import_chunks(
    record: VmRecord,
    vm_folder: Path,
    folder: Path,
    manifest: SeedManifest,
    done: int,
    progress: Progress | None,
) -> int:
    """Step 2 of the import (in a thread: it reads and writes whole disks)."""
    images: dict[str, DiskImage] = {}
    try:
        for disk in record.disks:
            path = Path(disk.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            images[disk.name] = (
                DiskImage.open(path) if path.exists() else DiskImage.create(path, disk.size_bytes)
            )
        unpacker = PayloadUnpacker()
        total = manifest.data_bytes
        finished_bytes = sum(chunk.length for chunk in manifest.chunks[:done])
        read = 0
        for index in range(done, len(manifest.chunks)):
            chunk = manifest.chunks[index]
            try:
                data = read_chunk(folder, chunk, unpacker)
            except ReplicationError as error:
                raise ConfigurationError(f"VM {record.name!r}: {error}") from error
            images[chunk.disk].write(chunk.offset, data)
            read += len(data)
            finished_bytes += chunk.length
            if (index + 1) % PROGRESS_CHUNKS == 0:  # the images first, then the progress
                for image in images.values():
                    image.fsync()
                _save_imported(vm_folder, manifest, index + 1)
            if progress is not None:
                progress(finished_bytes, total)
        for image in images.values():
            image.fsync()
        return read
    finally:
        for image in images.values():
            image.close()
