"""Change-log budget and dirty-block map, journaling device, and the change scan, without Kafka.

Each test replays what the shipper would send (the sealed segments, coalesced) onto a copy of
the image as it was when capture started, and checks it equals the primary image: that is the
replica's view at the cycle boundary.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from vmreplica.producers.capture import CapturedVm, default_budget
from vmreplica.producers.changelog import ChangeLog, RecordKind, Segment
from vmreplica.producers.dirtymap import DIRTY_BLOCK_BYTES
from vmreplica.producers.journaling_device import JournalingDevice
from vmreplica.producers.scan import INVALID_DIGEST, ChangeScanner, hashes_path, load_hashes

MiB = 1024 * 1024
DISK = 4 * MiB


def replay(segments: list[Segment], target: bytearray, disk: int = 0) -> None:
    """Apply change-log records in order, as the replica ends up after those cycles."""
    for segment in segments:
        for record in segment.records:
            if record.disk != disk:
                continue
            if record.kind is RecordKind.WRITE:
                target[record.offset : record.offset + record.length] = segment.read_data(record)
            else:
                target[record.offset : record.offset + record.length] = bytes(record.length)


def new_vm(tmp_path: Path, budget: int | None = None, redo: bool = True) -> CapturedVm:
    return CapturedVm(
        "vm",
        [("disk0", tmp_path / "disk0.img", DISK)],
        tmp_path / "log",
        budget_bytes=budget,
        redo=redo,
    )


def sealed(vm: CapturedVm) -> list[Segment]:
    return list(vm.log.sealed_segments())


def test_default_budget_is_a_tenth_of_the_disks_with_a_floor() -> None:
    assert default_budget([100 * MiB, 100 * MiB]) == 20 * MiB
    assert default_budget([MiB]) == MiB


async def test_over_budget_cycle_ships_dirty_blocks_and_replica_matches(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, budget=256 * 1024)
    replica = bytearray(DISK)
    rng = random.Random(1)
    for _ in range(400):  # far more than the budget, with many rewrites
        length = rng.choice([512, 4096, 65536, 100_000])
        offset = rng.randrange(0, DISK - length)
        await vm.write("disk0", offset, rng.randbytes(length))
        if rng.random() < 0.05:
            await vm.zero("disk0", rng.randrange(0, DISK - 8192), 8192)
    assert vm.dirty is not None
    assert vm.log.segment_bytes < 256 * 1024 + 200_000
    vm.cut()
    assert vm.dirty is None
    assert vm.last_cut_dirty_bytes > 0
    assert not (tmp_path / "log" / "dirty.map").exists()
    replay(sealed(vm), replica)
    assert bytes(replica) == vm.images[0].read(0, DISK)
    # The next cycle journals normally again.
    await vm.write("disk0", 0, b"n" * 4096)
    assert vm.dirty is None
    vm.close()


async def test_a_full_change_log_disk_degrades_to_the_dirty_block_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for the change log's records: the guest's writes still succeed, into the image,
    tracked by the dirty-block map, and the cut ships exactly what they changed."""
    vm = new_vm(tmp_path)
    replica = bytearray(DISK)
    await vm.write("disk0", 0, b"a" * 4096)  # journaled

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(ChangeLog, "write", full)
        await vm.write("disk0", 3 * DIRTY_BLOCK_BYTES, b"b" * 8192)
        await vm.write("disk0", 100, b"c" * 100)
        assert vm.dirty is not None
        await vm.flush()
    vm.cut()
    assert vm.last_cut_dirty_bytes > 0
    replay(sealed(vm), replica)
    assert bytes(replica) == vm.images[0].read(0, DISK)
    assert replica[100:200] == b"c" * 100
    vm.close()


async def test_prepare_cut_copies_ahead_and_later_writes_are_recopied(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, budget=64 * 1024)
    replica = bytearray(DISK)
    for block in range(40):
        await vm.write("disk0", block * DIRTY_BLOCK_BYTES, bytes([block + 1]) * 4096)
    assert vm.dirty is not None
    copied = await vm.prepare_cut()
    assert copied > 0
    await vm.write("disk0", 3 * DIRTY_BLOCK_BYTES, b"late" * 1024)  # after its copy
    await vm.zero("disk0", 5 * DIRTY_BLOCK_BYTES, 4096)
    vm.cut()
    replay(sealed(vm), replica)
    assert bytes(replica) == vm.images[0].read(0, DISK)
    vm.close()


