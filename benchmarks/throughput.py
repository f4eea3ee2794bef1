"""Benchmark vmreplica's replication throughput against Kafka's own producer, on one broker.

    .venv/bin/python benchmarks/throughput.py [--mib 512] [--cycles 8] [--replica process|inline]
                                              [--repeat 3] [--serial] [--hot-cycles 2]
                                              [--json results.json]

Three measurements, all in one run on the same broker:

(a) end-to-end MiB/s: bytes written through the capture API (``CapturedVm.write_sync``) from
    the first write until the replica has applied and fsynced the last cycle (undo log sealed,
    image fsynced, position recorded), for 64 KiB random writes and for 1 MiB sequential writes,
    each cycle cut and shipped with ``PrimaryVm.replicate`` as the agent's continuous mode does
    (by default every 64 MiB, its ``continuous_max_bytes``).
    By default the VM goes on writing the next cycle while the last one ships, as it does under
    the agent (``--serial``: writes stop while a cycle ships). The replica runs as a separate
    process (``--replica process``: another site on the same machine and broker, applying cycle
    N while the primary works on cycle N+1) or in the benchmark's own event loop (``--replica
    inline``). All data comes from ``os.urandom``, so zstd cannot flatter the numbers. The
    workloads run in ``--repeat`` rounds (default 3), each printed; the median counts;
(b) Kafka's ``ProducerPerformance`` (1 MiB records, acks=all) on a topic configured like a
    journal, at the start of every round, and the ratio of each (a) to its round's (b)
    (target >= 0.5 for the median ratio): on a shared machine the reference moves as much as
    our figures, so each is compared with what Kafka's own producer did in the same minutes;
(c) wire bytes per unique byte for a hot spot: the same 16 MiB rewritten 50 times per cycle
    (target <= 1.1); wire bytes are the encoded records the shipper published
    (``ShippedCycle.wire_bytes``).

The broker and the clients are warmed up first (a short ProducerPerformance and a short run of
(a), both discarded). CPU seconds per GiB of each process are printed beside the figures. The
replica images are compared with the primary's disks (SHA-256) after every run. A broker is
started on a free port (``LocalCluster``) unless ``VMREPLICA_BOOTSTRAP_SERVERS`` names one, and
stopped at the end. Exit status: 0 when everything ran (a missed target prints "below target");
1 when the benchmark could not run, or a replica came out different from its primary. Set
``VMREPLICA_BENCH_PROFILE=<folder>`` to get cProfile statistics of the primary (this process)
and of each replica process written there.

About 850 lines, one script: the workloads, the reference run, the replica processes and the report
must be read together to trust a ratio it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.devtools.jars import resolve_kafka
from vmreplica.devtools.measuring import Broker, broker, cpu_seconds
from vmreplica.domain.model import VmSettings
from vmreplica.journal.kafka import MAX_RECORD_BYTES, KafkaConnection, TopicAdmin
from vmreplica.journal.topics import journal_spec
from vmreplica.producers.primary import PrimaryVm
from vmreplica.producers.shipper import ShippedCycle
from vmreplica.runtime.site import Site
from vmreplica.security.authorization import AuthorizationEntry, AuthorizationStore
from vmreplica.security.signing import load_site_key
from vmreplica.security.sites import add_site
from vmreplica.storage.image import sha256_of

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
WORKLOADS: Final = ("64 KiB random", "1 MiB sequential")
RATIO_TARGET: Final = 0.5
"""End-to-end MiB/s as a fraction of ProducerPerformance's."""
WIRE_TARGET: Final = 1.1
"""Wire bytes per unique byte for the hot-spot workload."""
HOT_SPOT_BYTES: Final = 16 * MiB
HOT_SPOT_REWRITES: Final = 50
HOT_SPOT_WRITE_BYTES: Final = 64 * KiB
WRITE_YIELD_BYTES: Final = MiB
WARM_UP_RECORDS: Final = 1024
CYCLE_BYTES: Final = VmSettings().continuous_max_bytes
"""The agent's continuous mode cuts a cycle whenever the change log holds this much."""
REPLICA_TIMEOUT_SECONDS: Final = 600.0
PRIMARY_SITE: Final = "site-a"
REPLICA_SITE: Final = "site-b"
SITES: Final = (PRIMARY_SITE, REPLICA_SITE)


