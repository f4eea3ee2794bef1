"""Several sites' agents run as processes, and what the multi-site scenarios check through the
CLI, ``nbdinfo`` and ``qemu-io``: where a VM stands at each site, which exports serve it
writable, whether a replica caught up with its primary."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.e2e.clients import cli, require, run
from tests.fixtures import SiteFactory
from vmreplica.domain.states import ReplicationState
from vmreplica.failover import journal_events
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import JournalEvent


async def until(
    predicate: Callable[[], Awaitable[bool]],
    what: str,
    seconds: float = 90.0,
    sites: dict[str, Site] | None = None,
    vm: str = "",
) -> None:
    """Wait for ``predicate``; on a timeout, say where each of ``sites`` stands with ``vm``."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            where = [f"{name}: {await where(site, vm)}" for name, site in (sites or {}).items()]
            raise AssertionError(
                f"timed out after {seconds:.0f} s waiting for {what}"
                + "".join(f"\n  {line}" for line in where)
            )
        await asyncio.sleep(0.2)


async def where(site: Site, vm: str) -> str:
    record = await site.catalog.find_vm(vm)
    if record is None:
        return "does not hold the VM"
    return (
        f"{record.role}, {record.state.value} ({record.state_message}), epoch "
        f"{record.epoch}, partner {record.partner_site}, at "
        f"{await site.catalog.position(vm)}"
    )


async def attempt(*argv: str) -> tuple[int, str]:
    """Run a client that may fail; its exit status and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        require(argv[0]),
        *argv[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


class Agents:
    """``vmreplica agent`` processes, one per site, logging to ``<folder>/agent-<site>.log``."""

    def __init__(self, sites: SiteFactory, folder: Path) -> None:
        self.sites = sites
        self.folder = folder
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, site: str) -> Path:
        return self.sites.config_file(site, heartbeat_seconds=1.0)

    def start(self, site: str) -> None:
        with (self.folder / f"agent-{site}.log").open("ab") as log:
            self.running[site] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmreplica.cli",
                    "agent",
                    "--config",
                    str(self.config(site)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self, site: str) -> None:
        agent = self.running.pop(site)
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)

    def stop_all(self) -> None:
        for agent in self.running.values():
            agent.terminate()
        for site, agent in self.running.items():
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            assert agent.returncode == 0, self.log(site)
        self.running.clear()

    def log(self, site: str) -> str:
        return (self.folder / f"agent-{site}.log").read_text(errors="replace")[-6000:]


async def status(agents: Agents, site: str, vm: str) -> dict[str, object]:
    [row] = json.loads(await cli(agents.config(site), "status", vm, "--json"))
    assert isinstance(row, dict)
    return row


async def nbd_uris(agents: Agents, site: str, vm: str) -> dict[str, str]:
    """The URIs ``status`` gives the hypervisor at ``site`` (its primary)."""
    row = await status(agents, site, vm)
    assert row["capture"] == "nbd", row
    nbd = row["nbd"]
    assert isinstance(nbd, dict)
    return {disk: uris["unix"] for disk, uris in nbd.items()}


async def served(uri: str) -> dict[str, bool]:
    """Export name -> whether it is read-only, as ``nbdinfo`` sees the socket of ``uri``."""
    listing = json.loads(await run("nbdinfo", "--json", "--list", uri))
    return {e["export-name"]: e["is_read_only"] for e in listing["exports"]}


async def refuses_writes_serves_reads(uri: str, pattern: int, offset: str, length: str) -> None:
    """A fenced export: a hypervisor opening it to write is told no; reads still work."""
    code, output = await attempt("qemu-io", "-f", "raw", uri, "-c", f"write -P 0x33 {offset} 4k")
    assert code != 0, output
    assert "Permission denied" in output
    await run("qemu-io", "-r", "-f", "raw", uri, "-c", f"read -P {pattern:#x} {offset} {length}")


async def disks_of(site: Site, vm: str) -> dict[str, Path]:
    return {d.name: Path(d.path) for d in (await site.catalog.vm(vm)).disks}


async def in_step(primary: Site, replica: Site, vm: str) -> bool:
    """The replica applied the primary's last shipped cycle, and the primary's change log holds
    nothing more (continuous cycles ship every write within a second)."""
    shipped = await primary.catalog.position(vm)
    if await replica.catalog.find_vm(vm) is None:
        return False
    applied = await replica.catalog.position(vm)
    record = await replica.catalog.vm(vm)
    changelog = primary.config.vm_folder(vm) / "changelog"
    unshipped = sum(p.stat().st_size for p in changelog.glob("*.hrl")) if changelog.is_dir() else 0
    return (
        shipped is not None
        and applied is not None
        and record.role == "replica"
        and record.state is ReplicationState.REPLICATING
        and applied.cycle == shipped.cycle
        and unshipped <= 4096
    )


async def roles(sites: dict[str, Site], vm: str) -> dict[str, str]:
    return {name: (await site.catalog.vm(vm)).role for name, site in sites.items()}


async def served_writable(uri: str) -> bool:
    code, output = await attempt("nbdinfo", "--json", "--list", uri)
    return code == 0 and all(not e["is_read_only"] for e in json.loads(output)["exports"])


async def journal_since(site: Site, vm: str, offset: int) -> list[JournalEvent]:
    return [event async for _, event in journal_events(site, vm, offset)]
