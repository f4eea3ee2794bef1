"""Benchmark the replica agent's memory while it applies one very big cycle.

    .venv/bin/python benchmarks/apply_memory.py [--gib 2] [--limit-mib 300] [--compressible]

A primary site (this process, Python API) writes ``--gib`` GiB to a VM's disk and ships them as
one cycle; the replica site is a real ``vmreplica agent`` process, which applies the cycle batch
by batch (``consumers/streaming.py``). Printed: the agent's peak RSS (``VmHWM``) before the cycle
and after it, the highest RSS sampled while it applied, the times, and whether the replica
image equals the primary's disk. Data comes from ``os.urandom`` (zstd saves nothing) unless
``--compressible``. A broker is started on a free port unless ``VMREPLICA_BOOTSTRAP_SERVERS``
names one. Needs about 4 times ``--gib`` of free disk (primary disk and change log, the
broker's log, the replica image). Exit status: 0 when the peak stayed under ``--limit-mib``
and the images are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Final

from vmreplica.devtools.big_cycle import BigCycle, big_cycle
from vmreplica.devtools.measuring import broker

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB


def report(result: BigCycle, limit_mib: int) -> bool:
    peak = result.peak_rss_bytes / MiB
    print(f"cycle: {result.cycle_bytes / GiB:.2f} GiB applied by the replica agent")
    print(f"agent peak RSS before the cycle (VmHWM): {result.rss_before_bytes / MiB:.0f} MiB")
    print(f"agent peak RSS after the cycle  (VmHWM): {peak:.0f} MiB (limit {limit_mib} MiB)")
    print(f"highest RSS sampled while applying:      {result.sampled_peak_rss_bytes / MiB:.0f} MiB")
    print(f"published in {result.ship_seconds:.1f} s, applied {result.applied_seconds:.1f} s")
    print(f"after the start of publication; replica equals primary: {result.identical}")
    ok = result.identical and peak < limit_mib
    print("PASS" if ok else "FAIL")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="cycle size in GiB")
    parser.add_argument("--limit-mib", type=int, default=300, help="peak RSS limit")
    parser.add_argument("--compressible", action="store_true", help="zstd-friendly data")
    arguments = parser.parse_args()
    cycle_bytes = int(arguments.gib * GiB) // MiB * MiB
    with tempfile.TemporaryDirectory(prefix="vmreplica-apply-memory-", dir="/var/tmp") as work:
        folder = Path(work)
        with broker(folder, "benchmarks/apply_memory.py") as kafka:
            print(f"broker: {kafka.description}")
            result = asyncio.run(
                big_cycle(
                    folder,
                    kafka.bootstrap_servers,
                    f"bench{uuid.uuid4().hex[:8]}",
                    cycle_bytes,
                    compressible=arguments.compressible,
                )
            )
    return 0 if report(result, arguments.limit_mib) else 1


if __name__ == "__main__":
    sys.exit(main())