class BenchmarkError(RuntimeError):
    """The benchmark could not run (as opposed to a missed target)."""


@dataclass(frozen=True)
class EndToEnd:
    workload: str
    bytes_written: int
    cycles: int
    seconds: float
    primary_seconds: float
    wire_bytes: int
    identical: bool
    cpu: dict[str, float]
    """CPU seconds (user + system) in the timed window: primary, replica, broker."""

    @property
    def mib_per_s(self) -> float:
        return self.bytes_written / MiB / self.seconds

    @property
    def primary_mib_per_s(self) -> float:
        return self.bytes_written / MiB / self.primary_seconds


@dataclass(frozen=True)
class HotSpot:
    unique_bytes: int
    bytes_written: int
    cycles: int
    wire_bytes: int
    identical: bool
    degraded_cycles: int
    """Cycles whose capture fell back to the dirty-block map (the change log's budget)."""

    @property
    def ratio(self) -> float:
        return self.wire_bytes / self.unique_bytes


# --- broker --------------------------------------------------------------------------------------


# --- (b) Kafka's own producer --------------------------------------------------------------------

_PERF_SUMMARY: Final = re.compile(r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\)")


async def _create_topic(bootstrap: str, name: str) -> None:
    async with TopicAdmin(KafkaConnection(bootstrap, client_id="bench")) as admin:
        await admin.ensure_topic(journal_spec(name, 1))


@dataclass(frozen=True)
class KafkaBaseline:
    records: int
    mib_per_s: float
    cpu: dict[str, float]
    """CPU seconds of the producer JVM (start-up included) and of the broker."""


