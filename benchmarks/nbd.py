"""Benchmark the vmreplica NBD server against ``nbdkit file`` and ``qemu-nbd`` with fio.

Each server serves its own fresh raw image on a Unix socket; fio's ``nbd`` engine (libnbd, one
connection) runs random writes at 4 KiB and 64 KiB, iodepth 16. vmreplica runs twice:

- ``vmreplica``: ``python -m vmreplica.nbd.server serve`` with a :class:`FileBlockDevice`,
  writing into the page cache like the other two (protocol handling only);
- ``vmr-journal``: ``python -m vmreplica.producers.journaling_device serve``, the export the
  agent serves, with the agent's default change-log budget (a tenth of the disk): every write is
  appended to the change log and then written to the image until the cycle's segment reaches
  the budget, after which the cycle's writes mark a dirty-block map and the cut copies those
  blocks into the log. A cycle is cut (log and images fsynced) and dropped every
  ``--cycle-seconds`` (30 and 1, the agent's continuous mode, by default), standing in for the
  shipper;
- ``vmr-logall``: the same with an unlimited budget: every byte written is also appended to
  the change log, so sustained large writes are bound by the disk's write bandwidth once the
  page cache's dirty limit is reached (the log and the image both go to the disk).

    .venv/bin/python benchmarks/nbd.py [--size 256M] [--runtime 10] [--rounds 3]
                                       [--cycle-seconds 30,1] [--json results.json]

The journaling servers run once per ``--cycle-seconds`` value (by default 30 s cycles and 1 s
cycles, the agent's continuous mode), shown as ``vmr-journal@30s`` and ``vmr-journal@1s``. Every
server runs ``--rounds`` times (default 3), interleaved, so that the reference (nbdkit) is
measured in the same minutes as ours; each round is printed, and the summary is the median of
the rounds, with the machine's load average. Beside IOPS and MB/s each server's CPU seconds per
GiB written (its process, over the fio run and its ramp) says what a request costs: on a busy
machine a single-threaded Python server loses IOPS to the load long before a threaded C one
does, while its CPU per GiB moves far less.

Targets, for the journaling export as the agent serves it (``vmr-journal``), in every cycle
length: at 4 KiB at least 0.5 of nbdkit's IOPS; at 64 KiB at least 0.7 of its MB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from vmreplica.devtools.measuring import cpu_seconds

SERVERS: Final = ("vmreplica", "vmr-journal", "vmr-logall", "nbdkit", "qemu-nbd")
OURS: Final = ("vmreplica", "vmr-journal", "vmr-logall")
JOURNALING: Final = ("vmr-journal", "vmr-logall")
JOURNAL_BUDGET_BYTES: Final = 1 << 50
"""``vmr-logall``'s budget: far above what a run writes in a one-second cycle."""
BLOCK_SIZES: Final = ("4k", "64k")
# Ratio of vmreplica to nbdkit each block size must reach, and on which metric.
TARGETS: Final = {"4k": ("iops", 0.5), "64k": ("mb_per_s", 0.7)}
SERVER_START_TIMEOUT_SECONDS: Final = 15.0


@dataclass(frozen=True)
class Result:
    server: str
    block_size: str
    iops: float
    mb_per_s: float
    cpu_per_gib: float
    """CPU seconds of the server process per GiB written: what a request costs, which the
    machine's load changes far less than it changes IOPS."""


def server_command(
    server: str, image: Path, socket_path: Path, cycle_seconds: float = 30.0
) -> list[str]:
    if server in ("vmr-journal", "vmr-logall"):
        changelog = image.with_suffix(".changelog")
        budget = ["--budget", str(JOURNAL_BUDGET_BYTES)] if server == "vmr-logall" else []
        return [sys.executable, "-m", "vmreplica.producers.journaling_device", "serve",
                str(image), "--socket", str(socket_path), "--changelog", str(changelog),
                "--cycle-seconds", str(cycle_seconds), *budget]  # fmt: skip
    if server == "vmreplica":
        return [sys.executable, "-m", "vmreplica.nbd.server", "serve", str(image),
                "--socket", str(socket_path)]  # fmt: skip
    if server == "nbdkit":
        return ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(socket_path),
                "file", str(image)]  # fmt: skip
    return ["qemu-nbd", "--format=raw", "--persistent", f"--socket={socket_path}", str(image)]


def wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path} after {SERVER_START_TIMEOUT_SECONDS} s")


@contextlib.contextmanager
def running_server(
    server: str, workdir: Path, size_bytes: int, cycle_seconds: float = 30.0
) -> Iterator[tuple[str, int]]:
    """Start ``server`` on a fresh, fully allocated image; yield its NBD URI and its pid."""
    image = workdir / f"{server}.raw"
    with image.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size_bytes)  # same starting point for all
    socket_path = workdir / f"{server}.sock"
    # The readiness probe hangs up mid-handshake, which servers log; keep that out of sight.
    log = (workdir / f"{server}.log").open("wb")
    process = subprocess.Popen(server_command(server, image, socket_path, cycle_seconds),
                               stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        wait_for_socket(socket_path, process)
        yield f"nbd+unix:///?socket={socket_path}", process.pid
    except (RuntimeError, subprocess.CalledProcessError):
        print((workdir / f"{server}.log").read_text(errors="replace"), file=sys.stderr)
        raise
    finally:
        log.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        image.unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)  # not every server removes it (next round reuses it)
        shutil.rmtree(image.with_suffix(".changelog"), ignore_errors=True)


