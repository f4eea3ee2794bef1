"""A failover without a broker survives SIGKILL at each of its main steps, and ends equal.

A's agent and the only broker are SIGKILLed (the primary's site is lost), then at B:

1. the failover itself: `vmreplica failover --force` (no agent runs at B, so the command does
   the work) is SIGKILLed a little later each time — after 0.5 s (still importing), then 200 ms
   more each time — until one run got through: the kills land before, in and after its steps
   (role change with the epoch pending, undo, publish attempt); each rerun must carry on from
   what the last one left;
2. the new primary, serving and capturing with no broker: its agent is SIGKILLed right after
   the VM wrote and flushed, and restarted — the export takes writes again and the write is in
   the image and the change log;
3. the publication: the broker restarts, and B's agent (trying every 2 s) is SIGKILLed at a
   random instant of the next few seconds and restarted — epoch 2 is in the journal once.

Then A returns and is fenced, `reverse` makes it B's replica, and the images are equal.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.clients import identical, make_disk, require, run
from tests.e2e.lost_site.support import (
    SlowBeatAgents,
    kill_broker,
    start_vmreplica,
    vmreplica,
)
from tests.e2e.sites import in_step, nbd_uris, served_writable, status, until, where
from tests.fixtures import SiteFactory
from vmreplica.devtools.cluster import LocalCluster
from vmreplica.failover import journal_events
from vmreplica.schemas.events import EpochStart

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
FIRST_KILL_SECONDS = 0.5
"""Well before a command has imported what it needs, on this machine."""
KILL_STEP_SECONDS = 0.2
KILL_ATTEMPTS = 15
"""After this many kills, the failover runs to its end."""


async def test_sigkill_at_each_step_of_a_failover_without_broker_resumes_and_ends_equal(
    tmp_path: Path,
    sites: SiteFactory,
    broker: LocalCluster,
    unique: Callable[[str], str],
) -> None:
    require("qemu-io")
    seed = int(os.environ.get("VMREPLICA_NOBROKER_KILL_SEED", random.randrange(1 << 30)))
    print(f"\nseed {seed}")
    agents = SlowBeatAgents(sites, tmp_path)
    try:
        await _scenario(tmp_path, sites, broker, agents, unique("vm"), random.Random(seed))
    except BaseException:
        for site in ("site-a", "site-b"):
            print(f"--- agent {site}:\n{agents.log(site)}")
        raise
    finally:
        agents.stop_all()


async def _scenario(
    tmp_path: Path,
    sites: SiteFactory,
    broker: LocalCluster,
    agents: SlowBeatAgents,
    vm: str,
    rng: random.Random,
) -> None:
    disk = make_disk(tmp_path / "disk0.img", 16 * MiB)
    code, output = await vmreplica(
        agents,
        "site-a",
        "enable",
        vm,
        "--disk",
        f"disk0={disk}",
        "--replica-site",
        "site-b",
        "--capture",
        "nbd",
        "--frequency",
        "continuous",
        "--json",
    )
    assert code == 0, output
    at_a = json.loads(output)["nbd"]["disk0"]["unix"]
    agents.start("site-a")
    agents.start("site-b")
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: served_writable(at_a), "A to serve the exports")
        for pattern, offset in ((0xA1, "1M"), (0xA2, "12M")):
            await run("qemu-io", "-f", "raw", at_a, "-c", f"write -P {pattern} {offset} 64k")

            async def pointed() -> bool:
                return bool(await b.catalog.points(vm)) and await in_step(a, b, vm)

            await wait(pointed, "B to apply A's writes as a recovery point")
        agents.kill("site-a")
        await kill_broker(broker)
        agents.kill("site-b")
        image_b = Path((await b.catalog.vm(vm)).disks[0].path)

        # 1. The failover, killed later and later until a run completes.
        delay = FIRST_KILL_SECONDS
        for attempt in range(KILL_ATTEMPTS + 1):
            if (await b.catalog.vm(vm)).role != "replica":
                break
            command = await start_vmreplica(agents, "site-b", "failover", vm, "--force")
            try:
                output_bytes, _ = await asyncio.wait_for(
                    command.communicate(), delay if attempt < KILL_ATTEMPTS else None
                )
            except TimeoutError:
                command.send_signal(signal.SIGKILL)
                await command.wait()
                pending = await b.catalog.pending_epoch(vm) is not None
                print(f"failover killed after {delay:.2f} s: {await where(b, vm)}, {pending=}")
                delay += KILL_STEP_SECONDS
            else:
                said = " ".join(output_bytes.decode().split())
                assert command.returncode == 0, said
                assert "was not fenced: no broker reachable" in said, said
        await identical(disk, image_b)
        assert await b.catalog.pending_epoch(vm) is not None

        # 2. The new primary captures with no broker; its agent is killed after a write.
        agents.start("site-b")
        at_b = (await nbd_uris(agents, "site-b", vm))["disk0"]
        await wait(lambda: served_writable(at_b), "B to serve the exports writable")
        await run("qemu-io", "-f", "raw", at_b, "-c", "write -P 0xb7 8M 64k", "-c", "flush")
        agents.kill("site-b")
        agents.start("site-b")
        await wait(lambda: served_writable(at_b), "B to serve the exports again")
        await run("qemu-io", "-r", "-f", "raw", at_b, "-c", "read -P 0xb7 8M 64k")
        row = await status(agents, "site-b", vm)
        assert isinstance(row["pending_bytes"], int)
        assert row["pending_bytes"] >= 64 * 1024, row
        code, output = await vmreplica(agents, "site-b", "failover", "complete", vm)
        assert code == 0, output

        # 3. The broker returns; B's agent is killed while it publishes the epoch, or about.
        await asyncio.to_thread(broker.start_nodes)
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        published_before_kill = await b.catalog.pending_epoch(vm) is None
        agents.kill("site-b")
        agents.start("site-b")

        async def published() -> bool:
            return await b.catalog.pending_epoch(vm) is None

        await wait(published, "B to publish its epoch", 90)
        print(f"B's agent killed {'after' if published_before_kill else 'before'} publishing")
        epochs = [e.epoch async for _, e in journal_events(b, vm) if isinstance(e, EpochStart)]
        assert epochs.count(2) == 1, epochs

        # A returns, is fenced, and becomes B's replica.
        agents.start("site-a")

        async def demoted() -> bool:
            return (await a.catalog.vm(vm)).role == "replica"

        await wait(demoted, "A to stand down as B's replica")
        code, output = await vmreplica(agents, "site-b", "reverse", vm)
        assert code == 0, output
        await wait(lambda: in_step(b, a, vm), "A to apply the reverse cycle")
        await identical(image_b, disk)
        await run("qemu-io", "-r", "-f", "raw", at_a, "-c", "read -P 0xb7 8M 64k")
        await run("qemu-io", "-r", "-f", "raw", at_a, "-c", "read -P 0xa2 12M 64k")
