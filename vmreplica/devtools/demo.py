"""``make demo``: two sites on this machine replicate a two-disk VM through a real Kafka broker,
then fail it over every way (see :mod:`vmreplica.devtools.demo_failover`).

Site A is the primary: this process writes a workload through the capture API and ships cycles.
Site B is the replica: a real ``vmreplica agent`` process applies the journal. The broker is
secured (``broker up --secure``): each site logs in as its own Kafka user, with ACLs for its
trust group only. The demo records
the primary's digests at every cycle boundary, waits for the replica, compares the digests,
exports an older recovery point with ``vmreplica points export`` and checks it against the
primary's digests at that cycle. Everything it starts, it stops; it exits non-zero on any
mismatch.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.table import Table

from vmreplica.config import load_config
from vmreplica.devtools import demo_failover, demo_operations, demo_security
from vmreplica.devtools.cluster import ClusterState, LocalCluster
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.domain.names import DEFAULT_TRUST_GROUP
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.journaling_device import JournalingDevice
from vmreplica.runtime.site import Site
from vmreplica.security.sites import add_site
from vmreplica.storage.image import sha256_of

MiB: Final = 1024 * 1024
DISK_BYTES: Final = 64 * MiB
CYCLES: Final = 6
DEMO_BROKER_PORT: Final = 19792
"""The README names it; another free port is taken when something else holds it."""
VM: Final = "web01"
console = Console()


def _site_file(folder: Path, name: str, bootstrap: str, security: dict[str, str]) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f'site = "{name}"\nroot = "{folder / name}"\n'
        f'bootstrap_servers = "{bootstrap}"\nheartbeat_seconds = 1.0\n'
        + "".join(f'{key} = "{value}"\n' for key, value in security.items())
    )
    return path


def _principals(state: ClusterState, work: Path) -> dict[str, dict[str, str]]:
    """Each site's own Kafka user on the secured broker, with its trust group's ACLs only."""
    secured = state.secured
    if secured is None:
        return {"site-a": {}, "site-b": {}}
    settings = {}
    for name in ("site-a", "site-b"):
        access = asyncio.run(
            add_site(
                state.connection(),
                secured.ca_file,
                name,
                DEFAULT_TRUST_GROUP,
                work / f"{name}.password",
            )
        )
        keys = ("security_protocol", "sasl_username", "sasl_password_file", "ssl_ca_file")
        settings[name] = {key: access.settings()[key] for key in keys}
    console.print(
        "site-a and site-b log in as their own Kafka users (SCRAM-SHA-512 over TLS), each "
        f"allowed only trust group {DEFAULT_TRUST_GROUP!r}'s topics and transactional ids"
    )
    return settings


def _workload(rng: random.Random) -> list[tuple[str, int, bytes | int]]:
    """One cycle of writes: random 4-256 KiB writes, some zeroing, and the last block."""
    ops: list[tuple[str, int, bytes | int]] = []
    for _ in range(40):
        disk = rng.choice(["system", "data"])
        length = rng.choice([4096, 65536, 262144])
        offset = rng.randrange(0, DISK_BYTES - length, 4096)
        ops.append((disk, offset, rng.randbytes(length)))
    ops.append(("data", DISK_BYTES - 4096, rng.randbytes(4096)))
    ops.append(("system", rng.randrange(0, DISK_BYTES - MiB, 4096), MiB))
    return ops


async def _write_through_nbd(vm: CapturedVm, socket: Path, rng: random.Random) -> None:
    """Part of each cycle's writes go through the VM's NBD export with qemu-io, the way a
    hypervisor writes."""
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        return
    async with NbdServer(
        {disk: JournalingDevice(vm, disk) for disk in vm.disk_names}, unix_path=socket
    ) as server:
        offset = rng.randrange(0, DISK_BYTES - MiB, 65536)
        pattern = rng.randrange(1, 255)
        process = await asyncio.create_subprocess_exec(
            qemu_io,
            "-f",
            "raw",
            server.uri("data"),
            "-c",
            f"write -P {pattern} {offset} 1M",
            "-c",
            "flush",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, error = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"qemu-io failed: {error.decode()}")


async def _wait_applied(site: Site, cycle: int, timeout_seconds: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        position = await site.catalog.position(VM) if await site.catalog.find_vm(VM) else None
        if position is not None and position.cycle >= cycle:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the replica did not apply cycle {cycle} in {timeout_seconds:.0f} s")


@dataclass
class TourResult:
    """What the asynchronous part of the tour saw."""

    digests: dict[int, dict[str, str]] = field(default_factory=dict)
    replica: dict[str, str] = field(default_factory=dict)
    points: list[int] = field(default_factory=list)


async def _replicate(
    work: Path, config_a: Path, config_b: Path, disks: dict[str, Path]
) -> TourResult:
    """Enable, seed, ship cycles from site A; wait until site B's agent applied them all."""
    result = TourResult()
    rng = random.Random(2026)
    async with Site(load_config(config_a)) as site_a, Site(load_config(config_b)) as site_b:
        record = await site_a.enable(
            VM,
            disks,
            "site-b",
            VmSettings(frequency_seconds=30, continuous_points_hours=1, encrypt=True),
        )
        console.print(
            f"[bold]site-a[/]: enabled {VM} with disks system, data "
            f"({DISK_BYTES // MiB} MiB each), every cycle kept as a recovery point"
        )
        async with site_a.primary(record) as primary:
            vm = primary.capture
            for disk, offset, data in _workload(rng):
                await (
                    vm.write(disk, offset, data)
                    if isinstance(data, bytes)
                    else vm.zero(disk, offset, data)
                )
            seed = await primary.initial_replication()
            console.print(
                f"[bold]site-a[/]: initial replication sent "
                f"{seed.bytes_sent / MiB:.1f} MiB of {seed.bytes_examined / MiB:.0f}"
                " MiB (sparse-aware)"
            )
            console.print(
                "[bold]site-a[/]: each cycle's writes go through the capture API"
                + (
                    " and, with qemu-io, through the VM's NBD export"
                    if shutil.which("qemu-io")
                    else " (qemu-io not installed: no NBD)"
                )
            )
            for _ in range(CYCLES):
                for disk, offset, data in _workload(rng):
                    await (
                        vm.write(disk, offset, data)
                        if isinstance(data, bytes)
                        else vm.zero(disk, offset, data)
                    )
                await vm.flush()
                await _write_through_nbd(vm, work / "web01.sock", rng)
                for cycle in await primary.replicate():
                    result.digests[cycle.cycle] = {n: sha256_of(p) for n, p in disks.items()}
                    console.print(
                        f"[bold]site-a[/]: cycle {cycle.cycle} shipped — {cycle.extents} "
                        f"extents, {cycle.bytes_written / MiB:.1f} MiB written, "
                        f"{cycle.wire_bytes / MiB:.1f} MiB on the wire"
                    )
        last = max(result.digests)
        await _wait_applied(site_b, last)
        result.replica = {
            d.name: sha256_of(Path(d.path)) for d in (await site_b.catalog.vm(VM)).disks
        }
        result.points = [p.cycle for p in await site_b.catalog.points(VM)]
    console.print(
        f"[bold]site-b[/]: applied through cycle {last}; recovery points: "
        f"{', '.join(map(str, result.points))}"
    )
    return result


