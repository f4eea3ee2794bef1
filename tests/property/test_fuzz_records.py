"""Fuzzing the replica's way in: generated and mutated records through decode, rules and apply.

Each example builds what a primary publishes — the next cycle (write batches of data, zero and
trim extents, maybe zstd, then the commit, maybe a heartbeat), or, for a seeding replica, a seed
chunk — then maybe breaks it the ways a forger or a broken link would: a field set to a hostile
value (names that climb out of the root, negative and huge offsets, lengths and sizes, wrong
hashes, other enum members), flipped, overwritten, inserted, deleted or truncated bytes, another
schema's fingerprint, dropped, duplicated, swapped or replayed records. The records are fed, as a
fetch returns them, to a real :class:`Materializer` over real sparse images in a temporary
folder with a real catalog; no broker is needed.

The properties, for every example:

- the only exception is :class:`JournalIntegrityError` (the materialiser turns the codec's
  :class:`DecodeError` family, :class:`InvalidEventError` included, into a
  :class:`JournalViolation` with a state and a message naming one of the fed offsets); nothing is
  logged with a traceback;
- no byte is applied from a bad record: a refused cycle leaves every image digest as it was, an
  accepted one makes them exactly the generated cycle's content; a seed chunk is applied exactly
  as it decodes or not at all.

The test counts what it fed and fails under :data:`MIN_RECORDS`. It is marked ``fuzz``: it runs
in ``make test`` and ``make unit`` (about 30 s on two cores), ``-m 'not fuzz'`` leaves it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.consumers.materializer import Materializer, ReplicaCursor
from vmreplica.consumers.retention import RetentionPolicy
from vmreplica.domain.model import DiskRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import (
    CorruptEventError,
    DecodeError,
    JournalIntegrityError,
    JournalViolation,
    UntrustedRecordError,
)
from vmreplica.journal.kafka import JournalRecord
from vmreplica.schemas import codec
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import (
    Compression,
    Event,
    ExtentKind,
    Heartbeat,
    SeedChunk,
    WriteBatch,
)
from vmreplica.schemas.payload import PayloadUnpacker
from vmreplica.security.authorization import AuthorizationEntry, AuthorizationStore, JournalVerifier
from vmreplica.security.signing import SiteKey, load_site_key
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage

pytestmark = pytest.mark.fuzz

VM: Final = "vm-fuzz"
EPOCH: Final = 4
BLOCK: Final = 512
DISKS: Final = {"disk0": 64 * 1024, "disk1": 12 * 1024 + 1234}
"""Two small disks (the second ends in a partial block), so a digest of both is cheap."""
CYCLE_EXAMPLES: Final = 3_200
SEED_EXAMPLES: Final = 1_000
SIGNED_CYCLE_EXAMPLES: Final = 400
MIN_CYCLE_RECORDS: Final = 10_000
"""The cycle test alone feeds at least this many records through decode, rules and apply."""

NAMES: Final = (
    "../../x",
    "/abs/x",
    "x\x00y",
    "x" * 1000,
    "",
    ".",
    "disk0",
    "disk1",
    VM,
    "site-b",
    "d\n",
    "vm-other",
)
"""Hostile names, and real ones in the wrong place."""
SIZES: Final = (
    0,
    1,
    -1,
    -4096,
    511,
    512,
    4096,
    2**31 - 1,
    -(2**31),
    2**32,
    2**46,
    2**62,
    2**63 - 1,
    -(2**63),
    DISKS["disk0"],
    DISKS["disk1"],
    DISKS["disk1"] + 1,
)
"""Numbers around the edges: of the disks, of Avro int and long, of the bounds."""
FINGERPRINTS: Final = [codec.fingerprint(name) for name in codec.schema_names()]


class Replica:
    """A materialiser over real images and a real catalog, and the content it must hold."""

    def __init__(self, folder: Path, *, seeding: bool, signer: SiteKey | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.images = {
            name: DiskImage.create(folder / f"{name}.img", size) for name, size in DISKS.items()
        }
        self.expected = {name: bytearray(size) for name, size in DISKS.items()}
        self.catalog = Catalog(folder / "catalog.db")
        self.loop.run_until_complete(self._start(folder, seeding))
        verifier = None
        if signer is not None:  # site-b lists site-a's key: it verifies every record
            store = AuthorizationStore(folder / "site-b")
            store.add(AuthorizationEntry("site-a", "default", str(folder), (signer.public_text,)))
            verifier = JournalVerifier(store, "default", VM, "site-a")
        self.materializer = Materializer(
            VM,
            self.images,
            folder / "undo",
            self.catalog,
            RetentionPolicy("latest"),
            site="site-b",
            verifier=verifier,
        )
        self.materializer.cursor = ReplicaCursor(EPOCH, 0, GENESIS_HASH, 0, seeding=seeding)
        self.seeding = seeding
        self.next_offset = 0
        self.counts = {"records": 0, "broken examples": 0, "refused": 0, "applied": 0}
        self.causes: Counter[str] = Counter()
        """Refusals by what caught them: the codec's error, or a journal rule."""

    async def _start(self, folder: Path, seeding: bool) -> None:
        await self.catalog.start()
        state = (
            ReplicationState.INITIAL_REPLICATION_IN_PROGRESS
            if seeding
            else ReplicationState.REPLICATING
        )
        await self.catalog.add_vm(
            VM,
            "replica",
            "default",
            "site-a",
            VmSettings(),
            [DiskRecord(name, str(folder / f"{name}.img"), size) for name, size in DISKS.items()],
            state,
            EPOCH,
        )

    def close(self) -> None:
        for image in self.images.values():
            image.close()
        self.loop.run_until_complete(self.catalog.stop())
        self.loop.close()

    def digests(self) -> dict[str, str]:
        return {
            name: hashlib.sha256(image.read(0, image.size)).hexdigest()
            for name, image in self.images.items()
        }

    def expected_digests(self) -> dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in self.expected.items()}

    def feed(self, values: list[bytes]) -> JournalViolation | None:
        """Apply ``values`` as one fetch; the violation, if one stopped it.

        Any other exception propagates and fails the property.
        """
        records = [
            JournalRecord(self.next_offset + i, VM.encode(), value, 0)
            for i, value in enumerate(values)
        ]
        self.next_offset += len(values)
        self.counts["records"] += len(values)
        cursor = self.materializer.cursor  # each example starts from a replica at rest
        self.materializer.abandon_cycle()
        cursor.seeding, cursor.epoch = self.seeding, EPOCH
        self.materializer.prepared = None
        refused: JournalIntegrityError | None = None
        try:
            self.loop.run_until_complete(self.materializer.apply_records(records))
        except JournalIntegrityError as error:
            refused = error
        if refused is None:
            return None
        assert isinstance(refused, JournalViolation), repr(refused)
        assert refused.vm == VM
        assert refused.offset in {record.offset for record in records}
        assert str(refused).startswith(f"VM {VM!r}, journal offset {refused.offset}: ")
        assert refused.state in (
            ReplicationState.ERROR,
            ReplicationState.RESYNCHRONIZATION_REQUIRED,
        )
        self.counts["refused"] += 1
        if isinstance(refused, UntrustedRecordError):
            self.causes["UntrustedRecordError"] += 1
        else:
            self.causes[type(refused.__cause__).__name__ if refused.__cause__ else "rule"] += 1
        return refused


