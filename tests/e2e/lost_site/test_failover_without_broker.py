"""The primary's site is lost with the only Kafka broker: the replica fails over all the same.

A VM captured over NBD replicates continuously from A to B (both `vmreplica agent` processes,
on a broker this test starts for itself). Then A's agent and the broker are SIGKILLed together.
On B, with no broker at all:

- `status` says Kafka is unreachable (the health's reason), not a bare error;
- `points export` and a test failover give the latest point, equal to A's last replicated image;
- `failover` without ``--force`` is refused while A's last heartbeat is recent; with ``--force``
  the VM comes up at B at the latest point, equal to A's last replicated image, and the output
  says the old primary was not fenced and by which epoch it will be;
- B serves the VM's exports writable and captures its writes in the change log.

The broker is then restarted on its own data and ports: B's agent publishes the epoch, A's
agent, restarted, sees it and is fenced (its exports read-only), and `reverse` at B makes A its
replica with digests equal.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.clients import identical, make_disk, require, run
from tests.e2e.lost_site.support import (
    SlowBeatAgents,
    kill_broker,
    vmreplica,
)
from tests.e2e.sites import (
    Agents,
    in_step,
    nbd_uris,
    refuses_writes_serves_reads,
    served,
    served_writable,
    status,
    until,
)
from tests.fixtures import SiteFactory
from vmreplica.devtools.cluster import LocalCluster
from vmreplica.failover import journal_events
from vmreplica.schemas.events import EpochStart

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


async def test_failover_with_the_only_broker_dead_then_fence_and_reverse_once_it_returns(
    tmp_path: Path,
    sites: SiteFactory,
    broker: LocalCluster,
    unique: Callable[[str], str],
) -> None:
    require("qemu-io")
    agents = SlowBeatAgents(sites, tmp_path)
    try:
        await _scenario(tmp_path, sites, broker, agents, unique("vm"))
    except BaseException:
        for site in ("site-a", "site-b"):
            print(f"--- agent {site}:\n{agents.log(site)}")
        raise
    finally:
        agents.stop_all()


async def _scenario(
    tmp_path: Path, sites: SiteFactory, broker: LocalCluster, agents: Agents, vm: str
) -> None:
    disks = {
        "disk0": make_disk(tmp_path / "disk0.img", 16 * MiB),
        "disk1": make_disk(tmp_path / "disk1.img", 8 * MiB),
    }
    code, output = await vmreplica(
        agents,
        "site-a",
        "enable",
        vm,
        "--disk",
        f"disk0={disks['disk0']}",
        "--disk",
        f"disk1={disks['disk1']}",
        "--replica-site",
        "site-b",
        "--capture",
        "nbd",
        "--frequency",
        "continuous",
        "--json",
    )
    assert code == 0, output
    at_a = {d: uris["unix"] for d, uris in json.loads(output)["nbd"].items()}
    agents.start("site-a")
    agents.start("site-b")
    async with sites.site("site-a") as a, sites.site("site-b") as b:
        wait = functools.partial(until, sites={"a": a, "b": b}, vm=vm)
        await wait(lambda: served_writable(at_a["disk0"]), "A to serve the exports")
        await run("qemu-io", "-f", "raw", at_a["disk0"], "-c", "write -P 0xa1 1M 2M")
        await run("qemu-io", "-f", "raw", at_a["disk1"], "-c", "write -P 0xa2 0 64k")
        await wait(lambda: in_step(a, b, vm), "B to apply A's writes")

        # The primary's site is lost: its agent and the only broker, at once.
        agents.kill("site-a")
        await kill_broker(broker)
        replica_disks = {d.name: Path(d.path) for d in (await b.catalog.vm(vm)).disks}
        for name, path in disks.items():
            await identical(path, replica_disks[name])  # A's last replicated image

        # The primary heartbeated a moment ago: refused without --force, saying so.
        code, output = await vmreplica(agents, "site-b", "failover", vm)
        assert code == 1, output
        assert "heartbeated" in output, output
        assert "--force" in output, output

        # `status` says why nothing moves: Kafka is unreachable, not "error".
        async def says_unreachable() -> bool:
            row = await status(agents, "site-b", vm)
            return any("Kafka unreachable" in r for r in row["health_reasons"])  # type: ignore[attr-defined]

        await wait(says_unreachable, "B's status to say Kafka is unreachable", 60)
        row = await status(agents, "site-b", vm)
        assert row["state"] == "replicating", row
        assert row["health"] in ("warning", "critical"), row

        # So does exporting the latest point, and a test failover, at A's last replicated image.
        code, output = await vmreplica(
            agents, "site-b", "points", "export", vm, "latest", str(tmp_path / "export")
        )
        assert code == 0, output
        for name, path in disks.items():
            await identical(path, tmp_path / "export" / f"{name}.raw")

        code, output = await vmreplica(agents, "site-b", "failover", "test", vm, "--json")
        assert code == 0, output
        drill = json.loads(output)
        for uri in drill["uris"]:
            disk = uri.split("///")[1].split("?")[0]
            image = tmp_path / f"test-{disk}.img"
            await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(image))
            await identical(disks[disk], image)
        code, output = await vmreplica(agents, "site-b", "failover", "stop-test", vm)
        assert code == 0, output

        # Unplanned failover with --force: up at B at the latest point, not fenced, and says so.
        code, output = await vmreplica(agents, "site-b", "failover", vm, "--force")
        assert code == 0, output
        said = " ".join(output.split())
        assert "the old primary (site-a) was not fenced: no broker reachable" in said, said
        assert "it will be fenced when it next reaches the cluster, by epoch 2" in said, said
        for name, path in disks.items():
            await identical(path, replica_disks[name])
        at_b = await nbd_uris(agents, "site-b", vm)
        await wait(lambda: served_writable(at_b["disk0"]), "B to serve the exports writable")
        await run("qemu-io", "-f", "raw", at_b["disk0"], "-c", "write -P 0xb7 8M 64k")
        row = await status(agents, "site-b", vm)
        assert (row["role"], row["state"]) == ("primary", "failed over waiting completion"), row
        assert isinstance(row["pending_bytes"], int)
        assert row["pending_bytes"] >= 64 * 1024, row  # captured in the change log
        assert await b.catalog.pending_epoch(vm) is not None
        code, output = await vmreplica(agents, "site-b", "failover", "complete", vm)
        assert code == 0, output

        # The broker returns (same data, same ports): B publishes epoch 2 by itself.
        await asyncio.to_thread(broker.start_nodes)

        async def published() -> bool:
            return await b.catalog.pending_epoch(vm) is None

        await wait(published, "B to publish its epoch", 90)
        epochs = [e async for _, e in journal_events(b, vm) if isinstance(e, EpochStart)]
        assert [(e.epoch, e.primary_site) for e in epochs][-1] == (2, "site-b")

        # The old primary returns, sees epoch 2 and is fenced: read-only exports, a replica.
        agents.start("site-a")

        async def demoted() -> bool:
            return (await a.catalog.vm(vm)).role == "replica"

        await wait(demoted, "A to stand down as B's replica")
        await refuses_writes_serves_reads(at_a["disk0"], 0xA1, "1M", "2M")

        code, output = await vmreplica(agents, "site-b", "reverse", vm)
        assert code == 0, output
        assert "bytes diverged" in output, output
        await wait(lambda: in_step(b, a, vm), "A to apply the reverse cycle")
        for name, path in disks.items():
            await identical(replica_disks[name], path)
        await run("qemu-io", "-r", "-f", "raw", at_a["disk0"], "-c", "read -P 0xb7 8M 64k")
        assert await served(at_b["disk0"]) == {"disk0": False, "disk1": False}
