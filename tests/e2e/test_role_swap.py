"""The whole role swap, through the CLI and real agents: a ``--capture nbd`` VM is served over NBD
by whichever site is its primary, under the same export names, through every failover.

Every agent is a ``vmreplica agent`` process; the hypervisor is ``qemu-io`` (and, to see what a
client that stays attached sees, a raw NBD client kept connected across a failover); images are
compared with ``qemu-img compare`` at cycle boundaries.

- planned failover A → B with ``--reverse``: B serves the exports, takes writes, and they reach
  A; A's exports stay up, answer writes with EPERM and serve reads; then fail back B → A;
- unplanned failover after A's agent is SIGKILLed in a cycle whose writes outgrew the change-log
  budget: B serves the exports, A returns, is fenced (reads, no writes), reports what it wrote
  that never shipped, and ``reverse`` sends only what diverged;
- three sites: a planned failover names the replica that takes over; only that one does, and
  the other replica follows it without a seed or a resync.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.clients import cli, enable_nbd, identical, make_disk, run
from tests.e2e.sites import (
    Agents,
    disks_of,
    in_step,
    journal_since,
    nbd_uris,
    refuses_writes_serves_reads,
    roles,
    served,
    served_writable,
    status,
    until,
)
from tests.fixtures import SiteFactory
from tests.unit.test_nbd_protocol import WireClient
from vmreplica.nbd import protocol as wire
from vmreplica.schemas.events import EpochStart, FailoverPrepared, SeedChunk

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@pytest.fixture
def agents(sites: SiteFactory, tmp_path: Path) -> Iterator[Agents]:
    running = Agents(sites, tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


async def test_planned_failover_and_back_moves_the_nbd_exports_with_the_primary(
    tmp_path: Path,
    sites: SiteFactory,
    agents: Agents,
    unique: Callable[[str], str],
) -> None:
    vm = unique("vm")
    disks = {
        "disk0": make_disk(tmp_path / "disk0.img", 32 * MiB),
        "disk1": make_disk(tmp_path / "disk1.img", 16 * MiB),
    }
    enabled = await enable_nbd(
        agents.config("site-a"),
        vm,
        disks,
        "continuous",
    )
    at_a = {disk: uris["unix"] for disk, uris in enabled["nbd"].items()}
    agents.start("site-a")
    agents.start("site-b")
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: in_step(a, b, vm), "site B to replicate the VM")
        assert await served(at_a["disk0"]) == {"disk0": False, "disk1": False}
        await run("qemu-io", "-f", "raw", at_a["disk0"], "-c", "write -P 0xa1 1M 1M")
        await run("qemu-io", "-f", "raw", at_a["disk1"], "-c", "write -P 0xa2 0 64k")
        attached, _, flags = await WireClient.open_export(
            at_a["disk0"].split("socket=")[1], "disk0"
        )
        assert not flags & wire.NBD_FLAG_READ_ONLY

        # Planned failover A -> B, A becoming B's replica.
        await cli(agents.config("site-a"), "failover", "planned", vm, "--reverse")

        async def swapped() -> bool:
            return await roles({"a": a, "b": b}, vm) == {"a": "replica", "b": "primary"}

        await wait(swapped, "B to take over and A to become its replica")
        at_b = await nbd_uris(agents, "site-b", vm)
        assert set(at_b) == {"disk0", "disk1"}
        await wait(lambda: served_writable(at_b["disk0"]), "B to serve the exports")
        assert await served(at_b["disk0"]) == {"disk0": False, "disk1": False}
        replica_disks = await disks_of(b, vm)
        for name, path in disks.items():
            await identical(path, replica_disks[name])

        # A's exports stay up: the attached client reads on and is refused writes (EPERM), a
        # new one cannot open them for writing.
        assert await attached.call(wire.NBD_CMD_READ, MiB, 4096) == (0, b"\xa1" * 4096)
        assert await attached.call(wire.NBD_CMD_WRITE, 0, 4096, b"\x33" * 4096) == (
            wire.NBD_EPERM,
            b"",
        )
        await attached.close()
        assert await served(at_a["disk0"]) == {"disk0": True, "disk1": True}
        await refuses_writes_serves_reads(at_a["disk0"], 0xA1, "1M", "1M")

        # B's writes reach A.
        await run(
            "qemu-io",
            "-f",
            "raw",
            at_b["disk0"],
            "-c",
            "write -P 0xb1 4M 2M",
            "-c",
            "write -z 1M 64k",
        )
        await run("qemu-io", "-f", "raw", at_b["disk1"], "-c", "write -P 0xb2 15M 1M")
        await wait(lambda: in_step(b, a, vm), "A to apply B's writes")
        for name, path in disks.items():
            await identical(replica_disks[name], path)

        # Fail back B -> A: A serves writable exports again, B's refuse writes.
        await cli(agents.config("site-b"), "failover", "planned", vm, "--reverse")

        async def back() -> bool:
            return await roles({"a": a, "b": b}, vm) == {"a": "primary", "b": "replica"}

        await wait(back, "A to take over again")
        await wait(lambda: served_writable(at_a["disk0"]), "A to take writes again")
        assert await nbd_uris(agents, "site-a", vm) == at_a
        await run("qemu-io", "-f", "raw", at_a["disk0"], "-c", "write -P 0xc1 20M 1M")
        await refuses_writes_serves_reads(at_b["disk1"], 0xB2, "15M", "1M")
        await wait(lambda: in_step(a, b, vm), "B to apply A's writes")
        for name, path in disks.items():
            await identical(path, replica_disks[name])


async def test_unplanned_failover_after_a_sigkill_then_reverse_sends_only_what_diverged(
    tmp_path: Path,
    sites: SiteFactory,
    agents: Agents,
    unique: Callable[[str], str],
) -> None:
    """A's agent is killed in a cycle whose writes went past the change-log budget: the big
    write lives only in the dirty-block map. A still reports it when it returns."""
    vm = unique("vm")
    disk = make_disk(tmp_path / "disk0.img", 16 * MiB)  # change-log budget: 1.6 MiB
    enabled = await enable_nbd(agents.config("site-a"), vm, {"disk0": disk}, "30")
    at_a = enabled["nbd"]["disk0"]["unix"]
    agents.start("site-a")
    agents.start("site-b")
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: served_writable(at_a), "A to serve the exports")
        await run("qemu-io", "-f", "raw", at_a, "-c", "write -P 0x11 0 64k")

        async def a_point() -> bool:
            return await b.catalog.find_vm(vm) is not None and bool(await b.catalog.points(vm))

        await wait(a_point, "B to apply a cycle (30 s apart)")
        await wait(lambda: in_step(a, b, vm), "the first cycle to be applied")
        # Unshipped: 64 KiB in the change log, then 4 MiB in one request (past the budget:
        # to the image and the dirty-block map only), flushed; then the agent dies.
        await run(
            "qemu-io",
            "-f",
            "raw",
            at_a,
            "-c",
            "write -P 0x6b 12M 64k",
            "-c",
            "write -P 0x5a 1M 4M",
            "-c",
            "flush",
        )
        agents.kill("site-a")
        changelog = a.config.vm_folder(vm) / "changelog"
        assert (changelog / "dirty.map").stat().st_size > 0

        await cli(agents.config("site-b"), "failover", vm, "--force")
        await cli(agents.config("site-b"), "failover", "complete", vm)
        at_b = await nbd_uris(agents, "site-b", vm)
        await wait(lambda: served_writable(at_b["disk0"]), "B to serve the exports")
        await run("qemu-io", "-f", "raw", at_b["disk0"], "-c", "write -P 0xb7 8M 64k")

        agents.start("site-a")  # the old primary returns

        async def demoted() -> bool:
            return (await a.catalog.vm(vm)).role == "replica"

        await wait(demoted, "A to stand down as B's replica")
        await refuses_writes_serves_reads(at_a, 0x5A, "1M", "4M")

        output = await cli(agents.config("site-b"), "reverse", vm)
        match = re.search(r"(\d+) bytes diverged, (\d+) bytes sent", output)
        assert match is not None, output
        diverged, sent = int(match[1]), int(match[2])
        print(f"\nreverse after a SIGKILL: {diverged} bytes diverged, {sent} bytes sent")
        assert "full copy" not in output
        assert diverged == 4 * MiB + 64 * 1024 + 64 * 1024  # A's two writes, B's one
        assert sent <= 2 * diverged
        await wait(lambda: in_step(b, a, vm), "A to apply the reverse cycle")
        await identical((await disks_of(b, vm))["disk0"], disk)


async def test_three_sites_only_the_named_replica_takes_over_and_the_other_follows(
    tmp_path: Path,
    sites: SiteFactory,
    agents: Agents,
    unique: Callable[[str], str],
) -> None:
    """A replicates to B and C. A planned failover to B: only B takes over, C follows B at
    the cycle it holds (no seed, no resync). Then B hands over to C by name (``--to``): A,
    although caught up too, only follows."""
    vm = unique("vm")
    disk = make_disk(tmp_path / "disk0.img", 16 * MiB)
    enabled = await enable_nbd(
        agents.config("site-a"),
        vm,
        {"disk0": disk},
        "continuous",
        replica_sites=("site-b", "site-c"),
    )
    at_a = enabled["nbd"]["disk0"]["unix"]
    for name in ("site-a", "site-b", "site-c"):
        agents.start(name)
    async with sites.site("site-a") as a, sites.site("site-b") as b, sites.site("site-c") as c:
        every = {"a": a, "b": b, "c": c}
        wait = functools.partial(until, sites=every, vm=vm)
        await wait(lambda: in_step(a, b, vm), "B to replicate the VM")
        await wait(lambda: in_step(a, c, vm), "C to replicate the VM")
        await run("qemu-io", "-f", "raw", at_a, "-c", "write -P 0xa1 1M 1M")
        seeded = await c.catalog.position(vm)
        assert seeded is not None

        await cli(agents.config("site-a"), "failover", "planned", vm, "--reverse")

        async def b_primary() -> bool:
            return await roles(every, vm) == {"a": "replica", "b": "primary", "c": "replica"}

        await wait(b_primary, "B to take over")
        at_b = (await nbd_uris(agents, "site-b", vm))["disk0"]
        await wait(lambda: served_writable(at_b), "B to serve the exports")
        await run("qemu-io", "-f", "raw", at_b, "-c", "write -P 0xb1 4M 1M")
        await wait(lambda: in_step(b, a, vm), "A to apply B's cycles")
        await wait(lambda: in_step(b, c, vm), "C to apply B's cycles")
        c_row = await status(agents, "site-c", vm)
        assert (c_row["role"], c_row["partner_site"], c_row["state"]) == (
            "replica",
            "site-b",
            "replicating",
        )
        image_b = (await disks_of(b, vm))["disk0"]
        for follower in (a, c):
            await identical(image_b, (await disks_of(follower, vm))["disk0"])
        since = await journal_since(b, vm, seeded.next_offset)
        assert not any(isinstance(e, SeedChunk) for e in since)  # C followed without a seed
        [takeover] = [e for e in since if isinstance(e, EpochStart)]
        assert (takeover.primary_site, takeover.resync_sites) == ("site-b", ())
        [prepared] = [e for e in since if isinstance(e, FailoverPrepared)]
        assert prepared.target == "site-b"

        # B hands over to C, the site named second; A is as caught up as C but only follows.
        await cli(agents.config("site-b"), "failover", "planned", vm, "--reverse", "--to", "site-c")

        async def c_primary() -> bool:
            return await roles(every, vm) == {"a": "replica", "b": "replica", "c": "primary"}

        await wait(c_primary, "C to take over")
        at_c = (await nbd_uris(agents, "site-c", vm))["disk0"]
        await wait(lambda: served_writable(at_c), "C to serve the exports")
        await run("qemu-io", "-f", "raw", at_c, "-c", "write -P 0xc1 8M 1M")
        await wait(lambda: in_step(c, a, vm), "A to apply C's cycles")
        await wait(lambda: in_step(c, b, vm), "B to apply C's cycles")
        image_c = (await disks_of(c, vm))["disk0"]
        for follower in (a, b):
            await identical(image_c, (await disks_of(follower, vm))["disk0"])
        a_row = await status(agents, "site-a", vm)
        assert (a_row["partner_site"], a_row["state"]) == ("site-c", "replicating")
        await refuses_writes_serves_reads(at_a, 0xC1, "8M", "1M")
        await refuses_writes_serves_reads(at_b, 0xB1, "4M", "1M")