def producer_performance(kafka: Broker, records: int) -> KafkaBaseline:
    """``ProducerPerformance`` with 1 MiB records, acks=all, on a journal-like topic."""
    bootstrap = kafka.bootstrap_servers
    topic = f"bench-producer-perf-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_topic(bootstrap, topic))
    children, broker_cpu = resource.getrusage(resource.RUSAGE_CHILDREN), kafka.cpu_seconds()
    command = [
        "java", "-Xmx1g", "-cp", f"{resolve_kafka()}/*",
        "org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
        "--num-records", str(records), "--record-size", str(MiB), "--throughput", "-1",
        "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all",
        f"max.request.size={MAX_RECORD_BYTES}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"producer": after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime}
    if kafka.pids:
        cpu["broker"] = kafka.cpu_seconds() - broker_cpu
    summaries = _PERF_SUMMARY.findall(result.stdout)
    if result.returncode != 0 or not summaries:
        tail = (result.stdout + result.stderr).strip().splitlines()[-10:]
        raise BenchmarkError("ProducerPerformance failed:\n  " + "\n  ".join(tail))
    sent, _, mib_per_s = summaries[-1]
    if int(sent) != records:
        raise BenchmarkError(f"ProducerPerformance sent {sent} of {records} records")
    # Its "MB" is 2^20 bytes: records/s * record size / 1024 / 1024.
    return KafkaBaseline(records, float(mib_per_s), cpu)


# --- the replica ---------------------------------------------------------------------------------


SECURITY_FILE: Final = "security.json"
"""In a run's folder when it runs secured: each site's client settings (SASL_SSL), read by
both sites, the replica process included."""


def _site_config(root: Path, site: str, bootstrap: str, group: str) -> SiteConfig:
    secured = root / SECURITY_FILE
    extra = json.loads(secured.read_text())[site] if secured.is_file() else {}
    return SiteConfig(
        site=site, root=root / site, bootstrap_servers=bootstrap, trust_group=group, **extra
    )


@dataclass(frozen=True)
class Secured:
    """A run with security on: a secured broker (TLS, SCRAM, ACLs) where each site logs in as
    its own user, every record verified against authorization entries, payloads encrypted.
    Without ``admin`` the broker is a plain one (the journal's security alone); without
    ``journal`` the journal is neither verified nor encrypted (the transport's alone)."""

    admin: KafkaConnection | None
    ca_file: Path | None
    journal: bool = True

    async def prepare(self, root: Path, group: str) -> None:
        """Users and grants of both sites for ``group``, their settings in the run's folder,
        and authorization entries both ways (so each site verifies the other's records and
        the primary can wrap the VM's payload key for the replica)."""
        if self.admin is not None and self.ca_file is not None:
            await self._logins(root, group)
        if self.journal:
            keys = {site: load_site_key(root / site).public_text for site in SITES}
            for site, partner in ((PRIMARY_SITE, REPLICA_SITE), (REPLICA_SITE, PRIMARY_SITE)):
                storage = root / site / "vms"  # the replica's images where an open site has them
                AuthorizationStore(root / site).add(
                    AuthorizationEntry(partner, group, str(storage), (keys[partner],))
                )

    async def _logins(self, root: Path, group: str) -> None:
        assert self.admin is not None
        assert self.ca_file is not None
        settings = {}
        for site in SITES:
            password = root / f"{site}.password"
            access = await add_site(self.admin, self.ca_file, site, group, password, user=site)
            settings[site] = {
                k: v for k, v in access.settings().items() if k not in ("bootstrap_servers",)
            }
            settings[site].pop("trust_group")
        (root / SECURITY_FILE).write_text(json.dumps(settings))


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def replica_worker(root: Path, bootstrap: str, group: str, cycles: int) -> int:
    """The replica site as its own process: adopt the VM, apply the seed, say "ready", then
    apply ``cycles`` cycles, printing a JSON line with the time each one became durable."""
    async with Site(_site_config(root, REPLICA_SITE, bootstrap, group)) as site:
        adopted = await site.discover()
        while not adopted:
            await asyncio.sleep(0.1)
            adopted = await site.discover()
        async with await site.replica(adopted[0]) as replica:
            start = await replica.catch_up(REPLICA_TIMEOUT_SECONDS)
            _emit(event="ready", cycle=start, cpu=cpu_seconds())
            applied = start
            while applied < start + cycles:
                await replica.step()
                if replica.violation is not None:
                    _emit(event="violation", message=str(replica.violation))
                    return 1
                if replica.materializer.cursor.cycle != applied:
                    applied = replica.materializer.cursor.cycle
                    _emit(event="applied", cycle=applied, at=time.time(), cpu=cpu_seconds())
    return 0


class ReplicaProcess:
    """The replica worker as a subprocess of this benchmark."""

    def __init__(self, root: Path, bootstrap: str, group: str, cycles: int) -> None:
        self.arguments = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--replica-worker",
            str(root),
            bootstrap,
            group,
            str(cycles),
        ]
        self.cycles = cycles
        self.start_cycle = 0
        self.start_cpu = 0.0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it has applied the seed."""
        self.process = await asyncio.create_subprocess_exec(
            *self.arguments, stdout=asyncio.subprocess.PIPE
        )
        ready = await self._next("ready")
        self.start_cycle, self.start_cpu = int(ready["cycle"]), ready["cpu"]

    async def _next(self, event: str) -> dict[str, float]:
        if self.process is None or self.process.stdout is None:
            raise BenchmarkError("the replica process is not running")
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), REPLICA_TIMEOUT_SECONDS)
            if not line:
                code = await self.process.wait()
                raise BenchmarkError(f"the replica process exited ({code}) before {event}")
            message = json.loads(line)
            if message["event"] == "violation":
                raise BenchmarkError(f"the replica stopped: {message['message']}")
            if message["event"] == event:
                return {k: v for k, v in message.items() if k != "event"}

    async def applied_all(self) -> tuple[float, float]:
        """When the last of its cycles was durably applied, and its CPU seconds since ready."""
        while True:
            message = await self._next("applied")
            if message["cycle"] >= self.start_cycle + self.cycles:
                return message["at"], message["cpu"] - self.start_cpu

    async def stop(self, wait_seconds: float = 60.0) -> None:
        """Let it finish (it exits after its last cycle), or kill it after ``wait_seconds``."""
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), wait_seconds)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# --- (a) and (c): workloads ----------------------------------------------------------------------


def random_64k(total: int, disk_size: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    slots = disk_size // (64 * KiB)
    return [generator.randrange(slots) * 64 * KiB for _ in range(total // (64 * KiB))]


class Run:
    """One VM replicated from a fresh primary site to a fresh replica site."""

    def __init__(
        self,
        workdir: Path,
        bootstrap: str,
        disk_size: int,
        name: str,
        secured: Secured | None = None,
    ) -> None:
        self.root = workdir / name
        self.bootstrap = bootstrap
        self.group = f"bench{uuid.uuid4().hex[:8]}"
        self.vm = name
        self.disk = self.root / "disk0.img"
        self.disk_size = disk_size
        self.secured = secured

    async def __aenter__(self) -> Run:
        self.root.mkdir(parents=True)
        with self.disk.open("wb") as file:
            file.truncate(self.disk_size)
        if self.secured is not None:
            await self.secured.prepare(self.root, self.group)
        self.site = Site(_site_config(self.root, PRIMARY_SITE, self.bootstrap, self.group))
        await self.site.start()
        encrypt = self.secured is not None and self.secured.journal
        settings = VmSettings(frequency_seconds=0, encrypt=encrypt)
        record = await self.site.enable(self.vm, {"disk0": self.disk}, REPLICA_SITE, settings)
        self.primary: PrimaryVm = self.site.primary(record)
        await self.primary.start()
        await self.primary.initial_replication()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.primary.stop()
        await self.site.stop()

    def replica_image(self) -> Path:
        return (
            _site_config(self.root, REPLICA_SITE, self.bootstrap, self.group).vm_folder(self.vm)
            / "disks"
            / "disk0.img"
        )

    def identical(self) -> bool:
        return sha256_of(self.disk) == sha256_of(self.replica_image())


Plan = list[list[tuple[int, memoryview]]]
"""The writes of each cycle: (disk offset, data)."""


async def _write(primary: PrimaryVm, writes: list[tuple[int, memoryview]]) -> None:
    """Write through the capture API, letting the event loop run every MiB or so (as it does
    between the requests of an NBD client), so that shipping goes on meanwhile."""
    capture = primary.capture
    disk = capture.disk("disk0")
    unyielded = 0
    for offset, data in writes:
        capture.write_sync(disk, offset, data)
        unyielded += len(data)
        if unyielded >= WRITE_YIELD_BYTES:
            unyielded = 0
            await asyncio.sleep(0)


async def drive(primary: PrimaryVm, plan: Plan, overlap: bool) -> list[ShippedCycle]:
    """Write each cycle of ``plan``, cut it and ship it with ``PrimaryVm.replicate``.

    With ``overlap`` the VM goes on writing the next cycle while the last one ships, as it
    does under the agent; the cut of cycle N+1 waits until cycle N has shipped (replicate holds
    a lock), so at most one cycle is in flight. Without it, writes stop while a cycle ships.
    """
    shipped: list[ShippedCycle] = []
    if not overlap:
        for writes in plan:
            await _write(primary, writes)
            shipped += await primary.replicate()
        return shipped
    shipping: asyncio.Task[list[ShippedCycle]] | None = None
    for writes in plan:
        await _write(primary, writes)
        if shipping is not None:
            shipped += await shipping
        before = primary.capture.log.cycle
        shipping = asyncio.create_task(primary.replicate())
        while primary.capture.log.cycle == before and not shipping.done():  # noqa: ASYNC110
            await asyncio.sleep(0)  # until the cut: later writes belong to the next cycle
    if shipping is not None:
        shipped += await shipping
    return shipped


async def end_to_end(
    workdir: Path,
    kafka: Broker,
    workload: str,
    total: int,
    cycles: int,
    replica_mode: str,
    overlap: bool,
    name: str | None = None,
    secured: Secured | None = None,
) -> EndToEnd:
    per_cycle = -(-total // cycles)
    # Large enough that the change log never reaches its default budget (a tenth of the disks)
    # and degrades to a dirty-block map; the image is sparse, so the size costs nothing.
    disk_size = max(1024 * MiB, 16 * per_cycle, total)
    data = memoryview(os.urandom(total))  # before the clock starts
    if workload == "64 KiB random":
        offsets = random_64k(total, max(1024 * MiB, total), seed=1)
        writes = [
            (offset, data[i * 64 * KiB : (i + 1) * 64 * KiB]) for i, offset in enumerate(offsets)
        ]
    else:
        writes = [(position, data[position : position + MiB]) for position in range(0, total, MiB)]
    writes_per_cycle = -(-len(writes) // cycles)
    plan = [writes[i : i + writes_per_cycle] for i in range(0, len(writes), writes_per_cycle)]
    name = name or ("rand64k" if workload.startswith("64") else "seq1m")
    async with Run(workdir, kafka.bootstrap_servers, disk_size, name, secured) as run:
        os.sync()  # start from clean page cache state, so earlier runs' writeback isn't billed
        if replica_mode == "process":
            timing = await _with_process(run, plan, kafka.pids, overlap)
        else:
            timing = await _inline(run, plan, kafka.pids, overlap)
        if run.primary.capture.degraded_cycles:
            raise BenchmarkError("the change log reached its budget; the run is not comparable")
        identical = run.identical()
    return EndToEnd(
        workload,
        total,
        len(plan),
        timing.finished - timing.started,
        timing.primary_done - timing.started,
        sum(c.wire_bytes for c in timing.shipped),
        identical,
        timing.cpu,
    )


@dataclass
class Timing:
    started: float
    primary_done: float = 0.0
    finished: float = 0.0
    shipped: list[ShippedCycle] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Wall time and CPU seconds of this process and the broker from the first write on."""

    def __init__(self, broker_pids: tuple[int, ...]) -> None:
        self.broker_pids = broker_pids
        self.timing = Timing(time.time())
        self.cpu = cpu_seconds()
        self.broker = sum(map(cpu_seconds, broker_pids))

    async def ship(self, primary: PrimaryVm, plan: Plan, overlap: bool) -> None:
        self.timing.shipped = await drive(primary, plan, overlap)
        self.timing.primary_done = time.time()

    def stop(self, finished: float) -> Timing:
        self.timing.finished = finished
        self.timing.cpu["primary"] = cpu_seconds() - self.cpu
        if self.broker_pids:
            self.timing.cpu["broker"] = sum(map(cpu_seconds, self.broker_pids)) - self.broker
        return self.timing


