"""One very big cycle applied by a real replica agent, and the agent's memory meanwhile.

Shared by ``benchmarks/apply_memory.py`` (a 2 GiB cycle) and the e2e test
``tests/e2e/test_big_cycle_memory.py`` (a smaller one), so both measure the same way:

1. a primary site in this process enables a VM with one sparse disk and seeds it;
2. the replica site is a real ``vmreplica agent`` process, which discovers the VM and applies
   the seed;
3. this process writes ``cycle_bytes`` through the capture API and ships them as one cycle;
4. while the agent applies it, its resident set size is sampled (``VmRSS``), and once the
   cycle is recorded its peak (``VmHWM``, the kernel's high-water mark since the agent started)
   is read; the replica's image must equal the primary's disk (SHA-256).

``compressible`` data (each MiB one random 64 KiB block repeated) keeps the broker's disk and
the wire small while the replica still decompresses and writes every byte of the cycle;
otherwise the data comes from ``os.urandom``, so zstd saves nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from vmreplica.config import SiteConfig
from vmreplica.devtools.measuring import rss_bytes
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.runtime.site import Site
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import sha256_of

MiB: Final = 1024 * 1024
VM: Final = "big-cycle"
PRIMARY_SITE: Final = "site-a"
REPLICA_SITE: Final = "site-b"
WRITE_BYTES: Final = MiB
SAMPLE_SECONDS: Final = 0.05


class BigCycleError(RuntimeError):
    """The measurement could not run (the agent died, or did not apply in time)."""


@dataclass(frozen=True)
class BigCycle:
    cycle_bytes: int
    peak_rss_bytes: int
    """The agent's ``VmHWM`` once the cycle was applied: its peak over its whole life."""
    rss_before_bytes: int
    """The agent's ``VmHWM`` after the seed, before the cycle was shipped."""
    sampled_peak_rss_bytes: int
    """The highest ``VmRSS`` sampled while the cycle was applied."""
    ship_seconds: float
    """How long the primary took to publish the cycle (the replica applies meanwhile)."""
    applied_seconds: float
    """From the start of the publication until the agent recorded the cycle applied."""
    identical: bool


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far (``VmHWM`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _config_file(path: Path, settings: dict[str, str]) -> Path:
    path.write_text("".join(f'{key} = "{value}"\n' for key, value in settings.items()))
    return path


async def _applied(catalog_path: Path, cycle: int | None) -> int | None:
    """The replica's applied cycle once it replicates (None before), read like `status` does."""
    if not await asyncio.to_thread(catalog_path.exists):
        return None
    async with Catalog(catalog_path) as catalog:
        if await catalog.find_vm(VM) is None:
            return None
        record = await catalog.vm(VM)
        position = await catalog.position(VM)
    if record.state is not ReplicationState.REPLICATING or position is None:
        return None
    return position.cycle


async def _wait_for_cycle(
    agent: subprocess.Popen[bytes], catalog: Path, cycle: int | None, timeout_seconds: float
) -> tuple[int, int]:
    """Wait until the replica replicates at ``cycle`` (any, when None); return that cycle and
    the highest RSS sampled meanwhile."""
    deadline = time.monotonic() + timeout_seconds
    sampled = 0
    while True:
        if agent.poll() is not None:
            raise BigCycleError(f"the replica agent exited with status {agent.returncode}")
        sampled = max(sampled, rss_bytes(agent.pid))
        applied = await _applied(catalog, cycle)
        if applied is not None and (cycle is None or applied >= cycle):
            return applied, sampled
        if time.monotonic() > deadline:
            raise BigCycleError(f"the replica did not reach cycle {cycle} in {timeout_seconds} s")
        await asyncio.sleep(SAMPLE_SECONDS)


def _start_agent(config_file: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmreplica.cli", "agent", "--log-level", "WARNING"],
        env={**os.environ, "VMREPLICA_CONFIG": str(config_file)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _data(compressible: bool) -> bytes:
    if compressible:
        return os.urandom(64 * 1024) * (WRITE_BYTES // (64 * 1024))
    return os.urandom(WRITE_BYTES)


async def big_cycle(
    folder: Path,
    bootstrap_servers: str,
    trust_group: str,
    cycle_bytes: int,
    *,
    compressible: bool = False,
    timeout_seconds: float = 900.0,
) -> BigCycle:
    """Steps 1-4 of the module docstring; the agent is stopped (SIGTERM) before returning."""
    settings = {"bootstrap_servers": bootstrap_servers, "trust_group": trust_group}
    primary_config, replica_config = (
        SiteConfig(
            site=name,
            root=folder / name,
            bootstrap_servers=bootstrap_servers,
            trust_group=trust_group,
        )
        for name in (PRIMARY_SITE, REPLICA_SITE)
    )
    config_file = _config_file(
        folder / f"{REPLICA_SITE}.toml",
        {"site": REPLICA_SITE, "root": str(folder / REPLICA_SITE), **settings},
    )
    disk = folder / "disk0.img"
    with disk.open("wb") as file:
        file.truncate(cycle_bytes)
    log = (folder / "agent.log").open("ab")
    agent: subprocess.Popen[bytes] | None = None
    try:
        async with Site(primary_config) as site:
            record = await site.enable(
                VM, {"disk0": disk}, REPLICA_SITE, VmSettings(frequency_seconds=0)
            )
            async with site.primary(record) as primary:
                await primary.initial_replication()
                agent = _start_agent(config_file, log)
                catalog = replica_config.catalog_path
                await _wait_for_cycle(agent, catalog, None, timeout_seconds)
                before = peak_rss_bytes(agent.pid)
                capture = primary.capture
                target = capture.disk("disk0")
                for offset in range(0, cycle_bytes, WRITE_BYTES):
                    capture.write_sync(target, offset, _data(compressible))
                    await asyncio.sleep(0)
                started = time.monotonic()
                shipped = await primary.replicate()
                if len(shipped) != 1:
                    raise BigCycleError(f"the writes shipped as {len(shipped)} cycles, not one")
                shipping = time.monotonic()
                _, sampled = await _wait_for_cycle(
                    agent, catalog, shipped[0].cycle, timeout_seconds
                )
                applied = time.monotonic()
                peak = peak_rss_bytes(agent.pid)
        identical = sha256_of(disk) == sha256_of(
            replica_config.vm_folder(VM) / "disks" / "disk0.img"
        )
        return BigCycle(
            cycle_bytes,
            peak,
            before,
            sampled,
            shipping - started,
            applied - started,
            identical,
        )
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
