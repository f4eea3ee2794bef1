"""What signing and encrypting a cycle costs in CPU, at the primary and at the replica.

    .venv/bin/python benchmarks/security_cost.py [--mib 32] [--rounds 5] [--json results.json]

One cycle of ``--mib`` MiB in 4 MiB write batches (the shipper's batch size; half random data,
half text that compresses), built and read by the same calls the shipper and the materialiser
make, once with security off (unsigned, plaintext: an open site) and once on (every record signed
with the site's Ed25519 key and verified against an authorization entry; payloads compressed then
encrypted with AES-256-GCM and decrypted):

- primary: :meth:`PayloadPacker.seal` and encoding (signing) every WriteBatch and the CycleCommit;
- replica: decoding every record, :meth:`JournalVerifier.check`, and
  :func:`~vmreplica.consumers.journal_rules.decode_cycle` (decrypt, decompress, CRC-32 of every
  extent), as a replica does before writing a byte.

No broker and no disk: this isolates the CPU the security adds. Each side is timed ``--rounds``
times; the median is reported with the throughput ratio on/off (target: on >= 0.8 x off), beside
signing alone and encryption alone, and the time of one SHA-256 pass over the cycle (what
signing costs per side, at the least: the record is hashed exactly once on each). Exit
status 0 when it ran, whatever the ratio (a missed target prints "below target").
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from vmreplica.consumers.journal_rules import decode_cycle
from vmreplica.schemas.chain import GENESIS_HASH, cycle_hash
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import (
    Consistency,
    CycleCommit,
    DiskSize,
    Extent,
    ExtentKind,
    JournalEvent,
    VmConfig,
    WriteBatch,
)
from vmreplica.schemas.payload import (
    PayloadPacker,
    PayloadUnpacker,
    batch_associated_data,
    checksum,
)
from vmreplica.security.authorization import (
    AuthorizationEntry,
    AuthorizationStore,
    JournalVerifier,
)
from vmreplica.security.encryption import VmKeyRing
from vmreplica.security.signing import load_site_key

MiB: Final = 1024 * 1024
BATCH_BYTES: Final = 4 * MiB
EXTENT_BYTES: Final = 64 * 1024
VM: Final = "bench"
TARGET: Final = 0.8


def _batches(total: int) -> list[tuple[list[Extent], bytes]]:
    text = b"".join(b"line %08d of a log file that compresses well\n" % i for i in range(100_000))
    batches = []
    offset = 0
    for index in range(total // BATCH_BYTES):
        payload = os.urandom(BATCH_BYTES) if index % 2 == 0 else text[:BATCH_BYTES]
        extents = [
            Extent(
                "disk0",
                offset + at,
                EXTENT_BYTES,
                ExtentKind.DATA,
                at,
                checksum(payload[at : at + EXTENT_BYTES]),
            )
            for at in range(0, BATCH_BYTES, EXTENT_BYTES)
        ]
        offset += BATCH_BYTES
        batches.append((extents, payload))
    return batches


class Side:
    """One configuration: how the primary encodes and the replica checks. With a ``folder``,
    ``sign`` signs and verifies every record, ``encrypt`` encrypts and decrypts payloads."""

    def __init__(self, folder: Path | None, *, sign: bool = True, encrypt: bool = True) -> None:
        self.encode: Callable[[JournalEvent], bytes] = encode
        self.packer = PayloadPacker()
        self.unpacker = PayloadUnpacker()
        self.verifier: JournalVerifier | None = None
        if folder is None:
            return
        key_a, key_b = load_site_key(folder / "a"), load_site_key(folder / "b")
        if encrypt:
            ring_a = VmKeyRing(folder / "a", VM, key_a)
            ring_a.rotate()
            ring_b = VmKeyRing(folder / "b", VM, key_b)
            wrapped = ring_a.wrap_for({"site-b": key_b.public})
            ring_b.learn(
                VmConfig(VM, 1, (), 30, 0, None, "site-a", 1, wrapped_keys=wrapped), "site-b"
            )
            self.packer = PayloadPacker(cipher=ring_a)
            self.unpacker = PayloadUnpacker(ring_b)
        if sign:
            store = AuthorizationStore(folder / "b")
            store.add(AuthorizationEntry("site-a", "default", str(folder), (key_a.public_text,)))
            self.encode = key_a.encode
            self.verifier = JournalVerifier(store, "default", VM, "site-a")

    def ship(self, batches: list[tuple[list[Extent], bytes]]) -> list[bytes]:
        records, all_extents = [], []
        for index, (extents, payload) in enumerate(batches):
            associated = (
                batch_associated_data(VM, 1, 1, index, extents) if self.packer.cipher else b""
            )
            compression, packed, encryption = self.packer.seal(payload, associated)
            batch = WriteBatch(
                VM, 1, 1, index, tuple(extents), compression, packed, encryption=encryption
            )
            records.append(self.encode(batch))
            all_extents += extents
        commit = CycleCommit(
            VM, 1, 1, 0, 0, len(batches), len(all_extents), 0, 0, Consistency.CRASH,
            (DiskSize("disk0", 1 << 40),), GENESIS_HASH,
            cycle_hash(GENESIS_HASH, 1, 1, all_extents),
        )  # fmt: skip
        records.append(self.encode(commit))
        return records

    def apply(self, records: list[bytes]) -> int:
        pending = []
        for offset, value in enumerate(records):
            event = decode_journal(value)
            if self.verifier is not None:
                self.verifier.check(event, offset, value)
            if isinstance(event, WriteBatch):
                pending.append(event)
        extents = decode_cycle(VM, len(records), pending, {"disk0": 1 << 40}, self.unpacker)
        return sum(e.length for e in extents)


def _median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return statistics.median(times)


def _sha256_seconds(size: int, rounds: int) -> float:
    data = os.urandom(size)
    return _median_seconds(lambda: hashlib.sha256(data).digest(), rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per cycle (multiple of 4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.mib < 4 or args.mib % 4 or args.rounds < 1:
        parser.error("--mib must be a multiple of 4 (at least 4) and --rounds at least 1")
    batches = _batches(args.mib * MiB)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmreplica-bench-") as folder:
        root = Path(folder)
        sides = {
            "off": Side(None),
            "signed": Side(root / "signed", encrypt=False),
            "encrypted": Side(root / "encrypted", sign=False),
            "on": Side(root / "on"),
        }
        for name, side in sides.items():
            records = side.ship(batches)
            assert side.apply(records) == args.mib * MiB  # the cycle reads back whole
            results[name] = {
                "primary_s": _median_seconds(functools.partial(side.ship, batches), args.rounds),
                "replica_s": _median_seconds(functools.partial(side.apply, records), args.rounds),
            }
    print(f"cycle of {args.mib} MiB, {args.rounds} rounds, median CPU seconds per cycle")
    print(
        f"{'side':<8}{'off':>10}{'signed':>10}{'encrypted':>11}{'on':>10}{'on MiB/s':>12}"
        f"{'ratio on/off':>15}"
    )
    ratios = {}
    for part in ("primary_s", "replica_s"):
        off, on = results["off"][part], results["on"][part]
        ratios[part] = off / on if on else float("inf")
        verdict = "" if ratios[part] >= TARGET else "  below target"
        print(
            f"{part[:-2]:<8}{off:>10.3f}{results['signed'][part]:>10.3f}"
            f"{results['encrypted'][part]:>11.3f}{on:>10.3f}{args.mib / on:>12.0f}"
            f"{ratios[part]:>15.2f}{verdict}"
        )
    hashed = _sha256_seconds(args.mib * MiB, args.rounds)
    print(
        f"(one SHA-256 pass over {args.mib} MiB on this machine: {hashed:.3f} s; signing hashes "
        "each record once at the primary and once at the replica, nothing more)"
    )
    if args.json is not None:
        summary = {"mib": args.mib, "rounds": args.rounds, "results": results, "ratios": ratios}
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