async def test_dirty_map_survives_a_crash_and_redo_keeps_newer_image_content(
    tmp_path: Path,
) -> None:
    vm = new_vm(tmp_path, budget=128 * 1024)
    await vm.write("disk0", 0, b"a" * 65536)  # logged
    await vm.write("disk0", 65536, b"b" * 65536)  # logged
    await vm.write("disk0", 0, b"c" * 200_000)  # over budget: image + dirty map only
    await vm.flush()
    # A crash: no clean close (the log's and the map's descriptors just go away).
    os.close(vm.log._fd)
    vm.log._fd = -1
    assert vm.dirty is not None
    vm.dirty.close()
    for image in vm.images:
        image.close()
    reopened = new_vm(tmp_path, budget=128 * 1024)
    assert reopened.log.recovered_unclean
    assert reopened.dirty is not None
    # Redo must not put the older logged "a"/"b" back over the newer "c".
    assert reopened.images[0].read(0, 200_000) == b"c" * 200_000
    reopened.cut()
    replica = bytearray(DISK)
    replay(sealed(reopened), replica)
    assert bytes(replica) == reopened.images[0].read(0, DISK)
    reopened.close()


async def test_concurrent_flushes_share_a_round_and_cover_earlier_writes(tmp_path: Path) -> None:
    vm = new_vm(tmp_path)
    await vm.write("disk0", 0, b"x" * 4096)
    await asyncio.gather(*(vm.flush() for _ in range(20)))
    assert vm._durable_seq == vm._write_seq
    vm.close()


async def test_journaling_device_logs_writes_and_refuses_when_fenced(tmp_path: Path) -> None:
    vm = new_vm(tmp_path)
    device = JournalingDevice(vm, "disk0")
    assert device.size == DISK
    await device.write(4096, b"w" * 4096, fua=True)
    await device.write_zeroes(0, 4096, fua=False, may_trim=True)
    await device.trim(8192, 4096)
    await device.flush()
    assert await device.read(4096, 4096) == b"w" * 4096
    vm.fenced_reason = "another site is primary"
    with pytest.raises(PermissionError) as raised:
        await device.write(0, b"z" * 512, fua=False)
    assert raised.value.errno == errno.EPERM
    vm.cut()
    [segment] = sealed(vm)
    assert [r.kind for r in segment.records] == [RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM]
    vm.close()


async def test_scan_feeds_changed_blocks_and_invalidates_after_a_failed_step(
    tmp_path: Path,
) -> None:
    vm = new_vm(tmp_path, redo=False)
    folder = tmp_path / "scan"
    scanner = ChangeScanner(vm, folder)
    image_path = tmp_path / "disk0.img"

    def poke(offset: int, data: bytes) -> None:  # the hypervisor, behind the agent's back
        with image_path.open("r+b") as file:
            file.seek(offset)
            file.write(data)

    poke(0, b"A" * 100_000)
    result = await scanner.scan()  # no digests yet: everything counts
    assert result.bytes_fed == 2 * 65536  # blocks 0 and 1 hold data
    await vm.flush()
    await scanner.commit(result)
    vm.cut()
    replica = bytearray(DISK)
    replay(sealed(vm), replica)
    vm.log.drop_through(vm.log.cycle - 1)

    poke(3 * MiB + 10, b"B" * 10)
    poke(0, bytes(65536))  # block 0 zeroed
    result = await scanner.scan()
    assert result.blocks_changed == 2
    assert (result.bytes_fed, result.bytes_zeroed) == (65536, 65536)
    # The step fails before its digests are saved (no commit); the block then goes back to
    # what the saved digests say, yet the replica will receive the fed content: the next scan
    # must send it again.
    poke(3 * MiB + 10, bytes(10))
    again = await ChangeScanner(vm, folder).scan()  # a restarted agent's first scan
    assert again.blocks_changed >= 1
    await vm.flush()
    await scanner.commit(again)
    vm.cut()
    replay(sealed(vm), replica)
    assert bytes(replica) == vm.images[0].read(0, DISK)
    digests = load_hashes(hashes_path(folder, "disk0"), DISK)
    assert digests is not None
    assert INVALID_DIGEST not in digests
    vm.close()
