"""A primary VM driven through the Python API in its own process, for primary-crash tests.

``python -m tests.e2e.primary_worker CONFIG VM SEED START [CRASH]`` opens the site of ``CONFIG``
as primary of ``VM`` (already enabled and seeded) and performs the deterministic operations
``START``, ``START+1``, … of :func:`operation` in groups of 1 to :data:`MAX_GROUP`. After each
group it calls ``flush()`` and prints ``flushed <n>`` (``n`` operations are durable); every third
group it calls ``replicate()`` and prints ``shipped <cycles>``. It runs until killed.

``CRASH`` makes the process SIGKILL itself inside its second published cycle:

- ``before-publish``: the cycle is cut (sealed in the change log) but nothing is sent;
- ``mid-transaction``: the cycle's WriteBatches are on the broker, its CycleCommit is not;
- ``after-publish``: the transaction committed, the catalog does not record it yet.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from unittest import mock

from vmreplica.config import load_config
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.producers.capture import CapturedVm
from vmreplica.runtime.site import Site

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISKS: Final = {"disk0": 4 * MiB, "disk1": 2 * MiB}
MAX_GROUP: Final = 5
"""Operations between two flushes: a kill loses at most this many unacknowledged ones."""
REPLICATE_EVERY: Final = 3
CRASH_AT_PUBLISH: Final = 2
CRASH_MODES: Final = ("before-publish", "mid-transaction", "after-publish")


@dataclass(frozen=True)
class Operation:
    """One guest I/O; ``data`` is None for zero and trim."""

    kind: str
    disk: str
    offset: int
    length: int
    data: bytes | None


def operation(seed: int, index: int) -> Operation:
    """Operation number ``index`` of the workload ``seed`` (the same in every process)."""
    rng = random.Random(f"{seed}-{index}")
    disk = rng.choice(sorted(DISKS))
    size = DISKS[disk]
    length = rng.choice([512, 4 * KiB, 16 * KiB, 128 * KiB, rng.randint(1, 64) * 512])
    offset = size - length if rng.random() < 0.1 else rng.randrange(0, size - length + 1, 512)
    roll = rng.random()
    if roll < 0.7:
        return Operation("write", disk, offset, length, rng.randbytes(length))
    return Operation("zero" if roll < 0.85 else "trim", disk, offset, length, None)


def apply_to(model: dict[str, bytearray], op: Operation) -> None:
    """What ``op`` does to a disk, on an in-memory model of it."""
    data = op.data if op.data is not None else bytes(op.length)
    model[op.disk][op.offset : op.offset + op.length] = data


async def perform(capture: CapturedVm, op: Operation) -> None:
    if op.data is not None:
        await capture.write(op.disk, op.offset, op.data)
    elif op.kind == "zero":
        await capture.zero(op.disk, op.offset, op.length)
    else:
        await capture.trim(op.disk, op.offset, op.length)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crashing_publish(mode: str) -> object:
    """A ``JournalPublisher.publish`` that kills the process at publish ``CRASH_AT_PUBLISH`` to
    the journal (the VmConfig a start keeps on the configs topic is not counted)."""
    original = JournalPublisher.publish
    calls = 0

    async def publish(
        self: JournalPublisher,
        topic: str,
        key: bytes,
        values: Iterable[bytes],
        *,
        build_in_thread: bool = False,
    ) -> list[int]:
        nonlocal calls
        if not topic.endswith(".journal"):
            return await original(self, topic, key, values)
        calls += 1
        if calls != CRASH_AT_PUBLISH:
            return await original(self, topic, key, values, build_in_thread=build_in_thread)
        if mode == "before-publish":
            _die()
        if mode == "mid-transaction":
            producer = self._producer
            records = list(values)
            await producer.begin_transaction()
            for value in records[:-1]:  # every WriteBatch, acknowledged; not the commit
                await (await producer.send(topic, value=value, key=key, partition=0))
            _die()
        offsets = await original(self, topic, key, values, build_in_thread=build_in_thread)
        _die()
        return offsets

    return publish


async def run(config: Path, vm: str, seed: int, start: int) -> None:
    async with Site(load_config(config)) as site:
        record = await site.catalog.vm(vm)
        async with site.primary(record) as primary:
            rng = random.Random(f"{seed}-groups-{start}")
            index, groups = start, 0
            while True:
                for _ in range(rng.randint(1, MAX_GROUP)):
                    await perform(primary.capture, operation(seed, index))
                    index += 1
                await primary.capture.flush()
                print(f"flushed {index}", flush=True)
                groups += 1
                if groups % REPLICATE_EVERY == 0:
                    shipped = await primary.replicate()
                    print(f"shipped {' '.join(str(c.cycle) for c in shipped)}", flush=True)


def main() -> None:
    config, vm, seed, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    crash = sys.argv[5] if len(sys.argv) > 5 else ""
    if crash:
        if crash not in CRASH_MODES:
            raise SystemExit(f"unknown crash mode {crash!r}; one of {', '.join(CRASH_MODES)}")
        with mock.patch.object(JournalPublisher, "publish", crashing_publish(crash)):
            asyncio.run(run(Path(config), vm, seed, start))
    else:
        asyncio.run(run(Path(config), vm, seed, start))


if __name__ == "__main__":
    main()
