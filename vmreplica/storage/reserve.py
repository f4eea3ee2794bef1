"""Space held back on the site's file system, so that a full disk can still be reported.

A replica whose file system fills up pauses (:class:`~vmreplica.errors.StorageFullError`) and
says so in its catalog, which lives on that same file system: with not a byte free, SQLite
could not record even that, and ``vmreplica status`` would go on saying "replicating". So the
agent keeps a file of :data:`RESERVE_BYTES` (allocated, not sparse) at the storage root, and
deletes it the moment it meets a full file system, which leaves room for the catalog's writes
while the operator frees space; once the VM resumes, the reserve is taken again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

RESERVE_BYTES: Final = 4 * 1024 * 1024
"""Room for a few thousand catalog writes (states, heartbeats, the mailbox) on a full disk."""
RESERVE_NAME: Final = "space-reserve"


class SpaceReserve:
    """The reserve file of one storage root."""

    def __init__(self, root: Path, size: int = RESERVE_BYTES) -> None:
        self.path = root / RESERVE_NAME
        self.size = size

    def take(self) -> bool:
        """Allocate the reserve if it is not there; False when there is no room for it now
        (nothing is left behind: the next call tries again)."""
        if self.path.exists():
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                self.path.unlink()
            log.debug("no room for the space reserve %s: %s", self.path, error)
            return False
        return True

    def release(self) -> bool:
        """Give the reserve back to the file system; True when there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning(
            "released the %d-byte space reserve %s so that the full disk can be reported",
            self.size,
            self.path,
        )
        return True