@contextmanager
def replica(seeding: bool, signer: SiteKey | None = None) -> Iterator[Replica]:
    with tempfile.TemporaryDirectory(prefix="vmreplica-fuzz-") as folder:
        made = Replica(Path(folder), seeding=seeding, signer=signer)
        try:
            yield made
        finally:
            made.close()


# --- generating ----------------------------------------------------------------------------


@st.composite
def changes(draw: st.DrawFn) -> Change:
    disk = draw(st.sampled_from(sorted(DISKS)))
    size = DISKS[disk]
    length = draw(st.integers(1, 3 * BLOCK))
    offset = draw(st.one_of(st.integers(0, size - length), st.just(size - length)))
    kind = draw(
        st.sampled_from([ExtentKind.DATA, ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.TRIM])
    )
    if kind is not ExtentKind.DATA:
        return Change(disk, offset, kind=kind, length=length)
    fill = draw(st.integers(0, 255))
    data = draw(
        st.one_of(st.just(bytes([fill]) * length), st.binary(min_size=length, max_size=length))
    )
    return Change(disk, offset, data)


def apply_change(content: dict[str, bytearray], change: Change) -> None:
    data = change.data if change.kind is ExtentKind.DATA else bytes(change.size)
    content[change.disk][change.offset : change.offset + change.size] = data


# --- breaking ------------------------------------------------------------------------------

T = TypeVar("T")


class Draw(Protocol):
    """``draw`` of a composite strategy or of ``st.data()``: both break records."""

    def __call__(self, strategy: st.SearchStrategy[T], label: Any = None) -> T: ...


