"""Replication throughput with security off and on: the same workload, one run, the ratio.

    .venv/bin/python benchmarks/security_throughput.py [--mib 256] [--rounds 3]
                                                       [--workload sequential|random] [--breakdown]
                                                       [--json results.json]

Measurement (a) of ``benchmarks/throughput.py`` (end to end: capture API -> one Kafka
transaction per cycle -> replica image fsynced, the replica in its own process, the VM writing
the next cycle while the last one ships), run against two local single-node brokers started
side by side:

- **off**: a plain broker, open sites (records are signed but nobody checks), payloads only
  compressed;
- **on**: a broker secured as by ``broker up --secure`` (TLS on every listener, SCRAM-SHA-512
  logins, ACLs; each site logs in as its own user with only its trust group's rights), each
  site listing the other in an authorization entry (every journal and status record verified),
  and the VM's payloads compressed then encrypted with AES-256-GCM (``enable --encrypt``).

Each of ``--rounds`` rounds (at least 3) runs off then on, or on then off (alternating, so that
a drift of the shared machine's load favours neither); the medians are compared (target: on >=
0.8 x off). Data comes from ``os.urandom``. Exit status 0 when everything ran (a missed target
prints "below target"), 1 when it could not run or a replica differed from its primary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from benchmarks.throughput import CYCLE_BYTES, EndToEnd, MiB, Secured, end_to_end
from vmreplica.devtools.measuring import Broker, broker

TARGET: Final = 0.8
WORKLOADS: Final = {"sequential": "1 MiB sequential", "random": "64 KiB random"}


async def _round(
    workdir: Path,
    brokers: dict[str, Broker],
    modes: dict[str, Secured | None],
    workload: str,
    args: argparse.Namespace,
    number: int,
) -> dict[str, EndToEnd]:
    order = list(modes) if number % 2 == 0 else list(reversed(modes))
    runs = {}
    for mode in order:
        secured = modes[mode]
        transport = secured is not None and secured.admin is not None
        runs[mode] = await end_to_end(
            workdir,
            brokers["on" if transport else "off"],
            workload,
            args.mib * MiB,
            args.cycles,
            "process",
            True,
            name=f"{mode}-{number}",
            secured=secured,
        )
        print(
            f"  round {number + 1}: security {mode:<9} {runs[mode].mib_per_s:7.1f} MiB/s",
            file=sys.stderr,
            flush=True,
        )
    return runs


async def _measure(
    workdir: Path, brokers: dict[str, Broker], args: argparse.Namespace
) -> list[dict[str, EndToEnd]]:
    state = brokers["on"].state
    assert state is not None
    assert state.secured is not None
    admin, ca_file = state.connection("vmreplica-bench-admin"), state.secured.ca_file
    modes: dict[str, Secured | None] = {"off": None, "on": Secured(admin, ca_file)}
    if args.breakdown:
        modes["transport"] = Secured(admin, ca_file, journal=False)
        modes["journal"] = Secured(None, None)
    workload = WORKLOADS[args.workload]
    for mode in ("off", "on"):  # warm both brokers and clients up; discarded
        await end_to_end(
            workdir, brokers[mode], workload, 64 * MiB, 2, "process", True,
            name=f"warmup-{mode}", secured=modes[mode],
        )  # fmt: skip
    return [
        await _round(workdir, brokers, modes, workload, args, number)
        for number in range(args.rounds)
    ]


def report(rounds: list[dict[str, EndToEnd]], args: argparse.Namespace) -> dict[str, object]:
    modes = [mode for mode in ("off", "on", "transport", "journal") if mode in rounds[0]]
    medians = {mode: statistics.median(r[mode].mib_per_s for r in rounds) for mode in modes}
    ratio = medians["on"] / medians["off"]
    load = os.getloadavg()
    print()
    print(f"vmreplica throughput, security off and on: {WORKLOADS[args.workload]} writes,")
    print(f"  {args.mib} MiB per run in {args.cycles} cycles, {args.rounds} rounds, os.urandom")
    print(f"  machine: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("  off: plain broker, open sites, payloads compressed")
    print("  on : TLS + SCRAM-SHA-512 + ACLs, every record verified, payloads AES-256-GCM")
    if "transport" in medians:
        print("  transport: the secured broker alone; journal: verification and encryption alone")
    print(f"  {'round':<7}" + "".join(f"{m + ' MiB/s':>17}" for m in modes) + f"{'on/off':>9}")
    for number, runs in enumerate(rounds):
        figures = "".join(f"{runs[m].mib_per_s:>17.1f}" for m in modes)
        print(f"  {number + 1:<7}{figures}{runs['on'].mib_per_s / runs['off'].mib_per_s:>9.2f}")
    verdict = "ok" if ratio >= TARGET else "below target"
    figures = "".join(f"{medians[m]:>17.1f}" for m in modes)
    print(f"  {'median':<7}{figures}{ratio:>9.2f}   target on >= {TARGET} x off: {verdict}")
    cpu = {
        mode: statistics.median(
            sum(r[mode].cpu.get(p, 0.0) for p in ("primary", "replica")) for r in rounds
        )
        / (args.mib / 1024)
        for mode in modes
    }
    print(
        "  CPU seconds per GiB (primary + replica, median): "
        + ", ".join(f"{m} {cpu[m]:.1f}" for m in modes)
    )
    return {
        "workload": WORKLOADS[args.workload],
        "mib": args.mib,
        "cycles": args.cycles,
        "rounds": [{mode: asdict(run) for mode, run in r.items()} for r in rounds],
        "median_mib_per_s": medians,
        "ratio_on_off": ratio,
        "cpu_seconds_per_gib": cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB written per run")
    parser.add_argument("--cycles", type=int, help="cycles per run (default: one per 64 MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, at least 3")
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="sequential")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also run the secured broker alone and the journal's security alone",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 3 or args.mib < 16:
        parser.error("--rounds must be at least 3 and --mib at least 16")
    args.cycles = args.cycles or max(2, args.mib * MiB // CYCLE_BYTES)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="vmreplica-security-") as directory,
            contextlib.ExitStack() as stack,
        ):
            workdir = Path(directory)
            print("starting a plain and a secured broker ...", file=sys.stderr, flush=True)
            brokers = {
                "off": stack.enter_context(broker(workdir, "the security benchmark")),
                "on": stack.enter_context(broker(workdir, "the security benchmark", secure=True)),
            }
            rounds = asyncio.run(_measure(workdir, brokers, args))
    except Exception as error:  # any failure means "could not run"
        print(
            f"security throughput benchmark could not run: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 1
    summary = report(rounds, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    differs = [f"{mode} round {n + 1}" for n, r in enumerate(rounds) for mode, run in r.items()
               if not run.identical]  # fmt: skip
    if differs:
        print(f"invalid: the replica differs from the primary in {', '.join(differs)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
