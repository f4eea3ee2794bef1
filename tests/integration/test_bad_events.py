"""Bad journal events stop only their VM, with an exact state and message, and change no byte.

Two VMs replicate from site A to site B: ``bad`` and ``good``, each seeded and one good cycle in.
Then a forger (its own transactional id) publishes a hand-crafted transaction into ``bad``'s
journal: a skipped cycle number, a data extent whose bytes fail their CRC-32, records that are not
Avro at all or truncated (``tests/data/journal/``), an extent past the end of a disk, a commit
that does not chain to the previous cycle, and one whose hash does not cover its records. Each
bad transaction starts or ends with perfectly valid records of the same cycle, so applying
anything before checking everything would show.

For each, the replica of ``bad`` ends in exactly the state the rule prescribes — "resynchronization
required" for sequence and integrity breaks, "error" for input that can never be valid — with a
message naming the VM, the journal offset, the cycle and the disk/offset where it applies; its
images, applied position, recovery points and undo logs are exactly as before; the legitimate
next cycle from ``bad``'s real primary is not applied either. Meanwhile ``good``, on the same
replica site, keeps replicating: with two ReplicaVm workers in this process, and once through a
real ``vmreplica agent`` process. Values a record must never hold are refused as it is decoded,
with state "error": a VmConfig whose disk name climbs out of the storage root, an extent at a
negative offset, one of 2^62 bytes.

Forged journals of VMs of the forger's own (a VmConfig with disk names ``../../x``, ``/abs/x``,
one with NUL, one of 1,000 characters, absurd sizes and counts, a VmConfig naming another VM, a
topic whose VM part has dots) are refused at discovery, in-process and by a running agent: each
refusal names the journal offset, no file appears anywhere (the tree beside the replica's root is
snapshotted before and after, and nothing under the root is named after them), the real VMs of
the same trust group are adopted and keep replicating, and the agent logs no traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import SiteFactory, SitePair, VmFactory
from vmreplica.consumers.replica import ReplicaVm, image_path
from vmreplica.domain.model import Position, VmSettings
from vmreplica.domain.names import shown_name
from vmreplica.domain.states import ReplicationState
from vmreplica.journal.kafka import JournalPublisher, TopicAdmin
from vmreplica.journal.topics import journal_spec
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.pacing import DISCOVERY_SECONDS
from vmreplica.runtime.site import Site
from vmreplica.schemas.chain import GENESIS_HASH, cycle_hash
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import (
    Compression,
    Consistency,
    CycleCommit,
    DiskSize,
    EpochStart,
    Extent,
    ExtentKind,
    SeedChunk,
    VmConfig,
    WriteBatch,
)
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration

KiB: Final = 1024
MiB: Final = 1024 * KiB
BAD, GOOD = "bad", "good"
DISKS: Final = {"disk0": MiB, "disk1": 512 * KiB}
EPOCH: Final = 1
DATA_DIR: Final = Path(__file__).resolve().parents[1] / "data" / "journal"
RESYNC, ERROR = ReplicationState.RESYNCHRONIZATION_REQUIRED, ReplicationState.ERROR
NAME_RULE: Final = (
    "is not allowed: use 1-64 letters, digits, '-' or '_', starting with a "
    "letter or digit (no dots, slashes or spaces)"
)


@dataclass
class Pair:
    """Both sites, with the primary and the replica worker of each VM open."""

    site_a: Site
    site_b: Site
    primaries: dict[str, PrimaryVm]
    replicas: dict[str, ReplicaVm]
    disks: dict[str, dict[str, Path]]


async def _start_primaries(
    site_a: Site,
    vm: VmFactory,
    stack: AsyncExitStack,
) -> tuple[dict[str, PrimaryVm], dict[str, dict[str, Path]]]:
    """Enable, seed and ship one good cycle for each VM."""
    primaries, disks = {}, {}
    for name in (BAD, GOOD):
        enabled = await vm(
            site_a, DISKS, VmSettings(frequency_seconds=30), name=name, create_images=False
        )
        disks[name] = enabled.disks
        primary = await stack.enter_async_context(site_a.primary(enabled.record))
        await primary.capture.write("disk0", 0, os.urandom(256 * KiB))
        await primary.initial_replication()
        await primary.capture.write("disk1", 100 * KiB, os.urandom(64 * KiB))
        await primary.capture.write("disk1", DISKS["disk1"] - 4 * KiB, os.urandom(4 * KiB))
        await primary.replicate()
        primaries[name] = primary
    return primaries, disks


@asynccontextmanager
async def two_vms(site_pair: SitePair, vm: VmFactory) -> AsyncIterator[Pair]:
    site_a, site_b = site_pair.a, site_pair.b
    async with AsyncExitStack() as stack:
        primaries, disks = await _start_primaries(site_a, vm, stack)
        replicas = {}
        for record in await site_b.discover():
            replica = await stack.enter_async_context(await site_b.replica(record))
            await replica.catch_up()
            assert replica.violation is None
            replicas[record.name] = replica
        assert sorted(replicas) == [BAD, GOOD]
        yield Pair(site_a, site_b, primaries, replicas, disks)


# --- forging -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forged:
    """A crafted transaction and what the replica must make of it."""

    records: list[bytes]
    culprit: int
    """Index in ``records`` of the record the violation names."""
    state: ReplicationState
    message: str
    """After ``VM 'bad', journal offset <offset of the culprit>: ``."""


def _batch(cycle: int, writes: list[tuple[str, int, bytes]]) -> tuple[WriteBatch, list[Extent]]:
    extents, payload = [], b""
    for disk, offset, data in writes:
        extents.append(
            Extent(disk, offset, len(data), ExtentKind.DATA, len(payload), zlib.crc32(data))
        )
        payload += data
    return WriteBatch(BAD, EPOCH, cycle, 0, tuple(extents), Compression.NONE, payload), extents


def _commit(
    cycle: int, extents: list[Extent], previous: bytes, hashed: list[Extent] | None = None
) -> CycleCommit:
    return CycleCommit(
        vm=BAD,
        epoch=EPOCH,
        cycle=cycle,
        started_at_ms=1,
        cut_at_ms=2,
        batches=1,
        extents=len(extents),
        bytes_written=sum(e.length for e in extents),
        payload_bytes=0,
        consistency=Consistency.CRASH,
        disks=tuple(DiskSize(name, size) for name, size in DISKS.items()),
        previous_hash=previous,
        cycle_hash=cycle_hash(previous, EPOCH, cycle, extents if hashed is None else hashed),
    )


def _valid_writes() -> list[tuple[str, int, bytes]]:
    return [("disk0", 0, b"\xa5" * 8192), ("disk1", 8192, os.urandom(4096))]


def forge(case: str, cycle: int, previous: bytes) -> Forged:
    """The bad transaction of ``case`` for a replica that applied up to ``cycle - 1``."""
    if case == "skipped-cycle":
        batch, extents = _batch(cycle + 1, _valid_writes())
        return Forged(
            [encode(batch), encode(_commit(cycle + 1, extents, previous))],
            0,
            RESYNC,
            f"expected a batch of cycle {cycle} in epoch {EPOCH}, got cycle "
            f"{cycle + 1} of epoch {EPOCH} (a gap or a replay in the journal)",
        )
    if case == "bad-checksum":
        batch, extents = _batch(cycle, _valid_writes())
        payload = bytearray(batch.payload)
        payload[8192 + 100] ^= 0x01  # one bit of the second extent flips in transit
        corrupt = WriteBatch(BAD, EPOCH, cycle, 0, batch.extents, Compression.NONE, bytes(payload))
        return Forged(
            [encode(corrupt), encode(_commit(cycle, extents, previous))],
            0,  # each batch is checked as it arrives, before anything of it is written
            RESYNC,
            f"cycle {cycle} batch 0: checksum mismatch for 4096 bytes at 8192 of disk 'disk1'",
        )
    if case in ("not-avro", "truncated-avro"):
        name = "not_avro.bin" if case == "not-avro" else "truncated_write_batch.bin"
        batch, extents = _batch(cycle, _valid_writes())
        problem = (
            "record of 83 bytes starts with 7B 22, expected the Avro single-object "
            "marker C3 01; it is not a vmreplica record or is corrupted"
            if case == "not-avro"
            else "WriteBatch record of 2068 bytes is truncated: its body ends before the "
            "record is complete"
        )
        return Forged(
            [
                encode(batch),
                (DATA_DIR / name).read_bytes(),
                encode(_commit(cycle, extents, previous)),
            ],
            1,
            ERROR,
            f"undecodable record: {problem}",
        )
    if case == "past-end":
        size = DISKS["disk1"]
        writes = [*_valid_writes(), ("disk1", size - 4096, os.urandom(8192))]
        batch, extents = _batch(cycle, writes)
        return Forged(
            [encode(batch), encode(_commit(cycle, extents, previous))],
            0,
            ERROR,
            f"cycle {cycle} batch 0: extent of 8192 bytes at {size - 4096} lies past "
            f"the end of disk 'disk1' ({size} bytes)",
        )
    if case == "broken-chain":
        batch, extents = _batch(cycle, _valid_writes())
        other = hashlib.sha256(b"another history").digest()
        return Forged(
            [encode(batch), encode(_commit(cycle, extents, other))],
            1,
            RESYNC,
            f"cycle {cycle} does not chain to the cycle this replica applied last "
            "(previous hash differs): the journal was rewritten or another primary "
            "wrote it",
        )
    if case == "altered-records":
        batch, extents = _batch(cycle, _valid_writes())
        moved = [
            Extent(e.disk, e.offset + 4096, e.length, e.kind, e.payload_offset, e.crc32)
            for e in extents
        ]  # the commit was hashed over other offsets
        return Forged(
            [encode(batch), encode(_commit(cycle, extents, previous, moved))],
            1,
            RESYNC,
            f"cycle {cycle}: hash chain mismatch; its records were altered",
        )
    if case == "config-escape":
        config = VmConfig(BAD, EPOCH, (DiskSize("../../../../x", MiB),), 30, 0, None, "site-a", 1)
        return Forged(
            [encode(config)],
            0,
            ERROR,
            f"invalid VmConfig record: disks[0]: disk name '../../../../x' {NAME_RULE}",
        )
    if case == "negative-offset":
        batch, extents = _batch(cycle, [*_valid_writes(), ("disk1", -4096, os.urandom(4096))])
        # The chain cannot even hash a negative offset: the commit covers the valid extents.
        return Forged(
            [encode(batch), encode(_commit(cycle, extents[:2], previous))],
            0,
            ERROR,
            "invalid WriteBatch record: extents[2]: offset -4096 is negative",
        )
    if case == "absurd-length":
        batch, extents = _batch(cycle, _valid_writes())
        extents.append(Extent("disk0", 0, 2**62, ExtentKind.ZERO, 0, 0))
        huge = WriteBatch(BAD, EPOCH, cycle, 0, tuple(extents), Compression.NONE, batch.payload)
        return Forged(
            [encode(huge), encode(_commit(cycle, extents, previous))],
            0,
            ERROR,
            "invalid WriteBatch record: extents[2]: 4611686018427387904 bytes at 0 "
            "end beyond the largest disk vmreplica accepts (64 TiB)",
        )
    raise AssertionError(case)


async def publish_forged(site: Site, forged: Forged) -> list[int]:
    """Publish as one transaction of a forger: its own transactional id, so nobody is fenced."""
    async with JournalPublisher(site.connection, f"forger-{uuid.uuid4().hex}") as forger:
        return await forger.publish(site.journal_topic(BAD), BAD.encode(), forged.records)


@dataclass(frozen=True)
class ReplicaState:
    """Everything of the bad VM's replica that a refused event must leave alone."""

    digests: dict[str, str]
    position: Position | None
    points: list[int]
    undo: list[str]


