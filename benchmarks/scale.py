"""Benchmark many VMs on one primary agent and one replica agent: missed cycles, apply lag, cost.

    .venv/bin/python benchmarks/scale.py [--vms 100 300] [--cycles 4] [--frequency 30]
                                         [--disk-mib 32] [--write-kib 32] [--slow-vm]
                                         [--idle-seconds 30] [--json results.json]

Each round (``--vms`` N, by default 100 then 300, one after the other) starts from nothing on
one broker (a local single-node Kafka started with the project's own code, or the cluster
``VMREPLICA_BOOTSTRAP_SERVERS`` names):

1. N sparse raw disks of ``--disk-mib`` MiB; the VMs are enabled with ``--capture nbd`` at
   ``--frequency`` (30 s is the shortest the product allows). The first ``--cli-sample`` VMs
   are enabled with ``vmreplica enable`` processes, the rest through :meth:`Site.enable` in
   this process, each timed: the figures say what an enable costs and where it goes.
2. ``vmreplica agent`` runs for site A (the primary) and site B (the replica) as two processes,
   as an operator starts them. The round waits until B has applied every VM's seed.
3. Idle: ``--idle-seconds`` with no writes: the agents' and the broker's CPU seconds then are
   what merely holding N VMs costs.
4. Load: ``--cycles`` intervals in which every VM gets a ``--write-kib`` write and a FLUSH
   through its NBD export every half interval (one connection per VM, all from this
   process's event loop: a few milliseconds of CPU per VM and interval), at a phase of its
   own. Then the round waits until B has applied each VM's last write.
5. Results come from the two sites' catalogs (``cycle_stat``: each cycle's cut, shipped and
   applied instants) and the agents' Prometheus metrics: missed cycles (writes wait at every
   cut, so a VM's cuts should come one interval apart: a gap above one and a half intervals
   counts as missed, as the product counts them; and the replica's
   ``vmreplica_cycles_missed_total``), the p50/p99 of apply lag (cut on A to applied and
   durable on B), CPU seconds and RSS of each agent per VM, the broker's CPU. Every range
   written is read back from B's image and compared.

``--slow-vm`` adds one more VM whose cycles are slow: it is a ``--capture scan`` VM whose
pre-cut hook sleeps for one and a half intervals (its writes go straight into its image). It
misses cycles, as it should; the figures for the others must not move (no missed cycle, no gap
between cuts above one and a half intervals).

Targets: no cycle missed at 100 VMs; cost per VM (CPU seconds per VM and interval, RSS per VM)
at most linear in N: at 300 no more than 1.1 times the figure at 100 (10 % for the noise of a
shared machine); a slow VM delays no other VM's cycles. Exit status: 0 when every round ran
(a missed target prints "below target"); 1 when the benchmark could not run or a replica image
differs from what was written. Set ``VMREPLICA_BENCH_PROFILE=<folder>`` to run both agents under
cProfile, their statistics written there when they stop.

About 600 lines, one script: the VMs, their load, the agents and the per-VM figures must be read
together to trust what it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
from vmreplica.devtools.measuring import Broker, broker, cpu_seconds, rss_bytes
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.site import Site

KiB: Final = 1024
MiB: Final = 1024 * KiB
PRIMARY_SITE: Final = "site-a"
REPLICA_SITE: Final = "site-b"
DISK: Final = "disk0"
SLOW_VM: Final = "slowvm"
LINEAR_ALLOWANCE: Final = 1.1
"""Cost per VM at the larger N may be this much above the smaller N's (a shared machine)."""
WRITES_PER_INTERVAL: Final = 2
"""Each VM is written this often per interval, so that writes wait at every cut whatever the
phase of the VM's timer (one write per interval, landing just after one cut and just before
the next, would make two cycles look like one)."""
SEED_TIMEOUT_SECONDS: Final = 900.0


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- one round -----------------------------------------------------------------------------------


@dataclass
class Cost:
    """CPU seconds of each process over a window, and the agents' RSS at its end."""

    seconds: float
    cpu: dict[str, float]
    rss: dict[str, int]


