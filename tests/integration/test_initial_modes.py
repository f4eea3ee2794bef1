"""The three ways into a replica (``enable --initial network|export|existing``), against the real
broker: a seed exported to a folder and imported at the replica, which then applies the cycles
shipped meanwhile; an import killed half-way and run again; a folder of another VM or of
another disk size refused; a replica that already holds a copy with a few differing blocks,
sent only those. Each ends equal to the primary (sha256 of whole images).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import EnabledVm, SitePair, VmFactory
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, InitialReplicationRefused
from vmreplica.failover.resync_job import load_job
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.initial import (
    IMPORT_PROGRESS_FILE,
    awaits_import,
    export_seed,
    import_seed,
)
from vmreplica.runtime.resync_worker import ResyncWorker
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.storage.image import sha256_of
from vmreplica.storage.seed_media import EXPORT_PROGRESS_FILE, MANIFEST_FILE

pytestmark = pytest.mark.integration

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISKS: Final = {"disk0": 8 * MiB, "disk1": 4 * MiB}


def digests(images: dict[str, Path]) -> dict[str, str]:
    return {name: sha256_of(path) for name, path in images.items()}


def replica_images(replica: ReplicaVm) -> dict[str, Path]:
    return {name: image.path for name, image in replica.images.items()}


async def fill(primary: PrimaryVm, rng: random.Random, sizes: dict[str, int]) -> None:
    """Text-like data (compressible) over part of every disk, as a guest's files would be."""
    words = [rng.randbytes(8).hex().encode() for _ in range(64)]
    for disk, size in sizes.items():
        for offset in range(0, size, 1 * MiB):
            data = b" ".join(rng.choice(words) for _ in range(8000))[: 256 * KiB]
            await primary.capture.write(disk, offset, data.ljust(256 * KiB, b"."))


async def ship_cycles(primary: PrimaryVm, rng: random.Random, count: int) -> int:
    for _ in range(count):
        offset = rng.randrange(0, DISKS["disk0"] - 16 * KiB, 4 * KiB)
        await primary.capture.write("disk0", offset, rng.randbytes(16 * KiB))
        await primary.replicate()
    position = await primary.catalog.position(primary.name)
    assert position is not None
    return position.cycle


async def test_a_seed_exported_to_a_folder_and_imported_ends_equal(
    site_pair: SitePair, vm: VmFactory, tmp_path: Path
) -> None:
    enabled = await vm(site_pair.a, DISKS, VmSettings(frequency_seconds=30, initial="export"))
    media = tmp_path / "media"
    rng = random.Random(3)
    async with site_pair.a.primary(enabled.record) as primary:
        await fill(primary, rng, DISKS)
        await primary.initial_replication()  # no SeedChunk: the seed travels on the media
        await ship_cycles(primary, rng, 3)
        exported = await export_seed(site_pair.a, enabled.name, media)
        last = await ship_cycles(primary, rng, 4)  # these follow over the journal
    manifest = exported.manifest
    print(
        f"export: {manifest.data_bytes} bytes of data in {len(manifest.chunks)} chunks, "
        f"{exported.media_bytes} bytes on the media (compression on), disks "
        f"{sum(DISKS.values())} bytes, standing for cycle {manifest.cycle}"
    )
    assert exported.media_bytes < manifest.data_bytes / 2  # compressed
    assert (media / MANIFEST_FILE).exists()

    [record] = await site_pair.b.discover()
    assert record.settings.initial == "export"
    assert awaits_import(record)
    imported = await import_seed(site_pair.b, enabled.name, media)
    assert imported.media_bytes == manifest.data_bytes
    record = await site_pair.b.catalog.vm(enabled.name)
    assert record.state is ReplicationState.REPLICATING
    assert not awaits_import(record)
    async with await site_pair.b.replica(record) as replica:
        assert await replica.catch_up() == last
        assert digests(replica_images(replica)) == digests(enabled.disks)

    with pytest.raises(InitialReplicationRefused, match="imported already"):
        await import_seed(site_pair.b, enabled.name, media)