async def _replica_state(catalog: Catalog, folder: Path) -> ReplicaState:
    return ReplicaState(
        {name: sha256_of(image_path(folder, name)) for name in DISKS},
        await catalog.position(BAD),
        [p.cycle for p in await catalog.points(BAD)],
        sorted(p.name for p in (folder / "undo").glob("*")),
    )


CASES: Final = (
    "skipped-cycle",
    "bad-checksum",
    "not-avro",
    "truncated-avro",
    "past-end",
    "broken-chain",
    "altered-records",
    "config-escape",
    "negative-offset",
    "absurd-length",
)


@pytest.mark.parametrize("case", CASES)
async def test_bad_event_stops_only_its_vm_and_changes_no_byte(
    site_pair: SitePair, vm: VmFactory, case: str
) -> None:
    """The forged transaction is refused whole, with the exact state and message."""
    async with two_vms(site_pair, vm) as pair:
        catalog = pair.site_b.catalog
        folder = pair.site_b.config.vm_folder(BAD)
        bad = pair.replicas[BAD]
        before = await _replica_state(catalog, folder)
        assert before.position is not None
        forged = forge(case, before.position.cycle + 1, before.position.cycle_hash)
        offsets = await publish_forged(pair.site_a, forged)
        await bad.catch_up()

        expected = f"VM 'bad', journal offset {offsets[forged.culprit]}: {forged.message}"
        assert bad.violation is not None
        assert (bad.violation.state, str(bad.violation)) == (forged.state, expected)
        record = await catalog.vm(BAD)
        assert (record.state, record.state_message) == (forged.state, expected)
        assert await _replica_state(catalog, folder) == before

        # The real primary's next cycle is not applied past the refused records either.
        await pair.primaries[BAD].capture.write("disk0", 0, os.urandom(4096))
        await pair.primaries[BAD].replicate()
        await bad.catch_up()
        assert await _replica_state(catalog, folder) == before
        assert (await catalog.vm(BAD)).state is forged.state

        # The other VM of the same replica site carries on.
        good = pair.primaries[GOOD]
        await good.capture.write("disk0", 512 * KiB, os.urandom(128 * KiB))
        await good.capture.trim("disk1", 100 * KiB, 4 * KiB)
        shipped = await good.replicate()
        assert await pair.replicas[GOOD].catch_up() == shipped[-1].cycle
        assert pair.replicas[GOOD].violation is None
        assert {name: sha256_of(image) for name, image in pair.replicas[GOOD].images.items()} == {
            name: sha256_of(path) for name, path in pair.disks[GOOD].items()
        }
        assert (await catalog.vm(GOOD)).state is ReplicationState.REPLICATING


