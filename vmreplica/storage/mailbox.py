"""The agent's request mailbox and liveness, in the site catalog's SQLite file.

A role change needs its VM to itself, so while a site's agent runs, the CLI does not fail a VM
over itself: it posts a request here, the agent carries it out between two steps of that VM and
writes the outcome back, and the CLI, polling, prints it. The agent also stamps its row in the
``agent`` table every poll, so a CLI can tell whether one runs, and records in ``kafka_outage``
since when it cannot reach Kafka (what `vmreplica status` says instead of a bare error).

The mailbox knows nothing of what a request means: it keeps a *kind* (``planned``, ``reverse``
…) and the request's fields as a JSON object, both written and read by
:mod:`vmreplica.failover.requests`. These are the columns and the values the catalog used
before the mailbox had a module of its own, so rows written by an earlier version read the same.

It has its own SQLite connection (WAL lets the catalog's connection and the CLI's, in another
process, use the file meanwhile), so a request never lands inside a catalog transaction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import aiosqlite

from vmreplica.domain.clock import now_ms
from vmreplica.domain.states import KafkaOutage
from vmreplica.errors import ConfigurationError
from vmreplica.service import Service
from vmreplica.storage.sqlite import open_database

AGENT_ALIVE_SECONDS: Final = 10.0
"""An agent that stamped its row more recently than this (and whose process exists) runs."""

RequestStatus = Literal["pending", "done", "failed", "refused"]
"""``failed``: the request was a mistake (the CLI exits 2); ``refused``: it could not be done
now (exit 1)."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS request (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    action TEXT NOT NULL,
    arguments TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    result TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent (
    site TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kafka_outage (
    site TEXT PRIMARY KEY,
    since_ms INTEGER NOT NULL,
    message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class PostedRequest:
    """A request as the mailbox holds it: ``kind`` and ``fields`` as they were posted."""

    id: int
    vm: str
    kind: str
    fields: object
    """The decoded JSON of the request's fields: an object, when :meth:`Mailbox.post` wrote it
    (its reader checks; the text itself if it is not JSON)."""
    status: RequestStatus
    result: str
    """What to print when done; the error message when failed or refused."""


def _process_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


class Mailbox(Service):
    """``async with Mailbox(config.catalog_path) as mailbox: ...``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def start(self) -> None:
        self._db = await open_database(self.path, _SCHEMA)

    async def stop(self) -> None:
        """Close the connection; a second call is harmless."""
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the request mailbox is not open")
        return self._db

    # Requests -----------------------------------------------------------------------------------

    async def post(self, vm: str, kind: str, fields: Mapping[str, Any]) -> int:
        """Leave a request for the agent; returns its id. Each statement commits on its own."""
        cursor = await self._connection.execute(
            "INSERT INTO request (vm, action, arguments, created_ms) VALUES (?, ?, ?, ?)",
            (vm, kind, json.dumps(dict(fields), sort_keys=True), now_ms()),
        )
        return int(cursor.lastrowid or 0)

    async def pending(self) -> list[PostedRequest]:
        """Requests not yet carried out, oldest first."""
        # Each read is one call on the connection's thread (Catalog._rows says why).
        rows = await self._connection.execute_fetchall(
            "SELECT id, vm, action, arguments, status, result FROM request"
            " WHERE status = 'pending' ORDER BY id"
        )
        return [_posted(row) for row in rows]

    async def request(self, request_id: int) -> PostedRequest:
        """:raises ConfigurationError: no request has that id."""
        rows = await self._connection.execute_fetchall(
            "SELECT id, vm, action, arguments, status, result FROM request WHERE id = ?",
            (request_id,),
        )
        row = next(iter(rows), None)
        if row is None:
            raise ConfigurationError(f"no request {request_id} in {self.path}")
        return _posted(row)

    async def finish(self, request_id: int, status: RequestStatus, result: str) -> None:
        await self._connection.execute(
            "UPDATE request SET status = ?, result = ? WHERE id = ?", (status, result, request_id)
        )

    # Liveness of the site's agent ---------------------------------------------------------------

    async def agent_alive(self, site: str, pid: int) -> None:
        await self._connection.execute(
            "INSERT OR REPLACE INTO agent (site, pid, seen_ms) VALUES (?, ?, ?)",
            (site, pid, now_ms()),
        )

    async def agent_seen_ms(self, site: str) -> int | None:
        """When the agent of ``site`` last stamped its row; None if none or its process is gone."""
        rows = await self._connection.execute_fetchall(
            "SELECT pid, seen_ms FROM agent WHERE site = ?", (site,)
        )
        row = next(iter(rows), None)
        if row is None or not _process_alive(int(row[0])):
            return None
        return int(row[1])

    async def agent_running(self, site: str) -> bool:
        """Whether an agent of ``site`` stamped its row in the last :data:`AGENT_ALIVE_SECONDS`."""
        seen = await self.agent_seen_ms(site)
        return seen is not None and now_ms() - seen < AGENT_ALIVE_SECONDS * 1000

    async def agent_gone(self, site: str) -> None:
        await self._connection.execute("DELETE FROM agent WHERE site = ?", (site,))
        await self._connection.execute("DELETE FROM kafka_outage WHERE site = ?", (site,))

    # What the site's agent last found of Kafka --------------------------------------------------

    async def kafka_unreachable(self, site: str, message: str) -> None:
        """The agent of ``site`` could not reach Kafka, saying ``message``; an outage already
        recorded keeps its start."""
        await self._connection.execute(
            "INSERT INTO kafka_outage (site, since_ms, message) VALUES (?, ?, ?)"
            " ON CONFLICT(site) DO UPDATE SET message = excluded.message",
            (site, now_ms(), message),
        )

    async def kafka_reachable(self, site: str) -> None:
        await self._connection.execute("DELETE FROM kafka_outage WHERE site = ?", (site,))

    async def kafka_outage(self, site: str) -> KafkaOutage | None:
        """Since when the running agent of ``site`` cannot reach Kafka, and what it last met;
        None when it can, or no agent runs (then nobody knows)."""
        if not await self.agent_running(site):
            return None
        rows = await self._connection.execute_fetchall(
            "SELECT since_ms, message FROM kafka_outage WHERE site = ?", (site,)
        )
        row = next(iter(rows), None)
        return None if row is None else KafkaOutage(int(row[0]), str(row[1]))


def _posted(row: aiosqlite.Row) -> PostedRequest:
    try:
        fields: object = json.loads(row[3])
    except ValueError:
        fields = row[3]
    return PostedRequest(
        int(row[0]), str(row[1]), str(row[2]), fields, cast(RequestStatus, row[4]), str(row[5])
    )