async def test_an_import_refuses_a_folder_of_another_vm_or_disk_size(
    site_pair: SitePair, vm: VmFactory, tmp_path: Path
) -> None:
    settings = VmSettings(frequency_seconds=30, initial="export")
    first = await vm(site_pair.a, {"disk0": 2 * MiB}, settings)
    second = await vm(site_pair.a, {"disk0": 2 * MiB}, settings)
    for enabled in (first, second):
        async with site_pair.a.primary(enabled.record) as primary:
            await primary.capture.write("disk0", 0, b"seed".ljust(64 * KiB, b"\1"))
            await primary.initial_replication()
    media = tmp_path / "first"
    await export_seed(site_pair.a, first.name, media)
    assert len(await site_pair.b.discover()) == 2

    with pytest.raises(ConfigurationError, match=f"holds the seed of VM '{first.name}'"):
        await import_seed(site_pair.b, second.name, media)

    manifest = json.loads((media / MANIFEST_FILE).read_text())
    manifest["disks"]["disk0"] = 4 * MiB
    (media / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match=r"does not fit .*disk0: 4194304 in the folder"):
        await import_seed(site_pair.b, first.name, media)
    # Nothing was written or recorded: the VM still waits for its import.
    record = await site_pair.b.catalog.vm(first.name)
    assert record.state is ReplicationState.WAITING_FOR_INITIAL_REPLICATION
    assert await site_pair.b.catalog.position(first.name) is None

    network = await vm(site_pair.a, {"disk0": 1 * MiB}, VmSettings(frequency_seconds=30))
    with pytest.raises(ConfigurationError, match="is seeded 'network', not on external media"):
        await export_seed(site_pair.a, network.name, tmp_path / "network")


