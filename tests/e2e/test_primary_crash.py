"""A primary killed with SIGKILL loses no acknowledged write and never duplicates or skips a cycle.

The primary runs in its own process (``tests/e2e/primary_worker.py``): deterministic writes,
zeros and trims over two disks, ``flush()`` after each small group (printing ``flushed <n>``) and
``replicate()`` every third group. It is killed at random instants — nearly always with flushed
writes captured but not shipped, sometimes inside ``replicate()`` — and, deterministically, at
three instants of shipping a cycle: after the cut but before publishing, with the cycle's batches
on the broker but not its commit, and after the commit but before the catalog records it.

After every kill the primary is restarted in this process (the change log replays into the
images, the shipper reconciles with the journal), ``replicate()`` ships what was left, and the
replica (also in this process) catches up. Then:

- the primary's and the replica's disks hash exactly like an in-memory model after the first
  ``k`` operations, for some ``k`` at least the count acknowledged by the last ``flushed`` line
  (no acknowledged write lost; crash consistency: a prefix of the writes, nothing torn);
- at the end, the CycleCommits on the journal (read_committed) are numbered first, first + 1, …
  without a duplicate or a gap, no WriteBatch appears twice, and the replica applied the last.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
from pathlib import Path
from typing import Final

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.e2e.primary_worker import DISKS, MAX_GROUP, apply_to, operation
from tests.fixtures import SiteFactory, VmFactory
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import JournalReader, KafkaConnection
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import CycleCommit, WriteBatch
from vmreplica.storage.image import sha256_of

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

VM: Final = "vm-pcrash"
RANDOM_KILLS: Final = 9
TRIALS: Final = (
    "random",
    "before-publish",
    "random",
    "mid-transaction",
    "random",
    "after-publish",
    *(["random"] * (RANDOM_KILLS - 3)),
)
REPO_ROOT: Final = Path(__file__).resolve().parents[2]

Model = dict[str, bytearray]
BatchIds = list[tuple[int, int]]
"""(cycle, batch index) of WriteBatches."""


def _digests(model: Model) -> dict[str, str]:
    return {disk: hashlib.sha256(data).hexdigest() for disk, data in model.items()}


async def _run_worker(
    config_file: Path, seed: int, start: int, crash: str, rng: random.Random
) -> tuple[int, bytes]:
    """Run the worker until it is killed; return the last acknowledged count and its output."""
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.primary_worker",
        str(config_file),
        VM,
        str(seed),
        str(start),
        *([] if crash == "random" else [crash]),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert worker.stdout is not None
    output = bytearray()
    acknowledged = start
    kill_after = rng.randint(1, 40)
    flushes = 0
    try:
        async with asyncio.timeout(120):
            while line := await worker.stdout.readline():
                output += line
                if line.startswith(b"flushed "):
                    acknowledged = int(line.split()[1])
                    flushes += 1
                    if crash == "random" and flushes == kill_after:
                        await asyncio.sleep(rng.uniform(0, 0.02))
                        worker.kill()
            await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == -signal.SIGKILL, output.decode(errors="replace")[-3000:]
    return acknowledged, bytes(output)


def _find_prefix(
    model: Model, seed: int, done: int, acknowledged: int, wanted: dict[str, str]
) -> int | None:
    """Advance ``model`` to the prefix ``k >= acknowledged`` hashing like ``wanted``."""
    for index in range(done, acknowledged):
        apply_to(model, operation(seed, index))
    candidate = {disk: bytearray(data) for disk, data in model.items()}
    for k in range(acknowledged, acknowledged + MAX_GROUP + 1):
        if _digests(candidate) == wanted:
            for index in range(acknowledged, k):
                apply_to(model, operation(seed, index))
            return k
        apply_to(candidate, operation(seed, k))
    return None


async def _journal(connection: KafkaConnection, topic: str) -> tuple[list[int], BatchIds]:
    """CycleCommit cycle numbers and (cycle, batch) of WriteBatches, in journal order."""
    commits: list[int] = []
    batches: BatchIds = []
    async with JournalReader(connection, topic) as reader:
        end = await reader.end_offset()
        while await reader.position() < end:
            for record in await reader.fetch(1.0):
                event = decode_journal(record.value)
                if isinstance(event, CycleCommit):
                    commits.append(event.cycle)
                elif isinstance(event, WriteBatch):
                    batches.append((event.cycle, event.batch))
    return commits, batches


async def _uncommitted_batches(bootstrap: str, topic: str) -> BatchIds:
    """(cycle, batch) of every WriteBatch on the topic, aborted transactions included."""
    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_uncommitted",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        batches: BatchIds = []
        while await consumer.position(partition) < end:
            fetched = await consumer.getmany(partition, timeout_ms=1000)
            for message in fetched.get(partition, []):
                event = decode_journal(message.value)
                if isinstance(event, WriteBatch):
                    batches.append((event.cycle, event.batch))
        return batches
    finally:
        await consumer.stop()


async def test_primary_sigkill_loses_no_flushed_write_and_numbers_cycles_exactly(
    sites: SiteFactory, vm: VmFactory, bootstrap_servers: str
) -> None:
    """Twelve kills of the primary process; flushed writes survive and cycles stay consecutive."""
    rng = random.Random(int.from_bytes(os.urandom(8)))
    seed = rng.getrandbits(32)
    rng.seed(seed)
    config_file = sites.config_file("site-a")
    model: Model = {disk: bytearray(size) for disk, size in DISKS.items()}
    async with sites.site("site-a") as site_a, sites.site("site-b") as site_b:
        enabled = await vm(
            site_a, DISKS, VmSettings(frequency_seconds=30), name=VM, create_images=False
        )
        disks, record = enabled.disks, enabled.record
        async with site_a.primary(record) as primary:
            first_cycle = (await primary.initial_replication()).first_cycle
        adopted = await site_b.discover()
        assert [r.name for r in adopted] == [VM]
        replica: ReplicaVm = await site_b.replica(adopted[0])
        async with replica:
            await replica.catch_up()
            done = 0
            for trial, crash in enumerate(TRIALS):
                acknowledged, output = await _run_worker(config_file, seed, done, crash, rng)
                where = f"trial {trial} ({crash}, seed {seed})"
                if crash != "random":
                    assert b"shipped" in output, f"{where}: the worker never shipped"
                async with site_a.primary(await site_a.catalog.vm(VM)) as restarted:
                    await restarted.replicate()
                primary_digests = {name: sha256_of(path) for name, path in disks.items()}
                k = _find_prefix(model, seed, done, acknowledged, primary_digests)
                assert k is not None, (
                    f"{where}: the primary's disks after restart are no prefix of >= "
                    f"{acknowledged} operations: acknowledged writes were lost or torn"
                )
                applied = await replica.catch_up(timeout_seconds=60)
                assert replica.violation is None, f"{where}: {replica.violation}"
                shipped = await site_a.catalog.position(VM)
                assert shipped is not None
                assert applied == shipped.cycle, where
                got = {name: sha256_of(image) for name, image in replica.images.items()}
                assert got == primary_digests == _digests(model), where
                done = k
        state = await site_b.catalog.vm(VM)
        assert state.state is ReplicationState.REPLICATING, state.state_message
        commits, batches = await _journal(site_a.connection, site_a.journal_topic(VM))
        last = await site_a.catalog.position(VM)
        assert last is not None
        assert commits == list(range(first_cycle, last.cycle + 1))
        assert len(batches) == len(set(batches)), "a WriteBatch was published twice"
        assert sorted({cycle for cycle, _ in batches} - set(commits)) == []
        assert done > 0
        # The mid-transaction kill really left a cycle's batches on the broker: a
        # read_uncommitted reader sees one batch twice (aborted, then re-sent), read_committed
        # (above) once.
        uncommitted = await _uncommitted_batches(bootstrap_servers, site_a.journal_topic(VM))
        assert len(uncommitted) > len(set(uncommitted)) == len(batches)