@dataclass
class Round:
    vms: int
    frequency: int
    cycles: int
    enable_cli_seconds: list[float]
    enable_api_seconds: list[float]
    cli_start_seconds: float
    seed_seconds: float
    idle: Cost
    load: Cost
    missed_cycles: int
    missed_metric: float
    wait_seconds: float
    """The longest time any VM went without a cut while writes waited (on time: one
    interval)."""
    ship_lag: list[float]
    apply_lag: list[float]
    slow_vm_cycles: int | None
    slow_vm_missed: int | None
    verified_ranges: int
    differing_ranges: int

    @property
    def on_time(self) -> bool:
        """No VM went without a cut as long as the product's "missed" rule (1.5 intervals)."""
        return self.wait_seconds < 1.5 * self.frequency

    def per_vm_cycle(self, process: str) -> float:
        """CPU seconds of ``process`` per VM and interval during the load."""
        return self.load.cpu[process] / self.vms / self.cycles

    def per_vm_minute(self, cost: Cost, process: str) -> float:
        return cost.cpu[process] / self.vms / (cost.seconds / 60)


class Measurement:
    """CPU seconds of the agents and the broker from one instant to another."""

    def __init__(self, agents: dict[str, AgentProcess], kafka: Broker) -> None:
        self.agents = agents
        self.kafka = kafka
        self.started = time.monotonic()
        self.cpu = self._cpu()

    def _cpu(self) -> dict[str, float]:
        figures = {name: cpu_seconds(agent.pid) for name, agent in self.agents.items()}
        if self.kafka.pids:
            figures["broker"] = self.kafka.cpu_seconds()
        return figures

    def done(self) -> Cost:
        now = self._cpu()
        return Cost(
            time.monotonic() - self.started,
            {name: now[name] - self.cpu[name] for name in now},
            {name: rss_bytes(agent.pid) for name, agent in self.agents.items()},
        )


