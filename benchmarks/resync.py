"""Benchmark `vmreplica resync` beside `rsync --inplace --no-whole-file` on the same images.

    .venv/bin/python benchmarks/resync.py [--gib 4] [--changed 0.01] [--rounds 3]

A VM with one ``--gib`` GiB disk (sparse: 1 MiB of random data in every 4 MiB, holes between)
is replicated from site A to site B, both real ``vmreplica agent`` processes on one broker.
Each round stops B's agent, overwrites ``--changed`` of the disk's 64 KiB blocks in B's image
with random data (the same blocks for both tools), and then

- rsync: copies B's image aside (not timed) and runs ``rsync --inplace --no-whole-file --stats``
  from A's disk onto the copy; its wall time, and its "Total bytes sent";
- vmreplica: starts B's agent, waits until it runs, then times ``vmreplica resync VM --wait``
  on site A until B has applied the resynchronizing cycle; the bytes are the job's
  ``sent_bytes`` (what the resync cycle carried through Kafka, compressed).

Both results must equal A's disk (SHA-256). Printed: each round, and the median of the rounds
(target: bytes sent <= 1.5 % of the disk, and faster than rsync). A broker is started on a free
port unless ``VMREPLICA_BOOTSTRAP_SERVERS`` names one. Needs rsync (Debian: apt-get install
rsync). Exit status 0 when both targets are met and every image came out equal, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.consumers.replica import image_path
from vmreplica.devtools.measuring import broker
from vmreplica.domain.states import ReplicationState
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import sha256_of

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
BLOCK: Final = 64 * KiB
VM: Final = "resync-bench"
DATA_EVERY: Final = 4 * MiB
"""The disk holds 1 MiB of random data at the start of every 4 MiB, holes between."""
SENT_TARGET: Final = 0.015
TIMEOUT_SECONDS: Final = 900.0
_RSYNC_SENT = re.compile(r"Total bytes sent: ([\d,.]+)")


class BenchmarkError(RuntimeError):
    pass


@dataclass(frozen=True)
class Round:
    changed_bytes: int
    rsync_seconds: float
    rsync_sent: int
    vmreplica_seconds: float
    vmreplica_sent: int


class Agent:
    """``vmreplica agent`` of one site, its output in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmreplica.cli", "agent", "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchmarkError(f"the agent of {self.config.name} is not running:\n{tail}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchmarkError(f"vmreplica {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


async def wait_for(what: str, check: object, agent: Agent) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not await check():  # type: ignore[operator]
        agent.alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Bench:
    def __init__(self, folder: Path, bootstrap: str, disk_bytes: int) -> None:
        self.folder = folder
        group = f"bench{uuid.uuid4().hex[:8]}"
        self.configs = {}
        for site in ("site-a", "site-b"):
            path = folder / f"{site}.toml"
            path.write_text(
                f'site = "{site}"\nroot = "{folder / site}"\nbootstrap_servers = "{bootstrap}"\n'
                f'trust_group = "{group}"\nheartbeat_seconds = 1.0\n'
            )
            self.configs[site] = path
        self.agents = {
            site: Agent(path, folder / f"{site}.log") for site, path in self.configs.items()
        }
        self.disk = folder / "disk0.img"
        self.disk_bytes = disk_bytes
        replica = SiteConfig(site="site-b", root=folder / "site-b", bootstrap_servers=bootstrap)
        self.replica = image_path(replica.vm_folder(VM), "disk0")
        self.catalog_b = replica.catalog_path

    async def state_b(self) -> tuple[ReplicationState | None, str, int]:
        if not self.catalog_b.exists():
            return None, "", -1
        async with Catalog(self.catalog_b) as catalog:
            record = await catalog.find_vm(VM)
            if record is None:
                return None, "", -1
            position = await catalog.position(VM)
            return record.state, record.state_message, -1 if position is None else position.cycle

    async def agent_b_running(self) -> bool:
        process = self.agents["site-b"].process
        async with (
            Catalog(self.catalog_b) as catalog,
            catalog.db.execute("SELECT pid FROM agent") as cursor,
        ):
            rows = [tuple(row) for row in await cursor.fetchall()]
        return process is not None and (process.pid,) in rows

    async def set_up(self) -> None:
        with self.disk.open("wb") as image:
            image.truncate(self.disk_bytes)
            for offset in range(0, self.disk_bytes, DATA_EVERY):
                image.seek(offset)
                image.write(os.urandom(MiB))
        cli(
            self.configs["site-a"], "enable", VM, f"--disk=disk0={self.disk}",
            "--replica-site", "site-b", "--capture", "nbd", "--frequency", "30",
        )  # fmt: skip
        for agent in self.agents.values():
            agent.start()

        async def seeded() -> bool:
            state, _, _ = await self.state_b()
            return state is ReplicationState.REPLICATING

        await wait_for("site B to apply the seed", seeded, self.agents["site-b"])

    def change_replica(self, rng: random.Random, fraction: float) -> int:
        blocks = self.disk_bytes // BLOCK
        chosen = rng.sample(range(blocks), max(1, int(blocks * fraction)))
        with self.replica.open("r+b") as image:
            for block in chosen:
                image.seek(block * BLOCK)
                image.write(os.urandom(BLOCK))
        return len(chosen) * BLOCK

    def rsync(self) -> tuple[float, int]:
        target = self.folder / "rsync-target.img"
        target.unlink(missing_ok=True)
        subprocess.run(["cp", "--sparse=always", str(self.replica), str(target)], check=True)
        started = time.monotonic()
        done = subprocess.run(
            ["rsync", "--inplace", "--no-whole-file", "--stats", str(self.disk), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.monotonic() - started
        found = _RSYNC_SENT.search(done.stdout)
        if done.returncode != 0 or found is None:
            raise BenchmarkError(f"rsync failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        if sha256_of(target) != sha256_of(self.disk):
            raise BenchmarkError("rsync's copy differs from the primary's disk")
        target.unlink()
        return seconds, int(re.sub(r"[,.]", "", found.group(1)))

    async def vmreplica_resync(self) -> tuple[float, int]:
        agent = self.agents["site-b"]
        agent.start()
        await wait_for("site B's agent to run", self.agent_b_running, agent)
        started = time.monotonic()
        job = json.loads(
            await asyncio.to_thread(cli, self.configs["site-a"], "resync", VM, "--wait", "--json")
        )

        async def applied() -> bool:
            state, message, cycle = await self.state_b()
            return (
                state is ReplicationState.REPLICATING
                and message.startswith("resynchronized at cycle")
                and cycle >= job["cycle"]
            )

        await wait_for("site B to apply the resynchronizing cycle", applied, agent)
        seconds = time.monotonic() - started
        if sha256_of(self.replica) != sha256_of(self.disk):
            raise BenchmarkError("site B's image differs from the primary's disk after resync")
        return seconds, int(job["sent_bytes"])

    async def round(self, rng: random.Random, fraction: float) -> Round:
        self.agents["site-b"].stop()
        changed = self.change_replica(rng, fraction)
        rsync_seconds, rsync_sent = await asyncio.to_thread(self.rsync)
        seconds, sent = await self.vmreplica_resync()
        return Round(changed, rsync_seconds, rsync_sent, seconds, sent)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


async def bench(folder: Path, bootstrap: str, arguments: argparse.Namespace) -> list[Round]:
    made = Bench(folder, bootstrap, int(arguments.gib * GiB) // DATA_EVERY * DATA_EVERY)
    rng = random.Random(arguments.seed)
    try:
        await made.set_up()
        rounds = []
        for number in range(1, arguments.rounds + 1):
            result = await made.round(rng, arguments.changed)
            print(
                f"round {number}: {result.changed_bytes / MiB:.1f} MiB changed; "
                f"vmreplica resync {result.vmreplica_seconds:.1f} s, "
                f"{result.vmreplica_sent / MiB:.2f} MiB sent; "
                f"rsync {result.rsync_seconds:.1f} s, {result.rsync_sent / MiB:.2f} MiB sent",
                flush=True,
            )
            rounds.append(result)
        return rounds
    finally:
        made.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="disk size in GiB")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of blocks changed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is not installed (Debian: apt-get install rsync)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vmr-resync-", dir="/var/tmp") as work:
        folder = Path(work)
        with broker(folder, "benchmarks/resync.py") as kafka:
            print(f"broker: {kafka.description}", flush=True)
            try:
                rounds = asyncio.run(bench(folder, kafka.bootstrap_servers, arguments))
            except BenchmarkError as error:
                print(f"benchmark failed: {error}", file=sys.stderr)
                return 1
    disk = int(arguments.gib * GiB)
    sent = statistics.median(r.vmreplica_sent for r in rounds)
    seconds = statistics.median(r.vmreplica_seconds for r in rounds)
    rsync_seconds = statistics.median(r.rsync_seconds for r in rounds)
    rsync_sent = statistics.median(r.rsync_sent for r in rounds)
    print(
        f"median of {len(rounds)} rounds, {arguments.gib:g} GiB disk, "
        f"{arguments.changed:.1%} of its blocks changed:\n"
        f"  vmreplica resync: {seconds:.1f} s, {sent / MiB:.2f} MiB sent "
        f"({sent / disk:.2%} of the disk, target <= {SENT_TARGET:.1%})\n"
        f"  rsync --inplace --no-whole-file: {rsync_seconds:.1f} s, "
        f"{rsync_sent / MiB:.2f} MiB sent"
    )
    ok = sent <= SENT_TARGET * disk and seconds < rsync_seconds
    print("targets met" if ok else "below target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
