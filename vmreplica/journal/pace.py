"""A VM's bandwidth limit (`vmreplica set --bandwidth`): how fast its primary sends data.

A cycle, or a seed's batch of chunks, is one Kafka transaction, which must end within the
broker's transaction timeout: it cannot be slowed down from inside without risking its abort.
So the limit holds on average, between transactions: each one is sent at full speed, and the
next transaction of data waits until the bytes sent so far fit the limit again. Control records
(heartbeats, epochs, a ``VmConfig``) never wait: a replica must keep hearing that its primary is
alive, however far behind the data is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Pace:
    """Bytes sent against a rate: :meth:`wait` returns once they fit it again."""

    def __init__(self, bytes_per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._free_at = clock()
        """When the bytes sent so far will have fit the rate."""

    def spent(self, size: int) -> None:
        """``size`` bytes were sent now."""
        self._free_at = max(self._free_at, self._clock()) + size / self.bytes_per_second

    def delay(self) -> float:
        """Seconds to wait before sending more."""
        return max(0.0, self._free_at - self._clock())

    async def wait(self) -> None:
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)


def pace_for(bytes_per_second: int | None) -> Pace | None:
    """The pace of a VM's setting (None: no limit)."""
    return None if bytes_per_second is None else Pace(bytes_per_second)
