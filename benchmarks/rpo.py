"""Benchmark the RPO under load: from a write's FLUSH at the primary to its cycle applied at B.

    .venv/bin/python benchmarks/rpo.py [--rate 50m] [--seconds 30] [--rounds 3] [--disk-mib 2048]
                                       [--probes-per-second 10] [--json results.json]

Set-up, once: a broker (a local single-node Kafka started with the project's own code, or the
cluster ``VMREPLICA_BOOTSTRAP_SERVERS`` names), sites A and B, a VM enabled on A with
``--capture nbd --frequency continuous`` (a cycle every second, or every 64 MiB) and one sparse
disk of ``--disk-mib``, and ``vmreplica agent`` for each site as a process. The benchmark waits
until B has the seed.

Each round (``--rounds``, at least 3 for a median):

1. fio (its ``nbd`` engine: libnbd, one connection) writes 64 KiB blocks at random offsets of the
   disk through A's NBD export, throttled to ``--rate`` (fio's ``--rate``), four in flight, with
   a FLUSH after every 16 writes (``--fsync=16``), as a guest's file system does, for
   ``--seconds``;
2. meanwhile a probe (this process, a second NBD connection: the export advertises
   ``CAN_MULTI_CONN``) writes a 4 KiB block to an area of the disk fio does not touch, then
   sends FLUSH, ``--probes-per-second`` times a second at random instants, noting when each
   WRITE and each FLUSH was answered;
3. once fio has finished and B has applied every cycle A shipped, the disk is compared with B's
   image (``qemu-img compare``); a round whose replica differs is invalid.

A probe's *RPO sample* is the time from its FLUSH's reply to the instant B recorded, in its
catalog (``cycle_stat.done_at_ms``: applied, fsynced, position recorded), the cycle that holds
its write: the first cycle A cut after the WRITE was answered (``cut_at_ms``, carried in the
cycle's commit; same machine, same clock). When a cut falls in the same millisecond as the
reply the later cycle is taken, so a sample is never flattered. Every round prints the p50, p99
and maximum of its samples, fio's achieved MB/s and the CPU seconds per GiB written of each
process (agents, broker, fio, the probe); the summary prints the median of the rounds' p50 and
p99 against the target (p99 <= 2 s) and the command that reproduces it.

Exit status: 0 when every round ran and every replica matched (a missed target prints "below
target"); 1 when the benchmark could not run or a replica differed from its primary.

About 400 lines, one script: the load, the probe and how a sample is matched to its cycle must be
read together to trust a percentile it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from vmreplica.devtools.agents import (
    AgentProcess,
    BenchmarkError,
    NbdWriter,
    Sites,
    catalog_rows,
    percentile,
)
from vmreplica.devtools.measuring import Broker, broker, cpu_seconds
from vmreplica.devtools.ports import free_base_port

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
VM: Final = "rpovm"
DISK: Final = "disk0"
PRIMARY_SITE: Final = "site-a"
REPLICA_SITE: Final = "site-b"
P99_TARGET_SECONDS: Final = 2.0
PROBE_AREA_BYTES: Final = 16 * MiB
"""The end of the disk, which only the probe writes (fio writes the rest)."""
PROBE_BYTES: Final = 4 * KiB
FIO_BLOCK: Final = "64k"
FIO_IODEPTH: Final = 4
FIO_FSYNC_EVERY: Final = 16
SEED_TIMEOUT_SECONDS: Final = 300.0
DRAIN_TIMEOUT_SECONDS: Final = 300.0
SETTLED_SECONDS: Final = 3.0
"""B is caught up once its applied cycle equals A's shipped one for this long."""


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Probe:
    """One probe: when its WRITE and its FLUSH were answered (Unix seconds)."""

    written: float
    flushed: float


@dataclass
class Round:
    number: int
    seconds: float
    fio_bytes: int
    fio_mb_per_s: float
    probes: int
    samples: list[float]
    """Seconds from each probe's FLUSH reply to its cycle applied at B."""
    identical: bool
    cpu: dict[str, float] = field(default_factory=dict)
    parts: dict[str, list[float]] = field(default_factory=dict)
    """Where each sample's time went: FLUSH reply to the cut, cut to shipped (A's commit
    acknowledged and recorded), shipped to applied at B."""

    @property
    def p50(self) -> float:
        return percentile(self.samples, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)


