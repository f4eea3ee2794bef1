"""The NBD server through which the hypervisor writes each replicated disk.

On the primary the agent serves every replicated disk over NBD (fixed newstyle handshake,
simple replies) so that QEMU, ``nbd-client`` or any NBD client uses it as the disk, and every
write reaches a :class:`BlockDevice` — the journaling device that captures it for replication,
or a :class:`FileBlockDevice` for tests. One :class:`NbdServer` listens on a Unix socket, a TCP
port or both and serves any number of named exports; exports come and go at runtime, and an
export can be fenced (:meth:`NbdServer.refuse_writes`) when this site stops being the primary.

Run a single image standalone (used by the benchmark)::

    python -m vmreplica.nbd.server serve disk.raw --socket /run/disk.sock [--export disk0]
    python -m vmreplica.nbd.server serve disk.raw --tcp 127.0.0.1:10809 --tls-dir DIR --tls-required
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import quote

from vmreplica.errors import ConfigurationError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.device import BlockDevice, FileBlockDevice
from vmreplica.nbd.handshake import Export, ServerContext
from vmreplica.nbd.session import NbdSession
from vmreplica.nbd.tls import NbdTls, load_server_tls
from vmreplica.service import Service

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "BlockDevice", "FileBlockDevice", "NbdServer"]

# 32 MiB: what qemu-nbd and nbdkit allow, and the size the spec says no peer may call abusive.
DEFAULT_MAX_REQUEST_BYTES: Final = 32 << 20
_LARGEST_REQUEST_BYTES: Final = 0xFFFFFFFF  # lengths are 32-bit on the wire
# How long stop() lets requests already in a device finish before hanging up.
STOP_GRACE_SECONDS: Final = 10.0


class NbdServer(Service):
    """Serves named :class:`BlockDevice` exports to NBD clients.

    Requests are pipelined: each connection starts every request as soon as it is read and
    replies as each completes, in any order. Bounds, flags and sizes are checked before a
    device is called; errors are answered with an NBD error reply and the connection carries
    on, while a client that breaks the protocol (bad magic, malformed handshake) loses its own
    connection only.
    """

    def __init__(
        self,
        exports: Mapping[str, BlockDevice],
        *,
        unix_path: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        read_only: Mapping[str, bool] | None = None,
        tls: NbdTls | None = None,
    ) -> None:
        """``tls``: the TCP listener offers (or requires) TLS with it; the Unix socket never
        does (its file mode is its access control).

        :raises ConfigurationError: no address, a bad maximum request size or export name.
        """
        if unix_path is None and tcp is None:
            raise ConfigurationError("NBD server needs a unix_path, a tcp address or both")
        if not wire.BLOCK_SIZE_PREFERRED_BYTES <= max_request_bytes <= _LARGEST_REQUEST_BYTES:
            raise ConfigurationError(
                f"max_request_bytes={max_request_bytes} must lie between "
                f"{wire.BLOCK_SIZE_PREFERRED_BYTES} and {_LARGEST_REQUEST_BYTES}"
            )
        self.unix_path = os.fspath(unix_path) if unix_path is not None else None
        self._tcp = tcp
        self._tls = tls
        self._context = ServerContext(exports={}, max_request_bytes=max_request_bytes)
        self._listeners: list[asyncio.Server] = []
        self._tcp_address: tuple[str, int] | None = None
        self._stopped = False
        read_only = read_only or {}
        for name, device in exports.items():
            self.set_export(name, device, read_only=read_only.get(name, False))

    @property
    def exports(self) -> Mapping[str, BlockDevice]:
        """The exports served now, by name (a read-only view)."""
        return MappingProxyType({n: e.device for n, e in self._context.exports.items()})

    @property
    def max_request_bytes(self) -> int:
        """The largest READ or WRITE accepted, advertised as the maximum block size."""
        return self._context.max_request_bytes

    def set_export(self, name: str, device: BlockDevice, *, read_only: bool = False) -> None:
        """Serve ``device`` as ``name``; replacing a different device shuts its clients out.

        Clients still connected to a replaced device get ESHUTDOWN, which makes them
        disconnect and reconnect to the new one.

        :raises ConfigurationError: if the name is not a valid NBD export name.
        """
        raw = name.encode()
        if len(raw) > wire.STRING_MAX_BYTES or "\0" in name:
            raise ConfigurationError(f"export name {name!r} is longer than 4096 bytes or has NUL")
        current = self._context.exports.get(name)
        if current is not None and current.device is device:
            current.read_only = read_only
            return
        if current is not None:
            current.removed = True
        self._context.exports[name] = Export(name=name, device=device, read_only=read_only)

    def remove_export(self, name: str) -> BlockDevice:
        """Stop serving ``name``; its connected clients get ESHUTDOWN on their next request.

        :returns: the device that was served, for the caller to close.
        :raises ConfigurationError: if no such export is served.
        """
        export = self._export(name)
        del self._context.exports[name]
        export.removed = True
        return export.device

    def refuse_writes(self, name: str, reason: str) -> None:
        """Fence ``name``: from now on every write, trim or zeroing is answered with EPERM.

        Used when this site learns it is no longer the primary, so a stale hypervisor cannot
        diverge the disk further. Reads and flushes still work; new connections see the
        export as read-only. (NBD has no EROFS; EPERM is its error for refused writes.)

        :raises ConfigurationError: if no such export is served.
        """
        self._export(name).refusal = reason

    def accept_writes(self, name: str) -> None:
        """Lift :meth:`refuse_writes` (the export is primary again).

        :raises ConfigurationError: if no such export is served.
        """
        self._export(name).refusal = None

    def write_refusal(self, name: str) -> str | None:
        """Why writes to ``name`` are refused, or None if they are accepted."""
        return self._export(name).refusal

    def _export(self, name: str) -> Export:
        try:
            return self._context.exports[name]
        except KeyError:
            served = sorted(self._context.exports)
            raise ConfigurationError(
                f"NBD server has no export named {name!r}; it serves {served}"
            ) from None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The TCP address listened on (the real port when 0 was asked), once started."""
        return self._tcp_address

    async def start(self) -> None:
        """Listen on the configured Unix socket and/or TCP address."""
        loop = asyncio.get_running_loop()

        def new_session() -> NbdSession:
            return NbdSession(self._context)

        if self.unix_path is not None:
            await asyncio.to_thread(_remove_stale_socket, self.unix_path)
            self._listeners.append(await loop.create_unix_server(new_session, self.unix_path))
        if self._tcp is not None:
            host, port = self._tcp
            tls = self._tls

            def new_tcp_session() -> NbdSession:
                return NbdSession(self._context, tls)

            listener = await loop.create_server(new_tcp_session, host, port)
            self._listeners.append(listener)
            bound = listener.sockets[0].getsockname()
            self._tcp_address = (host, int(bound[1]))

    async def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Stop listening, let in-flight requests finish, close every connection.

        A second call does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        for listener in self._listeners:
            listener.close()
        sessions = list(self._context.sessions)
        await asyncio.gather(*(session.close(grace_seconds) for session in sessions))
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    def uri(self, export: str) -> str:
        """The NBD URI of ``export`` (Unix socket preferred), as qemu, nbdinfo and fio take it;
        ``nbds://`` (libnbd's form) when the TCP listener requires TLS."""
        name = quote(export, safe="")
        if self.unix_path is not None:
            return f"nbd+unix:///{name}?socket={quote(self.unix_path, safe='/')}"
        address = self._tcp_address or self._tcp
        assert address is not None
        host, port = address
        if ":" in host:
            host = f"[{host}]"
        scheme = "nbds" if self._tls is not None and self._tls.required else "nbd"
        return f"{scheme}://{host}:{port}/{name}"


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on (left by a killed server).

    :raises ConfigurationError: a live server listens there, or the path is not a socket.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a Unix socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        else:
            raise ConfigurationError(
                f"another process already serves NBD on {path}; stop it first (two agents on "
                "one site root?)"
            )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def serve_image(
    image: str,
    *,
    export: str,
    unix_path: str | None,
    tcp: tuple[str, int] | None,
    read_only: bool,
    tls: NbdTls | None = None,
) -> None:
    """Serve one raw image until SIGINT or SIGTERM; print ``ready <uri>`` once listening."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    with FileBlockDevice(image, read_only=read_only) as device:
        server = NbdServer(
            {export: device}, unix_path=unix_path, tcp=tcp, read_only={export: read_only}, tls=tls
        )
        async with server:
            print(f"ready {server.uri(export)}", flush=True)
            await stopping.wait()


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is loopback) of ``--tcp``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmreplica.nbd.server serve IMAGE --socket PATH``."""
    parser = argparse.ArgumentParser(prog="python -m vmreplica.nbd.server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one raw image over NBD")
    serve.add_argument("image")
    serve.add_argument("--socket", help="Unix socket path to listen on")
    serve.add_argument("--tcp", help="HOST:PORT to listen on")
    serve.add_argument("--export", default="", help="export name (default: empty)")
    serve.add_argument("--read-only", action="store_true")
    serve.add_argument("--tls-dir", help="offer TLS on --tcp with ca-cert.pem, server-*.pem")
    serve.add_argument("--tls-required", action="store_true", help="refuse clients without TLS")
    args = parser.parse_args(argv)
    tcp = parse_tcp_address(args.tcp) if args.tcp else None
    if args.socket is None and tcp is None:
        parser.error("give --socket, --tcp or both")
    try:
        tls = None
        if args.tls_dir:
            tls = load_server_tls(Path(args.tls_dir), required=args.tls_required)
        asyncio.run(
            serve_image(
                args.image,
                export=args.export,
                unix_path=args.socket,
                tcp=tcp,
                read_only=args.read_only,
                tls=tls,
            )
        )
    except (ConfigurationError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