async def killed_when(command: list[str], config: Path, ready: Callable[[], bool]) -> None:
    """Run `vmreplica COMMAND` as a process and SIGKILL it once ``ready()`` holds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmreplica.cli",
        *command,
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(120):  # the process writes what ready() reads
        while not ready():
            assert process.returncode is None, f"{command} ended before it could be killed"
            await asyncio.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    await process.wait()


def saved_chunks(path: Path) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    fields = json.loads(text)
    return len(fields["chunks"]) if isinstance(fields["chunks"], list) else int(fields["chunks"])


async def test_an_export_and_an_import_killed_half_way_resume_and_end_equal(
    site_pair: SitePair, vm: VmFactory, tmp_path: Path
) -> None:
    sizes = {"disk0": 96 * MiB}
    chunks = sizes["disk0"] // (4 * MiB)
    enabled = await vm(site_pair.a, sizes, VmSettings(frequency_seconds=30, initial="export"))
    media = tmp_path / "media"
    async with site_pair.a.primary(enabled.record) as primary:
        for offset in range(0, sizes["disk0"], 4 * MiB):  # incompressible: it all takes time
            await primary.capture.write("disk0", offset, os.urandom(4 * MiB))
        await primary.initial_replication()
    exporting = media / EXPORT_PROGRESS_FILE
    await killed_when(
        ["initial", "export", enabled.name, str(media)],
        site_pair.sites.config_file("site-a"),
        lambda: saved_chunks(exporting) > 0,
    )
    exported_before = saved_chunks(exporting)
    assert 0 < exported_before < chunks
    assert not (media / MANIFEST_FILE).exists()
    async with site_pair.a.primary(await site_pair.a.catalog.vm(enabled.name)) as primary:
        exported = await export_seed(site_pair.a, enabled.name, media)
        await primary.capture.write("disk0", 5 * MiB, os.urandom(64 * KiB))
        last = (await primary.replicate())[-1].cycle
    assert len(exported.manifest.chunks) == chunks
    assert exported.media_bytes == (chunks - exported_before) * 4 * MiB

    [record] = await site_pair.b.discover()
    progress = site_pair.b.config.vm_folder(enabled.name) / IMPORT_PROGRESS_FILE
    await killed_when(
        ["initial", "import", enabled.name, str(media)],
        site_pair.sites.config_file("site-b"),
        progress.exists,
    )
    done = saved_chunks(progress)
    assert 0 < done < chunks
    assert (await site_pair.b.catalog.vm(enabled.name)).state is (
        ReplicationState.INITIAL_REPLICATION_IN_PROGRESS
    )

    resumed = await import_seed(site_pair.b, enabled.name, media)
    print(
        f"export killed after {exported_before} of {chunks} chunks, import after {done}; the "
        f"reruns wrote {exported.media_bytes} and read {resumed.media_bytes} bytes"
    )
    assert resumed.media_bytes == resumed.manifest.data_bytes - done * 4 * MiB
    record = await site_pair.b.catalog.vm(enabled.name)
    async with await site_pair.b.replica(record) as replica:
        assert await replica.catch_up() == last
        assert digests(replica_images(replica)) == digests(enabled.disks)


async def seed_by_compare(a: Site, primary: PrimaryVm, replica: ReplicaVm) -> None:
    """The primary's agent (its resync worker) and the replica's, until the seed is done."""
    worker = ResyncWorker(a, primary)
    done = asyncio.Event()

    async def apply() -> None:
        while not done.is_set():
            await replica.step(0.1)

    applier = asyncio.create_task(apply())
    try:
        async with asyncio.timeout(120):
            while load_job(a.config.vm_folder(primary.name)) is None:
                worker.next_watch = 0.0
                await worker.watch()
                await asyncio.sleep(0.2)
            worker.poll()
            assert worker.task is not None
            await worker.task
    finally:
        done.set()
        await applier
        await worker.stop()


async def test_a_replica_holding_a_copy_gets_only_the_blocks_that_differ(
    site_pair: SitePair, vm: VmFactory
) -> None:
    enabled: EnabledVm = await vm(
        site_pair.a,
        DISKS,
        VmSettings(frequency_seconds=30, initial="existing", auto_resync=False),
    )
    rng = random.Random(9)
    async with site_pair.a.primary(enabled.record) as primary:
        for disk, size in DISKS.items():
            for offset in range(0, size, 256 * KiB):
                await primary.capture.write(disk, offset, rng.randbytes(128 * KiB))
        await primary.initial_replication()  # no SeedChunk: the replica has a copy
        [record] = await site_pair.b.discover()
        assert record.settings.initial == "existing"
        # The copy restored from a backup, a little older than the primary's disks.
        for restored in record.disks:
            Path(restored.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(enabled.disks[restored.name], restored.path)
        changed = 0
        for offset in (0, 3 * MiB + 4 * KiB, 7 * MiB):
            await primary.capture.write("disk0", offset, rng.randbytes(4 * KiB))
            changed += 4 * KiB
        await primary.capture.write("disk1", 2 * MiB, rng.randbytes(4 * KiB))
        changed += 4 * KiB
        last = (await primary.replicate())[-1].cycle

        async with await site_pair.b.replica(record) as replica:
            record = await site_pair.b.catalog.vm(enabled.name)
            assert record.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
            assert "from the copy this site holds" in record.state_message
            # Automatic although auto_resync is off: a first copy is a seed, always due.
            await seed_by_compare(site_pair.a, primary, replica)
            assert await replica.catch_up() >= last
            assert digests(replica_images(replica)) == digests(enabled.disks)
            assert (await site_pair.b.catalog.vm(enabled.name)).state is (
                ReplicationState.REPLICATING
            )
    job = load_job(site_pair.a.config.vm_folder(enabled.name))
    assert job is not None
    assert job.phase == "done"
    disk_bytes = sum(DISKS.values())
    print(
        f"existing copy: {changed} bytes changed on the primary, {job.differing_bytes} bytes "
        f"in differing blocks, {job.resent_bytes} resent, {job.sent_bytes} sent on the wire, "
        f"of {disk_bytes} bytes of disks"
    )
    # Only the blocks that differ (64 KiB each) and the cycle written since the copy, not the
    # 6 MiB the primary holds.
    assert job.differing_bytes <= 4 * 64 * KiB
    assert job.sent_bytes < 0.05 * disk_bytes


async def test_a_scheduled_initial_replication_waits_for_its_time(
    site_pair: SitePair, vm: VmFactory
) -> None:
    due = now_ms() + 2_000
    enabled = await vm(
        site_pair.a, {"disk0": 1 * MiB}, VmSettings(frequency_seconds=30, initial_at_ms=due)
    )
    async with site_pair.a.primary(enabled.record) as primary:
        seeding = asyncio.create_task(primary.initial_replication())
        await asyncio.sleep(0.5)
        record = await site_pair.a.catalog.vm(enabled.name)
        assert record.state is ReplicationState.READY_FOR_INITIAL_REPLICATION
        assert "initial replication (network) scheduled at" in record.state_message
        shown = await vm_status(site_pair.a, record, with_replica=False)
        assert shown.initial is not None
        assert "scheduled at" in shown.initial.summary(enabled.name)
        assert not seeding.done()
        await seeding
        assert now_ms() >= due
        assert (await site_pair.a.catalog.vm(enabled.name)).state is ReplicationState.REPLICATING