class ScaleRound:
    def __init__(self, workdir: Path, kafka: Broker, vms: int, args: argparse.Namespace) -> None:
        self.kafka = kafka
        self.args = args
        self.names = [f"vm{index:03d}" for index in range(vms)]
        self.folder = workdir / f"n{vms}"
        self.folder.mkdir()
        base = free_base_port()  # a free block of ten: two metrics ports
        self.sites = Sites(self.folder, kafka.bootstrap_servers)
        self.sites.ports = {PRIMARY_SITE: base, REPLICA_SITE: base + 1}
        self.agents = {
            "primary": AgentProcess(self.sites, PRIMARY_SITE),
            "replica": AgentProcess(self.sites, REPLICA_SITE),
        }
        self.period = args.frequency
        self.written: dict[str, list[tuple[int, int, bytes]]] = {}
        """What each VM got: (offset, length, sha256) of every write."""
        self.write_ms: dict[str, list[int]] = {}
        """When each write of each VM was sent, Unix milliseconds."""

    def disk(self, vm: str) -> Path:
        return self.folder / "disks" / f"{vm}.img"

    # step 1
    async def enable(self) -> tuple[list[float], list[float], float]:
        (self.folder / "disks").mkdir()
        config_file = self.sites.config_file(PRIMARY_SITE)
        for vm in [*self.names, *([SLOW_VM] if self.args.slow_vm else [])]:
            with self.disk(vm).open("wb") as image:
                image.truncate(self.args.disk_mib * MiB)
        started = time.monotonic()
        start = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import vmreplica.cli.main"
        )
        await start.wait()
        cli_start = time.monotonic() - started
        sample = self.names[: self.args.cli_sample]
        cli: list[float] = []
        for vm in sample:
            started = time.monotonic()
            await _run(
                sys.executable, "-m", "vmreplica.cli", "enable", vm, "--disk",
                f"{DISK}={self.disk(vm)}", "--replica-site", REPLICA_SITE, "--frequency",
                str(self.period), "--capture", "nbd", "--config", str(config_file),
            )  # fmt: skip
            cli.append(time.monotonic() - started)
        api: list[float] = []
        async with Site(self.sites.config(PRIMARY_SITE)) as site:
            settings = VmSettings(frequency_seconds=self.period, capture="nbd")
            for vm in self.names[len(sample) :]:
                started = time.monotonic()
                await site.enable(vm, {DISK: self.disk(vm)}, REPLICA_SITE, settings)
                api.append(time.monotonic() - started)
            if self.args.slow_vm:
                hook = f"sleep {self.period * 1.5:g}"
                await site.enable(
                    SLOW_VM,
                    {DISK: self.disk(SLOW_VM)},
                    REPLICA_SITE,
                    VmSettings(frequency_seconds=self.period, capture="scan", pre_cut_hook=hook),
                )
        return cli, api, cli_start

    # step 2
    async def seeded(self) -> float:
        started = time.monotonic()
        for agent in self.agents.values():
            agent.start()
        expected = len(self.names) + (1 if self.args.slow_vm else 0)
        replica = self.sites.config(REPLICA_SITE)
        reported = 0
        while True:
            for agent in self.agents.values():
                _ = agent.pid  # fails, with the agent's log, if it died
            if replica.catalog_path.exists():
                [(applied,)] = catalog_rows(
                    replica, "SELECT count(*) FROM position WHERE cycle >= 0"
                )
                if int(str(applied)) >= expected:
                    return time.monotonic() - started
                if int(str(applied)) >= reported + max(10, expected // 10):
                    reported = int(str(applied))
                    _progress(f"  {reported}/{expected} seeds applied")
            if time.monotonic() - started > SEED_TIMEOUT_SECONDS:
                raise BenchmarkError(f"the seeds were not all applied in {SEED_TIMEOUT_SECONDS} s")
            await asyncio.sleep(2)

    # step 4
    async def load(self) -> None:
        primary = self.sites.config(PRIMARY_SITE)
        assert primary.nbd_socket_dir is not None
        writers = {
            vm: await NbdWriter.open(primary.nbd_socket_dir / f"{vm}.sock", DISK)
            for vm in self.names
        }
        size = self.args.write_kib * KiB
        start = time.monotonic() + 1
        try:
            await asyncio.gather(
                *(
                    self._write_vm(vm, writer, size, start + index * self.period / len(writers))
                    for index, (vm, writer) in enumerate(writers.items())
                ),
                *([self._write_slow_vm(size, start)] if self.args.slow_vm else []),
            )
        finally:
            for writer in writers.values():
                await writer.close()

    async def _write_vm(self, vm: str, writer: NbdWriter, size: int, first: float) -> None:
        written = self.written.setdefault(vm, [])
        for write in range(WRITES_PER_INTERVAL * self.args.cycles):
            due = first + write * self.period / WRITES_PER_INTERVAL
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            data = os.urandom(size)
            offset = write * size
            self.write_ms.setdefault(vm, []).append(int(time.time() * 1000))
            await writer.write(offset, data)
            await writer.flush()
            written.append((offset, size, hashlib.sha256(data).digest()))

    async def _write_slow_vm(self, size: int, first: float) -> None:
        """The scanned VM's guest writes straight into its image."""
        written = self.written.setdefault(SLOW_VM, [])
        for write in range(WRITES_PER_INTERVAL * self.args.cycles):
            due = first + write * self.period / WRITES_PER_INTERVAL
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            data = os.urandom(size)
            with self.disk(SLOW_VM).open("r+b") as image:
                image.seek(write * size)
                image.write(data)
            written.append((write * size, size, hashlib.sha256(data).digest()))
            self.write_ms.setdefault(SLOW_VM, []).append(int(time.time() * 1000))

    async def drained(self, seconds: float) -> None:
        """Wait until B's images hold every write (:meth:`verify`); after ``seconds``, go on
        (the report then says which ranges differ)."""
        deadline = time.monotonic() + seconds
        while True:
            _, differing = await asyncio.to_thread(self.verify)
            if not differing or time.monotonic() > deadline:
                return
            _ = self.agents["replica"].pid  # fails, with the agent's log, if it died
            await asyncio.sleep(2)

    # step 5
    def cycles(self, site: str, since_ms: int) -> dict[str, list[tuple[int, int, int]]]:
        """Each VM's (cycle, cut_at_ms, done_at_ms) cut since ``since_ms``, by cut."""
        rows = catalog_rows(
            self.sites.config(site),
            "SELECT vm, cycle, cut_at_ms, done_at_ms FROM cycle_stat "
            f"WHERE cut_at_ms >= {since_ms} ORDER BY vm, cut_at_ms",
        )
        result: dict[str, list[tuple[int, int, int]]] = {}
        for vm, cycle, cut, done in rows:
            result.setdefault(str(vm), []).append((int(str(cycle)), int(str(cut)), int(str(done))))
        return result

    def missed(self, vm: str, cuts: list[tuple[int, int, int]]) -> tuple[int, float]:
        """A VM's missed cycles during the load, and its longest time without a cut while
        writes waited (seconds; about one interval when its cycles are on time).

        The VM is written twice per interval, so writes wait at every cut, whatever the phase
        of its timer: consecutive cuts (and the first write and the first cut) should be one
        interval apart. A gap of more than one and a half intervals counts as missed cycles,
        one per interval beyond the first, as the product counts them.
        """
        writes = self.write_ms.get(vm, [])
        if not writes:
            return 0, 0.0
        instants = [writes[0]]
        for _, at, _ in cuts:
            if at >= writes[0]:
                instants.append(at)
            if at >= writes[-1]:
                break
        else:
            return len(writes), float("inf")  # the last write was never cut
        missed, longest = 0, 0.0
        for before, after in itertools.pairwise(instants):
            gap = (after - before) / 1000
            longest = max(longest, gap)
            if gap > 1.5 * self.period:
                missed += round(gap / self.period) - 1
        return missed, longest

    def verify(self) -> tuple[int, int]:
        """Read every range written back from B's images: (ranges checked, ranges differing)."""
        replica = self.sites.config(REPLICA_SITE)
        checked = differing = 0
        for vm, writes in self.written.items():
            if vm == SLOW_VM:
                continue
            with (replica.vm_folder(vm) / "disks" / f"{DISK}.img").open("rb") as image:
                for offset, length, digest in writes:
                    image.seek(offset)
                    checked += 1
                    differing += hashlib.sha256(image.read(length)).digest() != digest
        return checked, differing

    async def run(self) -> Round:
        n = len(self.names)
        _progress(f"round of {n} VMs: enabling ...")
        cli, api, cli_start = await self.enable()
        _progress(
            f"  enabled: {statistics.mean(cli) if cli else 0:.2f} s per `vmreplica enable` "
            f"process, {statistics.mean(api) if api else 0:.3f} s per Site.enable"
        )
        try:
            _progress("  agents started; waiting for every seed to be applied ...")
            seed = await self.seeded()
            _progress(f"  all seeds applied in {seed:.1f} s; idle for {self.args.idle_seconds} s")
            await asyncio.sleep(5)  # the last seeds' heartbeats and first status
            idle_measure = Measurement(self.agents, self.kafka)
            await asyncio.sleep(self.args.idle_seconds)
            idle = idle_measure.done()
            load_start_ms = int(time.time() * 1000)
            _progress(f"  load: {self.args.cycles} intervals of {self.period} s ...")
            load_measure = Measurement(self.agents, self.kafka)
            await self.load()
            await asyncio.sleep(self.period)  # the interval after the last write cuts it
            load = load_measure.done()
            _progress("  waiting for the replica to apply the last writes ...")
            await self.drained(4 * self.period + 60)
            missed_metric = self.agents["replica"].metric_sum(
                "vmreplica_cycles_missed_total", SLOW_VM
            )
            shipped = self.cycles(PRIMARY_SITE, load_start_ms)
            applied = self.cycles(REPLICA_SITE, load_start_ms)
        except BaseException:
            for agent in self.agents.values():
                _progress(
                    f"  {agent.site}'s log, its last warnings and errors:\n{agent.problems()}"
                )
            raise
        finally:
            kept = Path(tempfile.mkdtemp(prefix="vmreplica-scale-logs-"))
            for agent in self.agents.values():
                agent.stop()
                if agent.log.exists():
                    shutil.copy(agent.log, kept / f"{agent.site}-{n}.log")
            _progress(f"  the agents' logs are kept in {kept}")
        missed, wait = 0, 0.0
        for vm in self.names:
            vm_missed, vm_wait = self.missed(vm, shipped.get(vm, []))
            missed += vm_missed
            wait = max(wait, vm_wait)
        slow_cycles = slow_missed = None
        if self.args.slow_vm:
            slow = shipped.get(SLOW_VM, [])
            slow_cycles = len(slow)
            slow_missed = self.missed(SLOW_VM, slow)[0]
        checked, differing = self.verify()
        return Round(
            n,
            self.period,
            self.args.cycles,
            cli,
            api,
            cli_start,
            seed,
            idle,
            load,
            missed,
            missed_metric,
            wait,
            [(done - cut) / 1000 for vm in self.names for _, cut, done in shipped.get(vm, [])],
            [(done - cut) / 1000 for vm in self.names for _, cut, done in applied.get(vm, [])],
            slow_cycles,
            slow_missed,
            checked,
            differing,
        )


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise BenchmarkError(f"{shlex.join(argv)} exited {process.returncode}: {err.decode()}")


# --- report --------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "below target"


def report_round(result: Round, slow_vm: bool) -> None:
    n = result.vms
    print()
    print(f"{n} VMs, one {result.frequency} s interval each, {result.cycles} intervals of load")
    cli = statistics.mean(result.enable_cli_seconds) if result.enable_cli_seconds else 0.0
    api = statistics.mean(result.enable_api_seconds) if result.enable_api_seconds else 0.0
    print(
        f"  enable        : `vmreplica enable` process {cli:.2f} s per VM "
        f"({len(result.enable_cli_seconds)} timed; of which {result.cli_start_seconds:.2f} s is "
        f"starting Python and importing vmreplica); Site.enable {api * 1000:.0f} ms per VM "
        f"(topic creation and the catalog row)"
    )
    print(f"  seeds applied : all {n} in {result.seed_seconds:.1f} s after the agents started")
    print(
        f"  missed cycles : {result.missed_cycles} (gaps between cuts above 1.5 intervals while "
        f"writes waited); replica's vmreplica_cycles_missed_total {result.missed_metric:g}; "
        f"longest gap {result.wait_seconds:.1f} s (on time: one interval)   "
        + (f"target 0 at 100: {_verdict(result.missed_cycles == 0)}" if n <= 100 else "")
    )
    print(
        f"  ship lag      : p50 {percentile(result.ship_lag, 0.5):.2f} s, p99 "
        f"{percentile(result.ship_lag, 0.99):.2f} s ({len(result.ship_lag)} cycles; cut on A to "
        "committed in Kafka)"
    )
    print(
        f"  apply lag     : p50 {percentile(result.apply_lag, 0.5):.2f} s, p99 "
        f"{percentile(result.apply_lag, 0.99):.2f} s ({len(result.apply_lag)} cycles; cut on A "
        "to applied and durable on B)"
    )
    for label, cost in (("idle", result.idle), ("load", result.load)):
        parts = []
        for process, seconds in cost.cpu.items():
            share = seconds / cost.seconds * 100
            per_vm = result.per_vm_minute(cost, process) * 1000
            parts.append(
                f"{process} {seconds:.1f} s ({share:.0f} % of a core, {per_vm:.1f} ms/VM/min)"
            )
        print(f"  CPU {label:<4} {cost.seconds:5.0f} s: " + "; ".join(parts))
    for process in ("primary", "replica"):
        rss = result.load.rss[process]
        print(
            f"  {process:<8} agent: {result.per_vm_cycle(process) * 1000:.1f} ms CPU per VM "
            f"and interval under load; RSS {rss / MiB:.0f} MiB = {rss / n / MiB:.2f} MiB per VM"
        )
    if slow_vm:
        print(
            f"  slow VM       : {result.slow_vm_cycles} cycles shipped, {result.slow_vm_missed} "
            f"missed (its hook sleeps 1.5 intervals); the others: {result.missed_cycles} missed, "
            f"longest gap {result.wait_seconds:.1f} s   target no other VM delayed: "
            f"{_verdict(result.missed_cycles == 0 and result.on_time)}"
        )
    check = "" if not result.differing_ranges else "  REPLICA DIFFERS"
    print(
        f"  replica images: {result.verified_ranges - result.differing_ranges} of "
        f"{result.verified_ranges} written ranges read back equal{check}"
    )


def report_growth(rounds: list[Round]) -> None:
    if len(rounds) < 2:
        return
    small, large = min(rounds, key=lambda r: r.vms), max(rounds, key=lambda r: r.vms)
    print()
    print(
        f"cost per VM from {small.vms} to {large.vms} VMs "
        f"(target: at most linear, ratio <= {LINEAR_ALLOWANCE}):"
    )
    for process in ("primary", "replica"):
        for label, before, after in (
            ("CPU under load", small.per_vm_cycle(process), large.per_vm_cycle(process)),
            (
                "CPU idle",
                small.per_vm_minute(small.idle, process),
                large.per_vm_minute(large.idle, process),
            ),
            ("RSS", small.load.rss[process] / small.vms, large.load.rss[process] / large.vms),
        ):
            ratio = after / before if before else float("inf")
            print(
                f"  {process:<8} {label:<15}: ratio {ratio:.2f}  "
                f"{_verdict(ratio <= LINEAR_ALLOWANCE)}"
            )
    if "broker" in small.load.cpu:
        ratio = (large.load.cpu["broker"] / large.vms) / (small.load.cpu["broker"] / small.vms)
        print(
            f"  broker   CPU under load : ratio {ratio:.2f}  {_verdict(ratio <= LINEAR_ALLOWANCE)}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--vms", type=int, nargs="+", default=[100, 300], help="VMs per round")
    parser.add_argument("--cycles", type=int, default=4, help="intervals of load per round")
    parser.add_argument(
        "--frequency",
        type=int,
        choices=(30, 300, 900),
        default=30,
        help="the VMs' replication interval, seconds (30 is the shortest the product allows)",
    )
    parser.add_argument("--disk-mib", type=int, default=32, help="each VM's sparse disk, MiB")
    parser.add_argument(
        "--write-kib",
        type=int,
        default=32,
        help=f"each write; a VM gets {WRITES_PER_INTERVAL} per interval, then a FLUSH",
    )
    parser.add_argument("--idle-seconds", type=int, default=30, help="idle window before the load")
    parser.add_argument(
        "--cli-sample", type=int, default=3, help="VMs enabled with `vmreplica enable` processes"
    )
    parser.add_argument(
        "--slow-vm", action="store_true", help="add a VM whose pre-cut hook sleeps 1.5 intervals"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.write_kib * KiB * WRITES_PER_INTERVAL * args.cycles > args.disk_mib * MiB:
        parser.error(
            f"{WRITES_PER_INTERVAL} times --write-kib times --cycles must fit in --disk-mib"
        )
    command = shlex.join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]])
    print(f"reproduce: {command}", flush=True)
    rounds: list[Round] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vmrs-") as directory:
            workdir = Path(directory)
            with broker(workdir, "benchmarks/scale.py") as kafka:
                print(f"broker: {kafka.description}", flush=True)
                for vms in args.vms:
                    result = asyncio.run(ScaleRound(workdir, kafka, vms, args).run())
                    report_round(result, args.slow_vm)
                    rounds.append(result)
    except Exception as error:  # any failure means "could not run"
        print(f"scale benchmark could not run: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    report_growth(rounds)
    print(f"\nreproduce: {command}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rounds], indent=2))
    return 1 if any(r.differing_ranges for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