# --- through the agent ---------------------------------------------------------------------


def _start_agent(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vmreplica.cli", "agent", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _wait_for(
    check: Callable[[], Awaitable[bool]],
    what: str,
    agent: subprocess.Popen[bytes],
    log: Path,
    timeout_seconds: float = 60.0,
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await check():
        assert agent.poll() is None, f"the agent exited: {_tail(log)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_agent_keeps_replicating_the_healthy_vm_after_a_bad_event(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    """A real agent process: the bad VM stops with "resynchronization required", the good
    one applies three more cycles, and the bad VM's images do not change."""
    config_b = sites.config("site-b")
    config_file = sites.config_file("site-b", heartbeat_seconds=1.0)
    log = tmp_path / "agent.log"
    async with sites.site("site-a") as site_a, AsyncExitStack() as stack:
        primaries, disks = await _start_primaries(site_a, vm, stack)
        shipped = {name: await site_a.catalog.position(name) for name in (BAD, GOOD)}
        agent = _start_agent(config_file, log)
        try:
            async with Catalog(config_b.catalog_path) as catalog:

                def applied(name: str, cycle: int) -> Callable[[], Awaitable[bool]]:
                    async def check() -> bool:
                        if await catalog.find_vm(name) is None:
                            return False
                        position = await catalog.position(name)
                        return position is not None and position.cycle == cycle

                    return check

                for name, position in shipped.items():
                    assert position is not None
                    await _wait_for(
                        applied(name, position.cycle),
                        f"{name} at cycle {position.cycle}",
                        agent,
                        log,
                    )
                folder = config_b.vm_folder(BAD)
                before = await _replica_state(catalog, folder)
                assert before.position is not None
                forged = forge(
                    "broken-chain", before.position.cycle + 1, before.position.cycle_hash
                )
                offsets = await publish_forged(site_a, forged)

                async def refused() -> bool:
                    return (await catalog.vm(BAD)).state is forged.state

                await _wait_for(refused, "the bad VM to be stopped", agent, log)
                record = await catalog.vm(BAD)
                assert record.state_message == (
                    f"VM 'bad', journal offset {offsets[forged.culprit]}: {forged.message}"
                )

                # The bad VM's real primary ships its next cycle; the agent still applies
                # nothing of it, however often it looks at the VM again.
                await primaries[BAD].capture.write("disk0", 0, os.urandom(4096))
                await primaries[BAD].replicate()
                await asyncio.sleep(DISCOVERY_SECONDS + 0.5)  # the agent's next look at its VMs
                good = primaries[GOOD]
                for _ in range(3):
                    await good.capture.write("disk1", 0, os.urandom(32 * KiB))
                    last = (await good.replicate())[-1].cycle
                await _wait_for(applied(GOOD, last), f"good at cycle {last}", agent, log)
                good_folder = config_b.vm_folder(GOOD)
                assert {name: sha256_of(image_path(good_folder, name)) for name in DISKS} == {
                    name: sha256_of(path) for name, path in disks[GOOD].items()
                }
                assert (await catalog.vm(GOOD)).state is ReplicationState.REPLICATING
                assert (await catalog.vm(BAD)).state is forged.state
                assert await _replica_state(catalog, folder) == before
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        assert agent.returncode == 0, _tail(log)
        assert "Traceback" not in log.read_text(), _tail(log)


# --- forged VmConfigs: names that try to escape the storage root, absurd sizes -----------------


@dataclass(frozen=True)
class ForgedVm:
    """A journal a forger created for a VM of its own, opening like a real seed does."""

    vm: str
    disks: tuple[DiskSize, ...]
    problem: str
    """What the refusal says after ``invalid VmConfig record: ``."""
    config_vm: str | None = None
    """The VM the VmConfig names, when it lies about it."""


def forged_vms(outside: Path) -> list[ForgedVm]:
    """``outside`` is a folder beside the site roots: an absolute name pointing into it."""
    escape = str(outside / "abs" / "x")
    return [
        ForgedVm(
            "evil-dotdot", (DiskSize("../../x", MiB),), f"disks[0]: disk name '../../x' {NAME_RULE}"
        ),
        ForgedVm(
            "evil-out",
            (DiskSize("disk0", MiB), DiskSize("../../../../x", MiB)),
            f"disks[1]: disk name '../../../../x' {NAME_RULE}",
        ),
        ForgedVm(
            "evil-abs", (DiskSize("/abs/x", MiB),), f"disks[0]: disk name '/abs/x' {NAME_RULE}"
        ),
        ForgedVm(
            "evil-abs-here",
            (DiskSize(escape, MiB),),
            f"disks[0]: disk name {shown_name(escape)} {NAME_RULE}",
        ),
        ForgedVm(
            "evil-nul", (DiskSize("x\x00y", MiB),), f"disks[0]: disk name 'x\\x00y' {NAME_RULE}"
        ),
        ForgedVm(
            "evil-long",
            (DiskSize("x" * 1000, MiB),),
            f"disks[0]: disk name '{'x' * 40}'... (1000 characters) {NAME_RULE}",
        ),
        ForgedVm(
            "evil-huge",
            (DiskSize("disk0", 2**62),),
            "disks[0].size_bytes is 4611686018427387904 bytes, larger than the largest "
            "disk vmreplica accepts (64 TiB)",
        ),
        ForgedVm(
            "evil-negative",
            (DiskSize("disk0", -MiB),),
            "disks[0].size_bytes is -1048576 bytes: a size cannot be negative",
        ),
        ForgedVm(
            "evil-many",
            tuple(DiskSize(f"d{i}", MiB) for i in range(1000)),
            "disks holds 1000 items; allowed: 1 to 256",
        ),
        ForgedVm("evil-other", (DiskSize("disk0", MiB),), "", config_vm=GOOD),
    ]


def refusal(forged: ForgedVm, offset: int) -> str:
    """What the replica site says about ``forged``, its VmConfig at journal ``offset``."""
    if forged.config_vm is not None:
        return (
            f"VM {forged.vm!r}, journal offset {offset}: VmConfig describes VM "
            f"{forged.config_vm!r}, not the journal's VM"
        )
    return f"VM {forged.vm!r}, journal offset {offset}: invalid VmConfig record: {forged.problem}"


async def publish_forged_vm(site: Site, forged: ForgedVm) -> int:
    """Create ``forged``'s journal as a primary would and publish its opening; return the
    VmConfig's offset. A done seed chunk follows, so a replica that adopted it would open its
    images at once."""
    await site.ensure_topics(forged.vm)
    vm = forged.config_vm or forged.vm
    start = EpochStart(vm, EPOCH, 0, "site-a", 1, "initial replication", 1, GENESIS_HASH)
    config = VmConfig(vm, EPOCH, forged.disks, 30, 0, None, "site-a", 1)
    done = SeedChunk(vm, EPOCH, "", 0, 0, Compression.NONE, b"", 0, "forged", True)
    async with JournalPublisher(site.connection, f"forger-{uuid.uuid4().hex}") as forger:
        offsets = await forger.publish(
            site.journal_topic(forged.vm),
            forged.vm.encode(),
            [encode(start), encode(config), encode(done)],
        )
    return offsets[1]


async def publish_bad_topic_name(site: Site) -> str:
    """A journal whose VM part is no VM name (``a.b``): dots would make paths and topics
    ambiguous. Returns the topic."""
    topic = f"{site.config.topic_prefix}.{site.config.trust_group}.evil.dots.journal"
    async with TopicAdmin(site.connection) as admin:
        await admin.ensure_topic(journal_spec(topic, site.config.replication_factor))
    config = VmConfig("evil", EPOCH, (DiskSize("disk0", MiB),), 30, 0, None, "site-a", 1)
    async with JournalPublisher(site.connection, f"forger-{uuid.uuid4().hex}") as forger:
        await forger.publish(topic, b"evil", [encode(config)])
    return topic


Snapshot = dict[str, tuple[int, int, str]]
"""Relative path → (mode, size, sha256 of a file's content or '' for others)."""


def snapshot(folder: Path, *leave_out: Path) -> Snapshot:
    """Every path under ``folder`` except under ``leave_out`` (the replica's storage root, and
    what a running primary changes)."""
    tree: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        if any(path == out or out in path.parents for out in leave_out):
            continue
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        tree[str(path.relative_to(folder))] = (info.st_mode, info.st_size, digest)
    return tree


def check_nothing_of_them_exists(root: Path) -> None:
    """Under the replica's root only the real VMs' folders and images; no ``/abs`` either."""
    assert sorted(path.name for path in (root / "vms").iterdir()) == [BAD, GOOD]
    for name in (BAD, GOOD):
        assert sorted(path.name for path in (root / "vms" / name / "disks").iterdir()) == [
            f"{disk}.img" for disk in DISKS
        ]
    assert [path for path in root.rglob("*") if path.name.startswith(("x", "evil"))] == []
    assert not Path("/abs").exists()


async def test_forged_vm_configs_are_refused_at_discovery_and_write_nothing(
    tmp_path: Path, site_pair: SitePair, vm: VmFactory
) -> None:
    """Bad disk names and sizes in the VmConfig of journals a forger created: the replica site
    adopts none of them, says why naming the offset, creates no file anywhere (the tree beside
    its root is byte for byte the same, nothing under its root is named after them, ``/abs``
    does not appear), and adopts and replicates the real VMs of the same discovery."""
    site_a, site_b = site_pair.a, site_pair.b
    root_b = site_b.config.root
    outside = tmp_path / "outside"
    outside.mkdir()
    async with AsyncExitStack() as stack:
        primaries, disks = await _start_primaries(site_a, vm, stack)
        forged = forged_vms(outside)
        offsets = {f.vm: await publish_forged_vm(site_a, f) for f in forged}
        dotted = await publish_bad_topic_name(site_a)
        before = snapshot(tmp_path, root_b)

        adopted = await site_b.discover()

        assert sorted(record.name for record in adopted) == [BAD, GOOD]
        expected = {site_b.journal_topic(f.vm): refusal(f, offsets[f.vm]) for f in forged}
        expected[dotted] = f"VM name 'evil.dots' {NAME_RULE}"
        assert site_b.refused == expected
        for record in adopted:  # the real VMs replicate as ever
            replica = await stack.enter_async_context(await site_b.replica(record))
            await replica.catch_up()
            assert replica.violation is None
            assert {name: sha256_of(image) for name, image in replica.images.items()} == {
                name: sha256_of(path) for name, path in disks[record.name].items()
            }
        assert await site_b.discover() == []  # and asking again changes nothing
        assert site_b.refused == expected

        assert snapshot(tmp_path, root_b) == before
        check_nothing_of_them_exists(root_b)
        assert sorted(record.name for record in await site_b.catalog.vms()) == [BAD, GOOD]
        del primaries


async def test_agent_refuses_forged_vm_configs_and_keeps_replicating(
    tmp_path: Path, sites: SiteFactory, vm: VmFactory
) -> None:
    """A real agent process: forged journals appear while it replicates; it logs each refusal
    once, creates nothing for them, and applies the good VM's next cycles; no traceback."""
    config_b = sites.config("site-b")
    config_file = sites.config_file("site-b", heartbeat_seconds=1.0)
    log = tmp_path / "agent.log"
    outside = tmp_path / "outside"
    outside.mkdir()
    async with sites.site("site-a") as site_a, AsyncExitStack() as stack:
        primaries, disks = await _start_primaries(site_a, vm, stack)
        agent = _start_agent(config_file, log)
        try:
            async with Catalog(config_b.catalog_path) as catalog:

                async def applied(cycle: int) -> bool:
                    if await catalog.find_vm(GOOD) is None:
                        return False
                    position = await catalog.position(GOOD)
                    return position is not None and position.cycle == cycle

                first = await site_a.catalog.position(GOOD)
                assert first is not None
                await _wait_for(lambda: applied(first.cycle), "good's first cycle", agent, log)
                forged = forged_vms(outside)
                offsets = {f.vm: await publish_forged_vm(site_a, f) for f in forged}
                busy = (config_b.root, site_a.config.root, tmp_path / "disks", log)
                before = snapshot(tmp_path, *busy)
                expected = [
                    f"not adopting the VM of journal {site_a.journal_topic(f.vm)}: "
                    f"{refusal(f, offsets[f.vm])}"
                    for f in forged
                ]

                async def all_refused() -> bool:
                    text = log.read_text()
                    return all(line in text for line in expected)

                await _wait_for(all_refused, "the forged journals to be refused", agent, log)
                good = primaries[GOOD]
                for _ in range(2):
                    await good.capture.write("disk0", 0, os.urandom(64 * KiB))
                    last = (await good.replicate())[-1].cycle
                await _wait_for(lambda: applied(last), f"good at cycle {last}", agent, log)
                await asyncio.sleep(DISCOVERY_SECONDS + 0.5)  # another look at the topics
                assert sorted(r.name for r in await catalog.vms()) == [BAD, GOOD]
                assert {
                    name: sha256_of(image_path(config_b.vm_folder(GOOD), name)) for name in DISKS
                } == {name: sha256_of(path) for name, path in disks[GOOD].items()}
                assert (await catalog.vm(GOOD)).state is ReplicationState.REPLICATING
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        assert agent.returncode == 0, _tail(log)
        text = log.read_text()
        assert "Traceback" not in text, _tail(log)
        assert [text.count(line) for line in expected] == [1] * len(expected)  # logged once
        assert snapshot(tmp_path, *busy) == before  # ../../../../x would be x.img here
        check_nothing_of_them_exists(config_b.root)
