"""Benchmark the vmreplica NBD server against ``nbdkit file`` and ``qemu-nbd`` with fio.

Each server serves its own fresh raw image on a Unix socket; fio's ``nbd`` engine (libnbd, one
connection) runs random writes at 4 KiB and 64 KiB, iodepth 16. The vmreplica server runs as
``python -m vmreplica.producers.nbd serve`` with a :class:`FileBlockDevice`, so all three
write into the page cache and the comparison measures protocol handling only.

    .venv/bin/python benchmarks/nbd.py [--size 256M] [--runtime 10] [--json results.json]

Targets: at 4 KiB at least 0.5 of nbdkit's IOPS; at 64 KiB at least 0.7 of its MB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

SERVERS: Final = ("vmreplica", "nbdkit", "qemu-nbd")
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


def server_command(server: str, image: Path, socket_path: Path) -> list[str]:
    if server == "vmreplica":
        return [sys.executable, "-m", "vmreplica.producers.nbd", "serve", str(image),
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
def running_server(server: str, workdir: Path, size_bytes: int) -> Iterator[str]:
    """Start ``server`` on a fresh, fully allocated image; yield its NBD URI."""
    image = workdir / f"{server}.raw"
    with image.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size_bytes)  # same starting point for all
    socket_path = workdir / f"{server}.sock"
    # The readiness probe hangs up mid-handshake, which servers log; keep that out of sight.
    log = (workdir / f"{server}.log").open("wb")
    process = subprocess.Popen(server_command(server, image, socket_path),
                               stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        wait_for_socket(socket_path, process)
        yield f"nbd+unix:///?socket={socket_path}"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="image size and fio --size")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if shutil.which("fio") is None or not fio_has_nbd_engine():
        print("fio with the nbd ioengine is unavailable: cannot benchmark", file=sys.stderr)
        return 2
    servers = [s for s in args.servers.split(",") if s]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as directory:
        workdir = Path(directory)
        for server in servers:
            binary = "qemu-nbd" if server == "qemu-nbd" else server
            if server != "vmreplica" and shutil.which(binary) is None:
                print(f"{binary} is not installed: skipped", file=sys.stderr)
                continue
            with running_server(server, workdir, parse_size(args.size)) as uri:
                for block_size in BLOCK_SIZES:
                    iops, mb_per_s = run_fio(uri, block_size, args, workdir / "fio.json")
                    results.append(Result(server, block_size, iops, mb_per_s))
                    print(f"{server:>10} {block_size:>4}: {iops:>10.0f} IOPS {mb_per_s:>8.1f} MB/s",
                          flush=True)  # fmt: skip

    print(f"\nrandwrite, iodepth {args.iodepth}, {args.size}, {args.runtime} s per run")
    print(f"{'block':>5} {'server':>10} {'IOPS':>10} {'MB/s':>9} {'vs nbdkit':>10} {'vs qemu':>8}")
    by_key = {(r.server, r.block_size): r for r in results}
    failed = False
    for block_size in BLOCK_SIZES:
        ours = by_key.get(("vmreplica", block_size))
        for server in servers:
            result = by_key.get((server, block_size))
            if result is None:
                continue
            ratios = []
            for reference in ("nbdkit", "qemu-nbd"):
                other = by_key.get((reference, block_size))
                ratios.append(f"{result.iops / other.iops:.2f}" if other else "-")
            print(f"{block_size:>5} {server:>10} {result.iops:>10.0f} {result.mb_per_s:>9.1f} "
                  f"{ratios[0]:>10} {ratios[1]:>8}")  # fmt: skip
        metric, target = TARGETS[block_size]
        nbdkit = by_key.get(("nbdkit", block_size))
        if ours and nbdkit:
            ratio = getattr(ours, metric) / getattr(nbdkit, metric)
            verdict = "ok" if ratio >= target else "BELOW TARGET"
            failed |= ratio < target
            print(f"      target {block_size} {metric} >= {target} x nbdkit: {ratio:.2f} {verdict}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
