"""How fast failover is: test failover on a big sparse disk, planned and unplanned failover.

Run: ``.venv/bin/python benchmarks/failover.py`` (starts its own broker unless
``VMREPLICA_BOOTSTRAP_SERVERS`` is set). Prints:

- test failover: seconds from request to a served ``<vm> - Test`` disk (NBD, answered by
  ``nbdinfo``) on a 100 GiB sparse disk with 24 recovery points, beside the same on a 1 GiB disk
  (the ratio shows the cost does not grow with disk size), and whether the view's content equals
  the primary's at that point over every range any cycle wrote (the rest is untouched sparse
  space on both);
- planned failover: seconds from the VM's stop to the new primary's epoch on a 10 GiB disk;
- unplanned failover: seconds to the latest point;

and, for both failovers, whether the new primary's disk equals the old primary's over every range
written. It exits 1 when any of these content checks fails.

Targets: test failover under 2 s (issue 5); planned under 1 s (issue 10); unplanned under 2 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from vmreplica import failover
from vmreplica.config import SiteConfig
from vmreplica.consumers.drill import FailoverDrill
from vmreplica.devtools.cluster import LocalCluster
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.site import Site

GiB: Final = 1024**3
MiB: Final = 1024**2
POINTS: Final = 24


async def _pair(work: Path, bootstrap: str, name: str) -> tuple[Site, Site]:
    group = f"{name}-{work.name[-8:]}"  # topics of its own on a shared broker
    a = Site(
        SiteConfig(
            site="site-a", root=work / name / "a", bootstrap_servers=bootstrap, trust_group=group
        )
    )
    b = Site(
        SiteConfig(
            site="site-b", root=work / name / "b", bootstrap_servers=bootstrap, trust_group=group
        )
    )
    await a.start()
    await b.start()
    return a, b


async def test_failover_seconds(
    work: Path,
    bootstrap: str,
    size: int,
    name: str,
) -> tuple[float, bool]:
    """Seconds to serve a test failover at the oldest of 24 points; content check."""
    a, b = await _pair(work, bootstrap, name)
    disk = work / f"{name}.img"
    with disk.open("wb") as file:
        file.truncate(size)
    record = await a.enable(
        "vm", {"disk0": disk}, "site-b", VmSettings(frequency_seconds=30, continuous_points_hours=1)
    )
    offsets = [(i * 7919 * MiB) % (size - MiB) for i in range(POINTS + 1)]
    at_point: dict[int, bytes] = {}
    point = 0
    async with a.primary(record) as primary:
        await primary.initial_replication()
        for i, offset in enumerate(offsets):
            await primary.capture.write("disk0", offset, os.urandom(MiB))
            shipped = await primary.replicate()
            if i == 0:  # the oldest point: remember what every range to be written holds now
                at_point = {o: primary.capture.images[0].read(o, MiB) for o in offsets}
                point = shipped[-1].cycle
    await b.discover()
    async with await b.replica(await b.catalog.vm("vm")) as replica:
        await replica.catch_up(120)
        service = FailoverDrill(b.catalog, replica)
        started = time.monotonic()
        uris = await service.start(point)
        probe = await asyncio.create_subprocess_exec(
            "nbdinfo", "--size", uris[0], stdout=asyncio.subprocess.PIPE
        )
        out, _ = await probe.communicate()
        seconds = time.monotonic() - started
        assert int(out) == size
        view = service.view
        assert view is not None
        same = all(view.read("disk0", o, MiB) == at_point[o] for o in offsets)
        await service.stop()
    await a.stop()
    await b.stop()
    return seconds, same


def same_ranges(one: Path, other: Path, ranges: list[tuple[int, int]]) -> bool:
    """Whether two images hold the same bytes in every ``(offset, length)`` range."""
    with one.open("rb") as first, other.open("rb") as second:
        return all(
            os.pread(first.fileno(), length, offset) == os.pread(second.fileno(), length, offset)
            for offset, length in ranges
        )


async def replica_image(site: Site) -> Path:
    return Path((await site.catalog.vm("vm")).disks[0].path)


async def failover_seconds(work: Path, bootstrap: str) -> tuple[float, bool, float, bool]:
    """Planned seconds after the VM stops and unplanned seconds to the latest point, 10 GiB,
    each with whether the new primary's disk equals the old one's over every range written."""
    written = [(i * 512 * MiB, 4 * MiB) for i in range(8)] + [(0, 16 * MiB)]
    a, b = await _pair(work, bootstrap, "planned")
    disk = work / "planned.img"
    with disk.open("wb") as file:
        file.truncate(10 * GiB)
    record = await a.enable("vm", {"disk0": disk}, "site-b", VmSettings(frequency_seconds=30))
    async with a.primary(record) as primary:
        await primary.initial_replication()
        for i in range(8):
            await primary.capture.write("disk0", i * 512 * MiB, os.urandom(4 * MiB))
        await primary.replicate()
        await primary.capture.write("disk0", 0, os.urandom(16 * MiB))  # the last cycle's data
    await b.discover()
    async with await b.replica(await b.catalog.vm("vm")) as replica:
        await replica.catch_up(120)
        started = time.monotonic()  # the VM has just stopped
        prepared = await failover.prepare_planned(a, "vm", reverse=True)
        await replica.catch_up(120)
    await failover.promote(b, "vm", prepared=prepared)
    planned = time.monotonic() - started
    planned_ok = same_ranges(disk, await replica_image(b), written)
    await a.stop()
    await b.stop()

    a, b = await _pair(work, bootstrap, "unplanned")
    disk = work / "unplanned.img"
    with disk.open("wb") as file:
        file.truncate(10 * GiB)
    record = await a.enable(
        "vm", {"disk0": disk}, "site-b", VmSettings(frequency_seconds=30, continuous_points_hours=1)
    )
    async with a.primary(record) as primary:
        await primary.initial_replication()
        for i in range(8):
            await primary.capture.write("disk0", i * 512 * MiB, os.urandom(4 * MiB))
            await primary.replicate()
    await b.discover()
    async with await b.replica(await b.catalog.vm("vm")) as replica:
        await replica.catch_up(120)
    started = time.monotonic()
    await failover.promote(b, "vm", point="latest", force=True)
    unplanned = time.monotonic() - started
    unplanned_ok = same_ranges(disk, await replica_image(b), written)
    await a.stop()
    await b.stop()
    return planned, planned_ok, unplanned, unplanned_ok


async def run(work: Path, bootstrap: str) -> bool:
    """Run every measurement and print it; True when every content check passed."""
    small, small_ok = await test_failover_seconds(work, bootstrap, GiB, "small")
    big, big_ok = await test_failover_seconds(work, bootstrap, 100 * GiB, "big")
    planned, planned_ok, unplanned, unplanned_ok = await failover_seconds(work, bootstrap)
    print(
        f"test failover, 100 GiB sparse disk, {POINTS} points: {big:.2f} s "
        f"(target < 2 s{'' if big < 2 else ', below target'}); content at point "
        f"{'equal' if big_ok else 'DIFFERENT'}"
    )
    print(
        f"test failover, 1 GiB disk, same history:          {small:.2f} s "
        f"(100 GiB / 1 GiB = {big / small:.2f}); content {'equal' if small_ok else 'DIFF'}"
    )
    print(
        f"planned failover, 10 GiB disk, after VM stop:      {planned:.2f} s "
        f"(target < 1 s{'' if planned < 1 else ', below target'}); content "
        f"{'equal' if planned_ok else 'DIFFERENT'}"
    )
    print(
        f"unplanned failover to the latest point, 10 GiB:    {unplanned:.2f} s "
        f"(target < 2 s{'' if unplanned < 2 else ', below target'}); content "
        f"{'equal' if unplanned_ok else 'DIFFERENT'}"
    )
    checks = {
        "test failover, 100 GiB": big_ok,
        "test failover, 1 GiB": small_ok,
        "planned failover": planned_ok,
        "unplanned failover": unplanned_ok,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"content check failed: {', '.join(failed)}", file=sys.stderr)
    return not failed


def main() -> int:
    if shutil.which("nbdinfo") is None:
        print("benchmarks/failover.py needs nbdinfo (apt-get install libnbd-bin)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="vmreplica-bench-failover-"))
    external = os.environ.get("VMREPLICA_BOOTSTRAP_SERVERS")
    cluster = None if external else LocalCluster(home=work / "kafka", base_port=free_base_port())
    try:
        bootstrap = external or (cluster.up(1).bootstrap_servers if cluster else "")
        ok = asyncio.run(run(work, bootstrap))
    finally:
        if cluster is not None:
            cluster.down()
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["sync"], check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
