"""The block device the agent serves over NBD for each replicated disk: every write is journaled.

A :class:`JournalingDevice` is one disk of a :class:`~vmreplica.producers.capture.CapturedVm`
seen through the NBD server's :class:`~vmreplica.nbd.device.BlockDevice` seam:

- WRITE goes to the change log and then the image (``CapturedVm.write_sync``), on the event
  loop: a page-cache append and a page-cache write, no task switch, and log order equals image
  order for overlapping writes (which is what makes the replica equal to the image);
- WRITE_ZEROES and TRIM are logged as ZERO and TRIM records and applied to the image;
- FLUSH, and FUA on any write, return once the change log *and then* the images are fsynced
  (``CapturedVm.flush``: a worker thread, one round shared by concurrent flushers);
- READ comes from the image;
- once the VM is fenced (``CapturedVm.fenced_reason``) every write fails with EPERM.

The NBD server checks bounds, flags and sizes before calling the device.

Run one image standalone with journaling, for benchmarks (cycles are cut and dropped every
``--cycle-seconds``, standing in for the shipper)::

    python -m vmreplica.producers.journaling_device serve disk.raw --socket /run/disk.sock \\
        --changelog /var/tmp/changelog
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.nbd.server import NbdServer, parse_tcp_address
from vmreplica.producers.capture import CapturedVm


class JournalingDevice:
    """One disk of a captured VM, as an NBD export."""

    def __init__(self, capture: CapturedVm, disk: str) -> None:
        """:raises ConfigurationError: the VM has no such disk."""
        self.capture = capture
        self.disk = disk
        self._index = capture.disk(disk)
        self._image = capture.images[self._index]
        self._size = self._image.size

    @property
    def size(self) -> int:
        return self._size

    def _refuse_if_fenced(self) -> None:
        reason = self.capture.fenced_reason
        if reason is not None:
            raise PermissionError(errno.EPERM, reason)

    async def read(self, offset: int, length: int) -> bytes:
        return self._image.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._refuse_if_fenced()
        self.capture.write_in_bounds(self._index, offset, data)  # the server checked the range
        if fua:
            await self.capture.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        # The image punches a hole either way (reads back as zeroes, as NBD requires); the
        # replica receives a ZERO extent.
        self._refuse_if_fenced()
        self.capture.zero_sync(self._index, offset, length)
        if fua:
            await self.capture.flush()

    async def trim(self, offset: int, length: int) -> None:
        self._refuse_if_fenced()
        self.capture.zero_sync(self._index, offset, length, trim=True)

    async def flush(self) -> None:
        await self.capture.flush()


async def _cycles(capture: CapturedVm, seconds: float) -> None:
    """Cut a cycle every ``seconds`` and drop it, as if the shipper had published it."""
    while True:
        await asyncio.sleep(seconds)
        await capture.prepare_cut()  # copy dirty blocks (if over budget) off the event loop
        await capture.flush()  # and most of the fsync work
        sealed = capture.cut()
        await asyncio.to_thread(capture.log.drop_through, sealed)  # as the shipper does


async def serve_journaled(
    image: Path,
    *,
    changelog: Path,
    export: str,
    unix_path: str | None,
    tcp: tuple[str, int] | None,
    cycle_seconds: float,
    budget_bytes: int | None,
) -> None:
    """Serve one image with journaling until SIGINT or SIGTERM; print ``ready <uri>``."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # The image exists, so its size is read from it (the 0 would only size a new image).
    capture = CapturedVm(
        "standalone", [(export or "disk", image, 0)], changelog, budget_bytes=budget_bytes
    )
    try:
        device = JournalingDevice(capture, export or "disk")
        async with NbdServer({export: device}, unix_path=unix_path, tcp=tcp) as server:
            cutter = asyncio.create_task(_cycles(capture, cycle_seconds))
            print(f"ready {server.uri(export)}", flush=True)
            await stopping.wait()
            cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cutter
    finally:
        capture.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmreplica.producers.journaling_device serve IMAGE --socket PATH ...``."""
    parser = argparse.ArgumentParser(prog="python -m vmreplica.producers.journaling_device")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one raw image over NBD with journaling")
    serve.add_argument("image", type=Path)
    serve.add_argument("--changelog", type=Path, required=True, help="change-log folder")
    serve.add_argument("--socket", help="Unix socket path to listen on")
    serve.add_argument("--tcp", help="HOST:PORT to listen on")
    serve.add_argument("--export", default="", help="export name (default: empty)")
    serve.add_argument(
        "--cycle-seconds", type=float, default=1.0, help="cut (and drop) a cycle this often"
    )
    serve.add_argument(
        "--budget",
        type=int,
        default=None,
        help="change-log budget in bytes (default: 10%% of the image)",
    )
    args = parser.parse_args(argv)
    tcp = parse_tcp_address(args.tcp) if args.tcp else None
    if args.socket is None and tcp is None:
        parser.error("give --socket, --tcp or both")
    if not args.image.is_file():
        parser.error(f"{args.image} is not a file: give an existing raw image")
    try:
        asyncio.run(
            serve_journaled(
                args.image,
                changelog=args.changelog,
                export=args.export,
                unix_path=args.socket,
                tcp=tcp,
                cycle_seconds=args.cycle_seconds,
                budget_bytes=args.budget,
            )
        )
    except (ReplicationError, ConfigurationError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
