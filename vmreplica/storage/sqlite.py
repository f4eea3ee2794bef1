"""The site's SQLite file, opened the one way every user of it needs.

WAL with ``synchronous=FULL``: a committed row is on disk when the call returns, and readers (the
CLI, another connection of the agent) never block the writer. Foreign keys on, and a busy timeout
so two connections of one site (the catalog and the request mailbox) wait for each other instead
of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import aiosqlite

BUSY_TIMEOUT_MS: Final = 10_000
"""How long a connection waits for another one's write lock before it gives up."""


async def open_database(path: Path, schema: str) -> aiosqlite.Connection:
    """Open (creating if needed) the SQLite file at ``path`` and make sure ``schema`` exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute("PRAGMA foreign_keys=ON")
    await db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    await db.executescript(schema)
    return db
