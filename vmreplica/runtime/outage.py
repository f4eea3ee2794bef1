"""What a primary VM does while Kafka does not acknowledge it: it keeps capturing, and retries.

A Kafka outage — a broker lost, every broker stopped, or this site's link to them cut — must
never stop the VM's disks: the guest's writes keep landing in the change log (and, beyond its
budget, in the dirty-block map) and in the images, and ship when Kafka answers again. So the
agent does not end the VM's worker on a broker error. :class:`PublishOutage` instead

1. records the VM's state as *error*, with a message that says since when, what failed and that
   writes wait (health critical, `vmreplica status` gives the message as its reason);
2. retries after a back-off that doubles from :data:`FIRST_RETRY_SECONDS` to
   :data:`MAX_RETRY_SECONDS` (Azure Site Recovery's habit, in seconds rather than minutes: a
   cycle is seconds to minutes long);
3. each retry restarts the publisher — which settles the transaction the failed publish left
   open — and reconciles with the journal (:meth:`PrimaryVm.reconnect`), so a cycle whose
   commit reached the broker although its publish timed out is adopted, not sent twice, and
   one that did not is sent again under the same number;
4. once that succeeds, the state is *replicating* again and the cycles that waited ship, in
   order, at the next cut.

A cut that finds the change log's file system full (copying a degraded cycle's dirty blocks into
it) is handled the same way: the capture goes on — a full change log degrades to the
dirty-block map, which needs no room per write — and the cut is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import BrokerError, FencedError, ReplicationError, StorageFullError
from vmreplica.producers.changelog import pending_bytes
from vmreplica.producers.primary import PrimaryVm
from vmreplica.storage.catalog import Catalog

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS: Final = 1.0
"""The first retry after a failure: a broker that just moved a partition's leadership answers
again within seconds."""
MAX_RETRY_SECONDS: Final = 30.0
"""Retries never wait longer than this, however long the outage: recovery is at most this much
behind Kafka's return."""


@dataclass
class Backoff:
    """Delays between retries: doubling from ``first`` up to ``longest``."""

    first: float = FIRST_RETRY_SECONDS
    longest: float = MAX_RETRY_SECONDS
    failures: int = 0

    def next_delay(self) -> float:
        """The delay after one more failure."""
        self.failures += 1
        return float(min(self.longest, self.first * 2.0 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


class PublishOutage:
    """Kafka does not acknowledge one primary VM's records: since when, why, when to retry."""

    def __init__(self, catalog: Catalog, primary: PrimaryVm) -> None:
        self.catalog = catalog
        self.primary = primary
        self.since_ms: int | None = None
        """When the outage began; None while Kafka acknowledges."""
        self.retry_at = 0.0
        """Event-loop time of the next attempt."""
        self._backoff = Backoff()
        self._storage = False
        """The last failure was a full file system, not Kafka."""

    @property
    def ongoing(self) -> bool:
        return self.since_ms is not None

    def due(self) -> bool:
        return asyncio.get_running_loop().time() >= self.retry_at

    async def failed(self, error: ReplicationError) -> None:
        """Record a failed publish, or a cut that found the change log's file system full
        (steps 1 and 2 of the module docstring).

        :raises FencedError: ``error`` says a newer primary exists: not an outage.
        """
        if isinstance(error, FencedError):
            raise error
        vm = self.primary.name
        delay = self._backoff.next_delay()
        self.retry_at = asyncio.get_running_loop().time() + delay
        first = self.since_ms is None
        if first:
            self.since_ms = now_ms()
        self._storage = isinstance(error, StorageFullError)
        if self._storage:
            message = (
                f"{error} Meanwhile the VM keeps running: its writes are tracked in the "
                "dirty-block map, and the cycle is cut and shipped once it fits."
            )
        else:
            waiting = pending_bytes(self.primary.capture.log.folder)
            message = (
                f"Kafka has not acknowledged this site's records since "
                f"{_clock(self.since_ms or now_ms())}: {error} The VM keeps running: its "
                f"writes wait in the change log ({waiting} bytes) and ship, in order, when "
                f"Kafka answers; retrying every {MAX_RETRY_SECONDS:.0f} s at most."
            )
        await self.catalog.set_state(vm, ReplicationState.ERROR, message)
        if first:
            log.warning("VM %s: %s", vm, message)
        else:
            log.info("VM %s: still failing (%s); next attempt in %.0f s", vm, error, delay)

    async def retry(self) -> bool:
        """Steps 3 and 4 of the module docstring; True when Kafka answered again.

        :raises FencedError: a newer primary exists (``SupersededError`` when its epoch is in
            the journal): the agent stands this site down.
        """
        try:
            await self.primary.reconnect()
        except BrokerError as error:
            await self.failed(error)
            return False
        seconds = (now_ms() - (self.since_ms or now_ms())) / 1000
        self.since_ms = None
        self._backoff.reset()
        message = (
            f"the change log's file system had no room for {seconds:.0f} s; the cut is tried again"
            if self._storage
            else f"Kafka answered again after {seconds:.0f} s away; the cycles that waited ship"
        )
        await self.catalog.set_state(self.primary.name, ReplicationState.REPLICATING, message)
        log.info("VM %s: %s", self.primary.name, message)
        return True


def _clock(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at_ms / 1000))