class RpoBench:
    def __init__(self, workdir: Path, kafka: Broker, args: argparse.Namespace) -> None:
        self.kafka = kafka
        self.args = args
        self.folder = workdir / "sites"
        self.folder.mkdir()
        self.sites = Sites(self.folder, kafka.bootstrap_servers)
        base = free_base_port()  # a free block of ten: two metrics ports
        self.sites.ports = {PRIMARY_SITE: base, REPLICA_SITE: base + 1}
        self.agents = {
            "primary": AgentProcess(self.sites, PRIMARY_SITE),
            "replica": AgentProcess(self.sites, REPLICA_SITE),
        }
        self.disk = self.folder / "disk0.img"
        self.disk_bytes = args.disk_mib * MiB
        primary = self.sites.config(PRIMARY_SITE)
        assert primary.nbd_socket_dir is not None
        self.socket = primary.nbd_socket_dir / f"{VM}.sock"
        self.uri = f"nbd+unix:///{DISK}?socket={self.socket}"

    def replica_image(self) -> Path:
        return self.sites.config(REPLICA_SITE).vm_folder(VM) / "disks" / f"{DISK}.img"

    async def start(self) -> None:
        with self.disk.open("wb") as image:
            image.truncate(self.disk_bytes)
        command = [
            sys.executable, "-m", "vmreplica.cli", "enable", VM, "--disk", f"{DISK}={self.disk}",
            "--replica-site", REPLICA_SITE, "--frequency", "continuous", "--capture", "nbd",
            "--config", str(self.sites.config_file(PRIMARY_SITE)),
        ]  # fmt: skip
        enabled = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await enabled.communicate()
        if enabled.returncode != 0:
            raise BenchmarkError(f"{shlex.join(command)} failed: {err.decode()}")
        for agent in self.agents.values():
            agent.start()
        deadline = time.monotonic() + SEED_TIMEOUT_SECONDS
        while self.applied_cycle() < 0 or not self.socket.exists():
            for agent in self.agents.values():
                _ = agent.pid  # fails, with the agent's log, if it died
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the seed was not applied in {SEED_TIMEOUT_SECONDS:.0f} s")
            await asyncio.sleep(1)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()

    def _position(self, site: str) -> int:
        config = self.sites.config(site)
        if not config.catalog_path.exists():
            return -1
        rows = catalog_rows(config, f"SELECT cycle FROM position WHERE vm = '{VM}'")
        return int(str(rows[0][0])) if rows else -1

    def applied_cycle(self) -> int:
        return self._position(REPLICA_SITE)

    async def drained(self) -> None:
        """Wait until B's applied cycle equals A's shipped one, and stays so (A has nothing
        more to ship)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        equal_since: float | None = None
        while True:
            for agent in self.agents.values():
                _ = agent.pid
            shipped, applied = self._position(PRIMARY_SITE), self.applied_cycle()
            now = time.monotonic()
            if shipped >= 0 and shipped == applied:
                equal_since = equal_since or now
                if now - equal_since >= SETTLED_SECONDS:
                    return
            else:
                equal_since = None
            if now > deadline:
                raise BenchmarkError(
                    f"the replica did not catch up in {DRAIN_TIMEOUT_SECONDS:.0f} s "
                    f"(shipped cycle {shipped}, applied {applied})"
                )
            await asyncio.sleep(0.2)

    def fio_command(self, output: Path) -> list[str]:
        return [
            "fio", "--name=rpo", "--ioengine=nbd", f"--uri={self.uri}", "--rw=randwrite",
            f"--bs={FIO_BLOCK}", f"--iodepth={FIO_IODEPTH}", f"--fsync={FIO_FSYNC_EVERY}",
            f"--rate={self.args.rate}", f"--size={self.disk_bytes - PROBE_AREA_BYTES}",
            f"--runtime={self.args.seconds}", "--time_based", "--output-format=json",
            f"--output={output}",
        ]  # fmt: skip

    async def probe(self, until: asyncio.Event) -> list[Probe]:
        """Write and FLUSH a block in the probe area at random instants until ``until``."""
        writer = await NbdWriter.open(self.socket, DISK)
        slots = PROBE_AREA_BYTES // PROBE_BYTES
        area = self.disk_bytes - PROBE_AREA_BYTES
        generator = random.Random()
        probes: list[Probe] = []
        mean_gap = 1 / self.args.probes_per_second
        try:
            while not until.is_set():
                await asyncio.sleep(generator.uniform(0.5 * mean_gap, 1.5 * mean_gap))
                data = os.urandom(PROBE_BYTES)
                offset = area + (len(probes) % slots) * PROBE_BYTES
                await writer.write(offset, data)
                written = time.time()
                await writer.flush()
                probes.append(Probe(written, time.time()))
        finally:
            await writer.close()
        return probes

    def cycles_done(self, site: str) -> list[tuple[int, int, int]]:
        """(cycle, cut_at_ms, done_at_ms) of every cycle a site shipped (A) or applied (B)."""
        rows = catalog_rows(
            self.sites.config(site),
            f"SELECT cycle, cut_at_ms, done_at_ms FROM cycle_stat WHERE vm = '{VM}' ORDER BY cycle",
        )
        return [(int(str(c)), int(str(cut)), int(str(done))) for c, cut, done in rows]

    def samples(self, probes: list[Probe]) -> tuple[list[float], dict[str, list[float]]]:
        """Each probe's FLUSH reply to applied at B, and the parts of that time."""
        applied = self.cycles_done(REPLICA_SITE)
        shipped = {cycle: done for cycle, _, done in self.cycles_done(PRIMARY_SITE)}
        result: list[float] = []
        parts: dict[str, list[float]] = {"to cut": [], "cut->shipped": [], "shipped->applied": []}
        for probe in probes:
            written_ms = int(probe.written * 1000)
            holding = next((c for c in applied if c[1] > written_ms), None)
            if holding is None:
                raise BenchmarkError(f"no applied cycle was cut after a probe at {probe.written}")
            cycle, cut_ms, applied_ms = holding
            result.append(applied_ms / 1000 - probe.flushed)
            parts["to cut"].append(cut_ms / 1000 - probe.flushed)
            if cycle in shipped:
                parts["cut->shipped"].append((shipped[cycle] - cut_ms) / 1000)
                parts["shipped->applied"].append((applied_ms - shipped[cycle]) / 1000)
        return result, parts

    def _cpu(self) -> dict[str, float]:
        figures = {name: cpu_seconds(agent.pid) for name, agent in self.agents.items()}
        if self.kafka.pids:
            figures["broker"] = self.kafka.cpu_seconds()
        figures["probe"] = cpu_seconds()
        return figures

    async def round(self, number: int, workdir: Path) -> Round:
        output = workdir / f"fio-{number}.json"
        before = self._cpu()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        fio = await asyncio.create_subprocess_exec(
            *self.fio_command(output), stdout=asyncio.subprocess.DEVNULL
        )
        stop = asyncio.Event()
        probing = asyncio.create_task(self.probe(stop))
        code = await fio.wait()
        stop.set()
        probes = await probing
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = time.monotonic() - started
        if code != 0:
            raise BenchmarkError(f"fio exited {code}: {shlex.join(self.fio_command(output))}")
        write = json.loads(output.read_text())["jobs"][0]["write"]
        await self.drained()
        now = self._cpu()
        cpu = {name: now[name] - before[name] for name in now}
        cpu["fio"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        compare = await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(self.disk),
             str(self.replica_image())],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if compare.returncode not in (0, 1):
            raise BenchmarkError(f"qemu-img compare failed: {compare.stderr.strip()}")
        samples, parts = self.samples(probes)
        return Round(
            number,
            seconds,
            int(write["io_bytes"]),
            float(write["bw_bytes"]) / 1e6,
            len(probes),
            samples,
            compare.returncode == 0,
            cpu,
            parts,
        )


