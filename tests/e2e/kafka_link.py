"""A site's network link to the Kafka cluster, which a test can cut and restore.

The cluster is started with a routed listener on every node (``LocalCluster.up(routed=True)``),
advertised at a port of the node's block that nobody listens on; :class:`KafkaLink` listens
there and forwards each connection to the node's routed listener. A site whose
``bootstrap_servers`` are the advertised ports learns only those addresses from Kafka's
metadata, so every byte it exchanges with the cluster crosses this link, while the other sites
and the brokers among themselves use the ordinary listener.

:meth:`KafkaLink.cut` black-holes the link the way a dead router does: connections stay open,
new ones are accepted, but no byte crosses in either direction; what was sent waits, as TCP
keeps retransmitting it, and crosses when :meth:`KafkaLink.restore` is called (unless a side
gave up on its connection meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from typing import Final

CHUNK_BYTES: Final = 64 * 1024


class KafkaLink:
    """Forwards ``127.0.0.1:<listen>`` to ``127.0.0.1:<target>`` for each pair of ``routes``."""

    def __init__(self, routes: Sequence[tuple[int, int]]) -> None:
        self.routes = tuple(routes)
        self._up = asyncio.Event()
        self._up.set()
        self._servers: list[asyncio.Server] = []
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def is_cut(self) -> bool:
        return not self._up.is_set()

    async def start(self) -> None:
        for listen, target in self.routes:
            server = await asyncio.start_server(
                functools.partial(self._connect, target=target), "127.0.0.1", listen
            )
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._up.set()
        for writer in list(self._writers):
            writer.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> KafkaLink:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def cut(self) -> None:
        """From now on no byte crosses; connections stay open."""
        self._up.clear()

    def restore(self) -> None:
        """Bytes cross again, those held back first."""
        self._up.set()

    async def _connect(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: int
    ) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:  # the node is down: the client sees its connection closed
            client_writer.close()
            return
        self._writers |= {client_writer, broker_writer}
        for source, sink in ((client_reader, broker_writer), (broker_reader, client_writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(CHUNK_BYTES):
                await self._up.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(sink)
            sink.close()