async def _with_process(
    run: Run, plan: Plan, broker_pids: tuple[int, ...], overlap: bool
) -> Timing:
    """The replica in its own process: it applies cycle N while the primary ships cycle N+1."""
    replica = ReplicaProcess(run.root, run.bootstrap, run.group, len(plan))
    try:
        await replica.start()
        clock = _Clock(broker_pids)
        await clock.ship(run.primary, plan, overlap)
        finished, replica_cpu = await replica.applied_all()
        timing = clock.stop(finished)
        timing.cpu["replica"] = replica_cpu
    except BaseException:
        await replica.stop(wait_seconds=0)
        raise
    await replica.stop()
    return timing


async def _inline(run: Run, plan: Plan, broker_pids: tuple[int, ...], overlap: bool) -> Timing:
    """Both sites in this event loop: the replica applies while the primary awaits Kafka."""
    async with Site(_site_config(run.root, REPLICA_SITE, run.bootstrap, run.group)) as site:
        record = (await site.discover())[0]
        async with await site.replica(record) as replica:
            start = await replica.catch_up(REPLICA_TIMEOUT_SECONDS)
            target = start + len(plan)

            async def apply() -> float:
                while replica.materializer.cursor.cycle < target:
                    await replica.step(0.05)
                    if replica.violation is not None:
                        raise BenchmarkError(f"the replica stopped: {replica.violation}")
                return time.time()

            clock = _Clock(broker_pids)
            applying = asyncio.create_task(apply())
            try:
                await clock.ship(run.primary, plan, overlap)
                finished = await asyncio.wait_for(applying, REPLICA_TIMEOUT_SECONDS)
            finally:
                applying.cancel()
                with contextlib.suppress(asyncio.CancelledError, BenchmarkError):
                    await applying
    timing = clock.stop(finished)
    timing.cpu["primary+replica"] = timing.cpu.pop("primary")
    return timing


