"""How often the agent's loops look, and how long a worker that failed waits before it runs again.

Shared by the agent and the workers it runs beside each VM's cycles
(:mod:`vmreplica.runtime.resync_worker`, :class:`vmreplica.runtime.extension.HopRelay`).
"""

from typing import Final

DISCOVERY_SECONDS: Final = 2.0
"""How often the agent looks for newly enabled or newly published VMs."""

RETRY_SECONDS: Final = 30.0
"""A worker that ended on a retriable error (a broker away, a hook timed out) is retried this
long after, or as soon as its role changes."""

HELD_SECONDS: Final = 600.0
"""A worker that ended on an error someone must act on (a bad setting, a broken journal) waits
for its relationship to change, and is tried again this long after in case the cause went away."""