def hostile(draw: Draw, value: Any) -> Any:
    """A value of the same Avro type as ``value``, chosen to hurt."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(
            st.one_of(
                st.sampled_from(SIZES),
                st.just(value + 1),
                st.just(value - 1),
                st.integers(-(2**63), 2**63 - 1),
            )
        )
    if isinstance(value, str):
        return draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=70)))
    if isinstance(value, bytes):
        return draw(
            st.one_of(
                st.just(b""), st.binary(max_size=40), st.just(value[:-1]), st.just(value + b"\0")
            )
        )
    if isinstance(value, tuple):
        if not value:
            return value
        index = draw(st.integers(0, len(value) - 1))
        how = draw(st.sampled_from(["field", "drop", "repeat"]))
        if how == "drop":
            return value[:index] + value[index + 1 :]
        if how == "repeat":
            return value + (value[index],) * draw(st.integers(1, 3))
        return (*value[:index], mutate_fields(draw, value[index]), *value[index + 1 :])
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return mutate_fields(draw, value)
    return draw(st.sampled_from(list(value.__class__.__members__.values())))


def mutate_fields(draw: Draw, event: Any) -> Any:
    """``event`` with one field (maybe nested) set to a hostile value."""
    fields = [field.name for field in dataclasses.fields(event)]
    name = draw(st.sampled_from(fields))
    return dataclasses.replace(event, **{name: hostile(draw, getattr(event, name))})


def encodable(event: Event) -> bytes | None:
    """Only what fits the schema can be on the wire (an int field holds 32 bits)."""
    try:
        return codec.encode(event)
    except (TypeError, ValueError):
        return None


ANY_INDEX: Final = 1 << 16
"""Positions are drawn from a fixed range and taken modulo the length at hand: what the draws
ask for must not depend on state carried between examples (the replica's cycle number changes
how long a record encodes, the history of replayable records grows), or hypothesis reports its
data generation as flaky."""


def mutate_bytes(draw: Draw, value: bytes) -> bytes:
    how = draw(
        st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "fingerprint"])
    )
    data = bytearray(value)
    at = draw(st.integers(0, ANY_INDEX)) % max(len(data), 1)
    if how == "flip" and data:
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "overwrite":
        data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
    elif how == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    elif how == "delete":
        del data[at : at + draw(st.integers(1, 8))]
    elif how == "truncate":
        del data[at:]
    else:  # the body read as another kind of record
        data[2:10] = draw(st.sampled_from(FINGERPRINTS))
    return bytes(data)


def mutate(
    draw: Draw,
    events: list[Event],
    values: list[bytes],
    history: list[bytes],
    forger: SiteKey | None = None,
) -> list[bytes]:
    """One to three breakages of the records about to be fed; with a ``forger``, also a record
    re-signed by a key the replica does not trust."""
    values = list(values)
    ways = ["field", "field", "bytes", "bytes", "drop", "duplicate", "swap", "replay"]
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from([*ways, "forge"] if forger else ways))
        if how == "forge" and forger is not None:
            at = draw(st.integers(0, ANY_INDEX)) % max(len(values), 1)
            if at < min(len(events), len(values)):
                values[at] = forger.encode(events[at])
            continue
        at = draw(st.integers(0, ANY_INDEX)) % max(len(values), 1)
        if how == "field" and at < min(len(events), len(values)):
            values[at] = encodable(mutate_fields(draw, events[at])) or values[at]
        elif how == "bytes" and values:
            values[at] = mutate_bytes(draw, values[at])
        elif how == "drop" and values:
            del values[at]
        elif how == "duplicate" and values:
            values.insert(at, values[at])
        elif how == "swap" and len(values) > 1:
            other = draw(st.integers(0, ANY_INDEX)) % len(values)
            values[at], values[other] = values[other], values[at]
        elif how == "replay" and history:
            values.insert(at, history[draw(st.integers(0, ANY_INDEX)) % len(history)])
    return values


# --- the properties --------------------------------------------------------------------------


@st.composite
def cycles(draw: st.DrawFn) -> list[list[Change]]:
    return draw(st.lists(st.lists(changes(), min_size=1, max_size=4), min_size=1, max_size=3))


def _fuzz_cycles(
    site: Replica,
    examples: int,
    signer: SiteKey | None = None,
    forger: SiteKey | None = None,
) -> None:
    """Feed ``examples`` generated cycles (signed by ``signer`` when given), mostly broken."""
    history: list[bytes] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cycles(), st.data())
    def run(batches: list[list[Change]], data: st.DataObject) -> None:
        cursor = site.materializer.cursor
        cycle = cursor.cycle + 1
        compression = data.draw(st.sampled_from(list(Compression)))
        built: list[WriteBatch] = [
            write_batch(VM, EPOCH, cycle, index, batch, compression)
            for index, batch in enumerate(batches)
        ]
        events: list[Event] = [
            *built,
            cycle_commit(VM, EPOCH, cycle, built, cursor.cycle_hash, DISKS),
        ]
        if data.draw(st.booleans()):
            events.insert(0, Heartbeat(VM, EPOCH, "site-a", 1_000, cycle - 1))
        if signer is not None:
            events = [signer.sign(event) for event in events]
        values = [codec.encode(event) for event in events]
        broken = data.draw(st.sampled_from([True, True, True, True, False]))
        if broken:
            values = mutate(data.draw, events, values, history, forger)
            site.counts["broken examples"] += 1
        history.extend(values[-2:])
        del history[:-40]
        before = site.digests()
        violation = site.feed(values)
        if site.materializer.cursor.cycle == cycle:
            for batch in batches:
                for change in batch:
                    apply_change(site.expected, change)
            site.counts["applied"] += 1
        else:
            assert site.digests() == before, violation
            assert broken, violation  # an intact cycle always applies
        assert site.digests() == site.expected_digests(), violation

    run()


def test_fuzzed_cycles_apply_whole_or_not_at_all(caplog: pytest.LogCaptureFixture) -> None:
    """Generated cycles, mostly broken: each applies exactly as generated or leaves every image
    digest as it was; nothing but a JournalViolation is raised."""
    started = time.monotonic()
    with replica(seeding=False) as site, caplog.at_level(logging.WARNING):
        _fuzz_cycles(site, CYCLE_EXAMPLES)
        counts, causes = site.counts, site.causes
    assert not [record for record in caplog.records if record.exc_info]
    assert "Traceback" not in caplog.text
    print(f"fuzzed cycles: {counts}, refused by {dict(causes)}, {time.monotonic() - started:.1f} s")
    assert counts["records"] >= MIN_CYCLE_RECORDS, counts


def test_fuzzed_signed_cycles_apply_only_as_signed(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The same at a verifying replica, cycles signed by the trusted primary: a field changed
    after signing, a flipped byte, a record re-signed by a forger's key are refused before a
    byte is written; an intact signed cycle always applies."""
    signer, forger = load_site_key(tmp_path / "a"), load_site_key(tmp_path / "forger")
    with replica(seeding=False, signer=signer) as site, caplog.at_level(logging.WARNING):
        _fuzz_cycles(site, SIGNED_CYCLE_EXAMPLES, signer, forger)
        counts, causes = site.counts, site.causes
    assert not [record for record in caplog.records if record.exc_info]
    print(f"fuzzed signed cycles: {counts}, refused by {dict(causes)}")
    assert counts["applied"] > 0
    assert causes["UntrustedRecordError"] > 0, causes