async def hot_spot(workdir: Path, bootstrap: str, cycles: int) -> HotSpot:
    """The same 16 MiB rewritten 50 times per cycle, in 64 KiB writes in random order."""
    pool = memoryview(os.urandom(4 * HOT_SPOT_BYTES))
    generator = random.Random(2)
    slots = list(range(0, HOT_SPOT_BYTES, HOT_SPOT_WRITE_BYTES))
    base = 256 * MiB
    plan: Plan = []
    for _ in range(cycles):
        writes = []
        for _ in range(HOT_SPOT_REWRITES):
            generator.shuffle(slots)
            for slot in slots:
                source = generator.randrange(0, len(pool) - HOT_SPOT_WRITE_BYTES, 4 * KiB)
                writes.append((base + slot, pool[source : source + HOT_SPOT_WRITE_BYTES]))
        plan.append(writes)
    written = sum(len(data) for writes in plan for _, data in writes)
    # A disk of 16 GiB gives the change log a budget (a tenth) above the 800 MiB of a cycle.
    async with Run(workdir, bootstrap, 16 * GiB, "hotspot") as run:
        shipped = await drive(run.primary, plan, overlap=False)
        degraded = run.primary.capture.degraded_cycles
        async with Site(_site_config(run.root, REPLICA_SITE, bootstrap, run.group)) as site:
            record = (await site.discover())[0]
            async with await site.replica(record) as replica:
                await replica.catch_up(REPLICA_TIMEOUT_SECONDS)
                if replica.violation is not None:
                    raise BenchmarkError(f"the replica stopped: {replica.violation}")
        identical = run.identical()
    return HotSpot(
        HOT_SPOT_BYTES * cycles,
        written,
        cycles,
        sum(c.wire_bytes for c in shipped),
        identical,
        degraded,
    )