def run_fio(
    uri: str, block_size: str, args: argparse.Namespace, output: Path
) -> tuple[float, float]:
    command = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
        f"--bs={block_size}", f"--iodepth={args.iodepth}", f"--size={args.size}",
        f"--runtime={args.runtime}", "--time_based", "--ramp_time=1",
        "--output-format=json", f"--output={output}",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    write = json.loads(output.read_text())["jobs"][0]["write"]
    return float(write["iops"]), float(write["bw_bytes"]) / 1e6


def fio_has_nbd_engine() -> bool:
    listing = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, check=False)
    return any(line.strip() == "nbd" for line in listing.stdout.splitlines())


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    suffix = text[-1].lower()
    return int(text[:-1]) * units[suffix] if suffix in units else int(text)


def run_labels(servers: list[str], cycle_seconds: list[float]) -> list[tuple[str, str, float]]:
    """(label, server, cycle seconds) of every server run in a round: the journaling servers
    once per cycle length (``vmr-journal@30s``), the others once."""
    runs = []
    for server in servers:
        if server in JOURNALING:
            runs += [(f"{server}@{c:g}s", server, c) for c in cycle_seconds]
        else:
            runs.append((server, server, cycle_seconds[0]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="image size and fio --size")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--cycle-seconds",
        default="30,1",
        help="vmr-journal/vmr-logall: cut (and drop) a cycle this often, a comma-separated "
        "list run one after the other; 30 is the most frequent Hyper-V interval, 1 the "
        "agent's continuous mode",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run every server this many times, interleaved, and report the "
        "median of each (steadier figures on a busy machine)",
    )
    args = parser.parse_args()
    try:
        cycles = [float(c) for c in args.cycle_seconds.split(",") if c]
    except ValueError:
        cycles = []
    if not cycles or min(cycles) <= 0 or args.rounds < 1:
        print(
            f"--cycle-seconds must be positive numbers separated by commas (not "
            f"{args.cycle_seconds!r}) and --rounds at least 1",
            file=sys.stderr,
        )
        return 2

    if shutil.which("fio") is None or not fio_has_nbd_engine():
        print("fio with the nbd ioengine is unavailable: cannot benchmark", file=sys.stderr)
        return 2
    servers = []
    for server in (s for s in args.servers.split(",") if s):
        if server not in OURS and shutil.which(server) is None:
            print(f"{server} is not installed: skipped", file=sys.stderr)
        else:
            servers.append(server)
    labels = run_labels(servers, cycles)
    runs: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as directory:
        workdir = Path(directory)
        for round_number in range(1, args.rounds + 1):
            for label, server, cycle_seconds in labels:
                with running_server(server, workdir, parse_size(args.size), cycle_seconds) as (
                    uri,
                    pid,
                ):
                    for block_size in BLOCK_SIZES:
                        cpu = cpu_seconds(pid)
                        iops, mb_per_s = run_fio(uri, block_size, args, workdir / "fio.json")
                        gib = mb_per_s * 1e6 * (args.runtime + 1) / (1 << 30)  # with the ramp
                        per_gib = (cpu_seconds(pid) - cpu) / gib if gib else float("nan")
                        result = Result(label, block_size, iops, mb_per_s, per_gib)
                        runs.setdefault((label, block_size), []).append(result)
                        print(
                            f"round {round_number} {label:>15} {block_size:>4}: "
                            f"{iops:>10.0f} IOPS {mb_per_s:>8.1f} MB/s, server CPU "
                            f"{per_gib:5.1f} s/GiB",
                            flush=True,
                        )
    results = [
        Result(
            label,
            block_size,
            statistics.median(r.iops for r in measured),
            statistics.median(r.mb_per_s for r in measured),
            statistics.median(r.cpu_per_gib for r in measured),
        )
        for (label, block_size), measured in runs.items()
    ]
    load = os.getloadavg()
    print(
        f"\nrandwrite, iodepth {args.iodepth}, {args.size}, {args.runtime} s per run, "
        f"median of {args.rounds} rounds; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} ({os.cpu_count()} CPUs)"
    )
    print(
        f"{'block':>5} {'server':>15} {'IOPS':>10} {'MB/s':>9} {'vs nbdkit':>10} {'vs qemu':>8} "
        f"{'CPU s/GiB':>10}"
    )
    by_key = {(r.server, r.block_size): r for r in results}
    failed = False
    for block_size in BLOCK_SIZES:
        for label, _, _ in labels:
            shown = by_key.get((label, block_size))
            if shown is None:
                continue
            ratios = []
            for reference in ("nbdkit", "qemu-nbd"):
                other = by_key.get((reference, block_size))
                ratios.append(f"{shown.iops / other.iops:.2f}" if other else "-")
            print(f"{block_size:>5} {label:>15} {shown.iops:>10.0f} {shown.mb_per_s:>9.1f} "
                  f"{ratios[0]:>10} {ratios[1]:>8} {shown.cpu_per_gib:>10.1f}")  # fmt: skip
        metric, target = TARGETS[block_size]
        nbdkit = by_key.get(("nbdkit", block_size))
        for label, server, _ in labels:
            ours = by_key.get((label, block_size))
            if server in OURS and ours and nbdkit:
                ratio = getattr(ours, metric) / getattr(nbdkit, metric)
                verdict = "ok" if ratio >= target else "BELOW TARGET"
                failed |= server == "vmr-journal" and ratio < target
                print(
                    f"      target {block_size} {metric} >= {target} x nbdkit, {label}: "
                    f"{ratio:.2f} {verdict}"
                )
    print(f"reproduce: {shlex.join([sys.executable, *sys.argv])}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