def print_round(result: Round) -> None:
    written = result.fio_bytes + result.probes * PROBE_BYTES
    cost = ", ".join(f"{name} {s * GiB / written:.1f}" for name, s in result.cpu.items())
    check = "" if result.identical else "  REPLICA DIFFERS"
    print(
        f"round {result.number}: fio {result.fio_mb_per_s:6.1f} MB/s, {len(result.samples)} "
        f"probes, FLUSH -> applied p50 {result.p50:.2f} s, p99 {result.p99:.2f} s, max "
        f"{max(result.samples):.2f} s; CPU s/GiB: {cost}{check}",
        flush=True,
    )
    split = ", ".join(
        f"{name} p50 {percentile(values, 0.5):.2f} p99 {percentile(values, 0.99):.2f}"
        for name, values in result.parts.items()
    )
    print(f"         of which (s): {split}", flush=True)


def report(rounds: list[Round], kafka: Broker, args: argparse.Namespace) -> None:
    p50 = statistics.median(r.p50 for r in rounds)
    p99 = statistics.median(r.p99 for r in rounds)
    load = os.getloadavg()
    print()
    print("vmreplica RPO under load (continuous mode, --capture nbd)")
    print(f"  broker : {kafka.description}")
    print(
        f"  load   : fio randwrite {FIO_BLOCK}, iodepth {FIO_IODEPTH}, FLUSH every "
        f"{FIO_FSYNC_EVERY} writes, --rate={args.rate}, {args.seconds} s per round"
    )
    print(
        f"  probe  : 4 KiB WRITE + FLUSH {args.probes_per_second}/s; sample = FLUSH reply -> "
        "B recorded the cycle holding the write as applied"
    )
    print(f"  machine: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for result in rounds:
        print_round(result)
    verdict = "ok" if p99 <= P99_TARGET_SECONDS else "below target"
    print(
        f"median of {len(rounds)} rounds: p50 {p50:.2f} s, p99 {p99:.2f} s  "
        f"target p99 <= {P99_TARGET_SECONDS:g} s: {verdict}"
    )
    print(f"reproduce: {shlex.join([sys.executable, *sys.argv])}")


async def run(workdir: Path, kafka: Broker, args: argparse.Namespace) -> list[Round]:
    bench = RpoBench(workdir, kafka, args)
    rounds: list[Round] = []
    try:
        _progress("starting the agents and seeding the replica ...")
        await bench.start()
        for number in range(1, args.rounds + 1):
            _progress(f"round {number}: {args.seconds} s of fio --rate={args.rate} ...")
            result = await bench.round(number, workdir)
            print_round(result)
            rounds.append(result)
    except BaseException:
        for agent in bench.agents.values():
            _progress(f"{agent.site}'s log, its last warnings and errors:\n{agent.problems()}")
        raise
    finally:
        bench.stop()
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", default="50m", help="fio --rate (default 50m)")
    parser.add_argument("--seconds", type=int, default=30, help="seconds of fio per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=2048)
    parser.add_argument("--probes-per-second", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1 or args.probes_per_second <= 0:
        print("--rounds, --seconds and --probes-per-second must be positive", file=sys.stderr)
        return 2
    for program in ("fio", "qemu-img"):
        if shutil.which(program) is None:
            print(f"{program} is not installed (deploy/install-system-deps.sh)", file=sys.stderr)
            return 1
    try:
        with tempfile.TemporaryDirectory(prefix="vmreplica-rpo-") as directory:
            workdir = Path(directory)
            with broker(workdir) as kafka:
                rounds = asyncio.run(run(workdir, kafka, args))
    except Exception as error:  # any failure means "could not run"
        print(f"rpo benchmark could not run: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    report(rounds, kafka, args)
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "p50": r.p50, "p99": r.p99} for r in rounds], indent=2)
        )
    if not all(r.identical for r in rounds):
        print("rpo benchmark is invalid: a replica differs from its primary", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