# --- report --------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "below target"


def _cpu_per_gib(cpu: dict[str, float], nbytes: int) -> str:
    return ", ".join(f"{name} {seconds * GiB / nbytes:.1f}" for name, seconds in cpu.items())


def _median_run(repeats: list[EndToEnd], ratios: list[float]) -> tuple[EndToEnd, float]:
    """The run of median ratio (the lower middle one of an even count), and that ratio."""
    order = sorted(range(len(repeats)), key=lambda i: ratios[i])
    middle = order[(len(order) - 1) // 2]
    return repeats[middle], ratios[middle]


def report(
    kafka: list[KafkaBaseline],
    all_runs: list[list[EndToEnd]],
    hot: HotSpot | None,
    description: str,
    args: argparse.Namespace,
) -> None:
    where = (
        "a separate process (another site on this machine)"
        if args.replica == "process"
        else "the benchmark's own event loop (both sites in one process)"
    )
    pacing = (
        "the VM goes on writing the next cycle while the last one ships (as under the agent)"
        if not args.serial
        else "writes stop while each cycle ships"
    )
    load = os.getloadavg()
    print()
    print("vmreplica throughput")
    print(f"  broker : {description}")
    print("  data   : os.urandom, incompressible — zstd cannot flatter these numbers")
    print(f"  replica: {where}")
    print(f"  primary: {pacing}")
    print(f"  machine: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(
        "  MiB = 2^20 bytes; ProducerPerformance's 'MB/sec' is the same unit; the broker and "
        "both clients were warmed up first"
    )
    print()
    print(
        "every round: (b) Kafka ProducerPerformance, 1 MiB records, acks=all, then (a) end to "
        "end: capture API -> Kafka transaction per cycle -> replica image fsynced"
    )
    for number, baseline in enumerate(kafka):
        print(
            f"  round {number + 1}: (b) {baseline.mib_per_s:7.1f} MiB/s (CPU s/GiB: "
            f"{_cpu_per_gib(baseline.cpu, baseline.records * MiB)}; the producer's includes "
            "JVM start-up)"
        )
        for repeats in all_runs:
            if number < len(repeats):
                run = repeats[number]
                check = "" if run.identical else "  REPLICA DIFFERS"
                print(
                    f"           (a) {run.workload:<16} {run.mib_per_s:7.1f} MiB/s "
                    f"= {run.mib_per_s / baseline.mib_per_s:.2f} x (b); primary "
                    f"{run.primary_mib_per_s:.1f} MiB/s; CPU s/GiB: "
                    f"{_cpu_per_gib(run.cpu, run.bytes_written)}{check}"
                )
    print()
    reference = statistics.median(k.mib_per_s for k in kafka)
    print(f"median of {len(kafka)} rounds; (b) ProducerPerformance {reference:.1f} MiB/s")
    print(
        f"    {'workload':<16} {'written':>9} {'cycles':>6} {'MiB/s':>8} {'wire/B':>7} "
        f"{'vs Kafka':>8}  target >= {RATIO_TARGET}"
    )
    for repeats in all_runs:
        ratios = [r.mib_per_s / k.mib_per_s for r, k in zip(repeats, kafka, strict=False)]
        run, ratio = _median_run(repeats, ratios)
        median = statistics.median(r.mib_per_s for r in repeats)
        print(
            f"    {run.workload:<16} {run.bytes_written // MiB:>5} MiB {run.cycles:>6} "
            f"{median:>8.1f} {run.wire_bytes / run.bytes_written:>7.3f} {ratio:>8.2f}  "
            f"{_verdict(ratio >= RATIO_TARGET)}; CPU s/GiB of the median run: "
            f"{_cpu_per_gib(run.cpu, run.bytes_written)}"
        )
    print(
        "    (vs Kafka: the median of each round's ratio to its own ProducerPerformance; "
        "wire/B: bytes of published records per byte written)"
    )
    if hot is not None:
        print()
        print(
            f"(c) hot spot: {HOT_SPOT_BYTES // MiB} MiB rewritten {HOT_SPOT_REWRITES} times per "
            f"cycle in 64 KiB writes, {hot.cycles} cycles ({hot.bytes_written // MiB} MiB "
            f"written, {hot.unique_bytes // MiB} MiB unique)"
        )
        check = "" if hot.identical else "  REPLICA DIFFERS"
        print(
            f"    wire bytes {hot.wire_bytes:,} / unique bytes {hot.unique_bytes:,} = "
            f"{hot.ratio:.4f}  target <= {WIRE_TARGET}: {_verdict(hot.ratio <= WIRE_TARGET)}"
            f"{check}"
        )
        if hot.degraded_cycles:
            print(
                f"    ({hot.degraded_cycles} cycles reached the change-log budget and shipped "
                "dirty blocks from the image)"
            )
    print(f"reproduce: {shlex.join([sys.executable, *sys.argv])}")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _warm_up(workdir: Path, kafka: Broker, args: argparse.Namespace) -> None:
    """One short run, so that neither the broker's JIT nor first-use costs land in a figure."""
    await end_to_end(
        workdir, kafka, WORKLOADS[1], 128 * MiB, 4, args.replica, not args.serial, name="warmup"
    )


async def _workloads(
    workdir: Path,
    kafka: Broker,
    args: argparse.Namespace,
) -> tuple[list[KafkaBaseline], list[list[EndToEnd]], HotSpot | None]:
    """``--repeat`` rounds of ProducerPerformance and then each workload; returns every
    baseline, and every run by workload."""
    workloads = [w for w in WORKLOADS if not args.only or args.only in w]
    runs: list[list[EndToEnd]] = [[] for _ in workloads]
    baselines: list[KafkaBaseline] = []
    for attempt in range(args.repeat):
        baselines.append(await asyncio.to_thread(_kafka_baseline, kafka, args.kafka_records))
        for index, workload in enumerate(workloads):
            name = f"{'rand64k' if workload.startswith('64') else 'seq1m'}-{attempt}"
            run = await end_to_end(
                workdir,
                kafka,
                workload,
                args.mib * MiB,
                args.cycles,
                args.replica,
                not args.serial,
                name,
            )
            _progress(f"  {workload}: {run.mib_per_s:.1f} MiB/s end to end")
            runs[index].append(run)
    hot = (
        await hot_spot(workdir, kafka.bootstrap_servers, args.hot_cycles)
        if args.hot_cycles
        else None
    )
    return baselines, runs, hot


def _kafka_baseline(kafka: Broker, records: int) -> KafkaBaseline:
    os.sync()
    baseline = producer_performance(kafka, records)
    _progress(f"  Kafka ProducerPerformance: {baseline.mib_per_s:.1f} MiB/s")
    return baseline


@contextlib.contextmanager
def profiled(name: str) -> Iterator[None]:
    """With ``$VMREPLICA_BENCH_PROFILE`` set to a folder, write cProfile stats of this block."""
    folder = os.environ.get("VMREPLICA_BENCH_PROFILE")
    if not folder:
        yield
        return
    import cProfile  # noqa: PLC0415 — only when profiling

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        Path(folder).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(Path(folder) / f"{name}-{os.getpid()}.prof")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--replica-worker":
        _, _, root, bootstrap, group, cycles = sys.argv
        with profiled("replica"):
            return asyncio.run(replica_worker(Path(root), bootstrap, group, int(cycles)))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB written per end-to-end run")
    parser.add_argument(
        "--cycles",
        type=int,
        help="cycles per end-to-end run (default: one per "
        f"{CYCLE_BYTES // MiB} MiB, the agent's continuous-mode cycle size)",
    )
    parser.add_argument("--replica", choices=("process", "inline"), default="process")
    parser.add_argument("--hot-cycles", type=int, default=2, help="hot-spot cycles (0: skip)")
    parser.add_argument(
        "--kafka-records", type=int, default=512, help="1 MiB records ProducerPerformance sends"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of ProducerPerformance and each end-to-end workload; the median counts",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="stop writing while each cycle ships (default: overlap, as a VM)",
    )
    parser.add_argument(
        "--only", choices=("random", "sequential"), help="run only this end-to-end workload"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.cycles = args.cycles or max(2, args.mib * MiB // CYCLE_BYTES)
    try:
        with tempfile.TemporaryDirectory(prefix="vmreplica-throughput-") as directory:
            workdir = Path(directory)
            with broker(workdir) as kafka_broker:
                _progress("warming up the broker and the clients ...")
                producer_performance(kafka_broker, WARM_UP_RECORDS)
                asyncio.run(_warm_up(workdir, kafka_broker, args))
                with profiled("primary"):
                    kafka, runs, hot = asyncio.run(_workloads(workdir, kafka_broker, args))
    except Exception as error:  # any failure means "could not run"
        print(
            f"throughput benchmark could not run: {type(error).__name__}: {error}", file=sys.stderr
        )
        return 1
    report(kafka, runs, hot, kafka_broker.description, args)
    invalid = [r.workload for repeats in runs for r in repeats if not r.identical] + (
        ["hot spot"] if hot is not None and not hot.identical else []
    )
    if invalid:
        print(
            f"throughput benchmark is invalid: the replica differs from the primary after "
            f"{', '.join(invalid)}",
            file=sys.stderr,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "kafka_producer_performance": [asdict(k) for k in kafka],
                    "end_to_end": [
                        {
                            **asdict(r),
                            "mib_per_s": r.mib_per_s,
                            "ratio_to_kafka": r.mib_per_s / k.mib_per_s,
                        }
                        for repeats in runs
                        for r, k in zip(repeats, kafka, strict=False)
                    ],
                    "hot_spot": None if hot is None else {**asdict(hot), "ratio": hot.ratio},
                    "replica": args.replica,
                    "overlap": not args.serial,
                },
                indent=2,
            )
        )
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