@st.composite
def seed_chunks(draw: st.DrawFn) -> SeedChunk:
    change = draw(changes().filter(lambda change: change.kind is ExtentKind.DATA))
    compression = draw(st.sampled_from(list(Compression)))
    payload = (
        zstandard.ZstdCompressor().compress(change.data)
        if compression is Compression.ZSTD
        else change.data
    )
    return SeedChunk(
        VM,
        EPOCH,
        change.disk,
        change.offset,
        len(change.data),
        compression,
        payload,
        zlib.crc32(change.data),
        "fuzz-1",
        False,
    )


def test_fuzzed_seed_chunks_apply_as_decoded_or_not_at_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A seed chunk is written the moment it is read, unchained: whatever is accepted is
    exactly what the record says after decoding, and a refused one writes nothing."""
    started = time.monotonic()
    with replica(seeding=True) as site, caplog.at_level(logging.WARNING):

        @settings(
            max_examples=SEED_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(seed_chunks(), st.data())
        def run(chunk: SeedChunk, data: st.DataObject) -> None:
            values = [codec.encode(chunk)]
            if data.draw(st.sampled_from([True, True, True, True, False])):
                values = mutate(data.draw, [chunk], values, [])[:1] or values
                site.counts["broken examples"] += 1
            before, candidate = site.digests(), None
            try:
                event = codec.decode_journal(values[0])
            except DecodeError:
                event = None
            if isinstance(event, SeedChunk) and not event.done and event.disk in DISKS:
                with contextlib.suppress(CorruptEventError):
                    raw = PayloadUnpacker().unpack(event.compression, event.payload, event.length)
                    candidate = {name: bytearray(data) for name, data in site.expected.items()}
                    candidate[event.disk][event.offset : event.offset + len(raw)] = raw
            violation = site.feed(values)
            after = site.digests()
            if violation is not None or after == before:
                assert after == before, violation
                return
            # Accepted and written: exactly the chunk as it decodes, nothing else.
            assert candidate is not None
            site.expected = candidate
            assert after == site.expected_digests()
            site.counts["applied"] += 1

        run()
        counts, causes = site.counts, site.causes
    assert not [record for record in caplog.records if record.exc_info]
    assert "Traceback" not in caplog.text
    print(
        f"fuzzed seed chunks: {counts}, refused by {dict(causes)}, "
        f"{time.monotonic() - started:.1f} s"
    )
