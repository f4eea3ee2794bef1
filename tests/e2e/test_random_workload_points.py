"""Every recovery point a replica keeps holds exactly what the primary's disks held at that cut.

A seeded random workload (hypothesis draws the seed) over two disks — overlapping writes,
all-zero writes, zeroing, trims, unaligned ranges, the very last bytes of each disk (one disk's
size is not a multiple of 4 KiB) — runs through the Python capture API for at least 20 cycles.
Some cycles are only cut and ship later together with the next ones, so one ``replicate()``
publishes several transactions; a ``replicate()`` with nothing written cuts nothing (an idle VM
publishes no cycle) unless the cut is application-consistent. The primary's sha256 of each disk
is recorded at every cut. The replica keeps every cycle as a recovery point
(``continuous_points_hours=1``); once it has caught up, each retained point is exported (Python
API; the oldest also through ``vmreplica points export``) and must hash exactly like the
primary did at that cycle.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fixtures import SiteFactory, enable_vm
from vmreplica.consumers.points import export_point
from vmreplica.consumers.replica import image_path
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.producers.capture import CapturedVm
from vmreplica.storage.image import sha256_of

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISKS: Final = {"system": 4 * MiB, "data": 3 * MiB + 1536}
"""``data`` ends 1.5 KiB into a 4 KiB block: the last block of a disk is a partial one."""
MIN_CYCLES: Final = 20
VM: Final = "vm-points"

Digests = dict[str, str]


@dataclass(frozen=True)
class Op:
    """One guest I/O: ``write`` carries data made from ``seed`` (``zeros``: all-zero data)."""

    kind: str  # "write", "zeros", "zero", "trim"
    disk: str
    offset: int
    length: int
    seed: int

    def data(self) -> bytes:
        if self.kind == "zeros":
            return bytes(self.length)
        rng = random.Random(self.seed)
        # Half the writes are compressible (repeated short pattern), half are not.
        if self.seed % 2:
            return (rng.randbytes(97) * (self.length // 97 + 1))[: self.length]
        return rng.randbytes(self.length)


def _op(rng: random.Random) -> Op:
    disk = rng.choice(sorted(DISKS))
    size = DISKS[disk]
    kind = rng.choice(["write", "write", "write", "zeros", "zero", "trim"])
    if rng.random() < 0.5:
        length = rng.choice([512, 4 * KiB, 64 * KiB, 256 * KiB, MiB])
    else:
        length = rng.randint(1, 300 * KiB)
    placement = rng.choice(["aligned", "unaligned", "last"])
    if placement == "last":  # ends exactly at the end of the disk
        offset = size - length
    elif placement == "aligned":
        offset = rng.randint(0, (size - length) // (4 * KiB)) * 4 * KiB
    else:
        offset = rng.randint(0, size - length)
    return Op(kind, disk, offset, length, rng.getrandbits(32))


@dataclass(frozen=True)
class Cycle:
    ops: tuple[Op, ...]
    ship: bool
    """True: ``replicate()`` cuts and ships; False: only cut, shipped with a later cycle."""
    application_consistent: bool


def workload(seed: int) -> tuple[tuple[Op, ...], list[Cycle]]:
    """Writes made before the seed, then at least :data:`MIN_CYCLES` cycles of I/O.

    A cycle may be empty: cut directly (``CapturedVm.cut``) it is still a cycle and a recovery
    point; through ``replicate()`` it is one only if application-consistent.
    """
    rng = random.Random(seed)
    pre_seed = tuple(_op(rng) for _ in range(rng.randint(0, 8)))
    cycles = [
        Cycle(
            tuple(_op(rng) for _ in range(rng.choice([0, *range(1, 13)]))),
            rng.random() < 0.6,
            rng.random() < 0.3,
        )
        for _ in range(rng.randint(MIN_CYCLES, MIN_CYCLES + 6))
    ]
    return pre_seed, cycles


async def _run(
    tmp_path: Path, bootstrap: str, pre_seed: tuple[Op, ...], cycles: list[Cycle]
) -> tuple[int, Digests]:
    """Replicate the workload, check every point; return the first point and its digests."""
    vm, group = VM, f"tg-{uuid.uuid4().hex[:10]}"  # one trust group (topic) per example
    sites = SiteFactory(tmp_path, bootstrap, group)
    replica_config = sites.config("site-b")
    digests: dict[int, Digests] = {}
    consistent: set[int] = set()
    async with sites.site("site-a") as site_a, sites.site("site-b") as site_b:
        enabled = await enable_vm(
            site_a,
            tmp_path,
            vm,
            DISKS,
            VmSettings(frequency_seconds=30, continuous_points_hours=1),
            create_images=False,
        )
        disks, record = enabled.disks, enabled.record
        async with site_a.primary(record) as primary:
            capture = primary.capture
            for op in pre_seed:  # content the seed must carry
                await _do(capture, op)
            seed = await primary.initial_replication()
            for cycle in cycles:
                for op in cycle.ops:
                    await _do(capture, op)
                if cycle.ship:
                    shipped = await primary.replicate(cycle.application_consistent)
                    if not shipped:  # nothing written since the last cut: no cycle
                        assert not cycle.ops
                        assert not cycle.application_consistent
                        continue
                    cut = shipped[-1].cycle
                else:
                    cut = capture.cut(cycle.application_consistent)
                digests[cut] = {name: sha256_of(path) for name, path in disks.items()}
                if cycle.application_consistent:
                    consistent.add(cut)
            shipped = await primary.replicate()  # ships the unshipped cuts and what is open
            if shipped:
                digests[shipped[-1].cycle] = {name: sha256_of(path) for name, path in disks.items()}
        first, last = seed.first_cycle, max(digests)
        assert sorted(digests) == list(range(first, last + 1))

        adopted = await site_b.discover()
        assert [r.name for r in adopted] == [vm]
        async with await site_b.replica(adopted[0]) as replica:
            applied = await replica.catch_up(timeout_seconds=120)
            assert replica.violation is None
            assert applied == last
            head = {name: sha256_of(image) for name, image in replica.images.items()}
        assert head == digests[last]
        assert (await site_b.catalog.vm(vm)).state is ReplicationState.REPLICATING
        points = await site_b.catalog.points(vm)
        assert [p.cycle for p in points] == list(range(first, last + 1))
        assert {p.cycle for p in points if p.consistency == "application"} == consistent

        folder = replica_config.vm_folder(vm)
        images = {name: image_path(folder, name) for name in DISKS}
        for point in points:
            out = tmp_path / "export" / str(point.cycle)
            files = export_point(images, folder / "undo", point, last, out)
            assert sorted(files) == sorted(out / f"{name}.raw" for name in DISKS)
            exported = {name: sha256_of(out / f"{name}.raw") for name in DISKS}
            assert exported == digests[point.cycle], f"recovery point of cycle {point.cycle}"
            for name in DISKS:
                (out / f"{name}.raw").unlink()

    sites.config_file("site-b")  # for `vmreplica points export`
    return first, digests[first]


def _export_with_cli(tmp_path: Path, vm: str, cycle: int, expected: Digests) -> None:
    """``vmreplica points export`` writes the same images as the Python API."""
    config_file = tmp_path / "site-b.toml"
    out = tmp_path / "cli-export"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmreplica.cli",
            "points",
            "export",
            vm,
            str(cycle),
            str(out),
            "--config",
            str(config_file),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.split() == [str(out / f"{name}.raw") for name in DISKS]
    assert {name: sha256_of(out / f"{name}.raw") for name in DISKS} == expected


async def _do(capture: CapturedVm, op: Op) -> None:
    if op.kind in ("write", "zeros"):
        await capture.write(op.disk, op.offset, op.data())
    elif op.kind == "zero":
        await capture.zero(op.disk, op.offset, op.length)
    else:
        await capture.trim(op.disk, op.offset, op.length)


@settings(
    max_examples=5,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: too slow here
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**64 - 1))
def test_every_recovery_point_equals_the_primary_at_its_cut(
    tmp_path_factory: pytest.TempPathFactory, bootstrap_servers: str, seed: int
) -> None:
    """Exported recovery points hash exactly like the primary's disks at the same cut."""
    pre_seed, cycles = workload(seed)
    tmp_path = tmp_path_factory.mktemp("points")
    first, expected = asyncio.run(_run(tmp_path, bootstrap_servers, pre_seed, cycles))
    _export_with_cli(tmp_path, VM, first, expected)