def _tour(work: Path, bootstrap: str, security: dict[str, dict[str, str]]) -> bool:
    config_a = _site_file(work, "site-a", bootstrap, security["site-a"])
    config_b = _site_file(work, "site-b", bootstrap, security["site-b"])
    disks = {"system": work / "vm" / "system.img", "data": work / "vm" / "data.img"}
    disks["system"].parent.mkdir(parents=True)
    for path in disks.values():
        with path.open("wb") as file:
            file.truncate(DISK_BYTES)
    demo_security.trust_each_other(config_a, config_b, console)
    env = {**os.environ, "VMREPLICA_CONFIG": str(config_b)}
    with (work / "site-b-agent.log").open("wb") as agent_log:
        replica_agent = subprocess.Popen(
            [sys.executable, "-m", "vmreplica.cli", "agent"],
            env=env,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
        )
        console.print(f"[bold]site-b[/]: replica agent running (pid {replica_agent.pid})")
        try:
            result = asyncio.run(_replicate(work, config_a, config_b, disks))
            older = result.points[len(result.points) // 2]
            export_dir = work / "export"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "vmreplica.cli",
                    "points",
                    "export",
                    VM,
                    str(older),
                    str(export_dir),
                ],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            exported = {name: sha256_of(export_dir / f"{name}.raw") for name in disks}
            refused = demo_security.forged_record_refused(
                config_a, work / "site-b-agent.log", console
            )
        finally:
            replica_agent.terminate()
            replica_agent.wait(timeout=30)
    last = max(result.digests)
    table = Table(
        "disk",
        "primary (latest)",
        "replica (latest)",
        f"primary @ cycle {older}",
        f"exported point {older}",
        title="sha256 digests (first 16 hex digits)",
    )
    ok = True
    for name in disks:
        row = [
            result.digests[last][name],
            result.replica[name],
            result.digests[older][name],
            exported[name],
        ]
        ok &= row[0] == row[1] and row[2] == row[3]
        table.add_row(name, *(d[:16] for d in row))
    console.print(table)
    ok = asyncio.run(demo_failover.tour(config_a, config_b, VM, console)) and ok and refused
    demo_operations.closing(work, (config_a, config_b), console)
    return ok


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmreplica-demo-"))
    external = os.environ.get("VMREPLICA_BOOTSTRAP_SERVERS")
    cluster = (
        None
        if external
        else LocalCluster(home=work / "kafka", base_port=free_base_port(preferred=DEMO_BROKER_PORT))
    )
    try:
        security: dict[str, dict[str, str]] = {"site-a": {}, "site-b": {}}
        if cluster is not None:
            with console.status("starting a local, secured Apache Kafka broker…"):
                state = cluster.up(1, secure=True)
            bootstrap = state.bootstrap_servers
            console.print(
                f"Kafka (KRaft, single node; TLS on every listener, SCRAM logins, ACLs) at "
                f"{bootstrap}"
            )
            security = _principals(state, work)
        else:
            bootstrap = str(external)
        ok = _tour(work, bootstrap, security)
    finally:
        if cluster is not None:
            cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    console.print(
        "[bold green]replica identical to the primary at every compared point[/]"
        if ok
        else "[bold red]digest mismatch[/]"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
