"""When the primary makes its next application-consistent cut (``--app-consistent-hours N``).

Every N hours the agent freezes the guest's file systems through the VM's hypervisor adapter,
cuts, thaws, and ships the cycle marked application-consistent
(:meth:`~vmreplica.producers.capture_front.CaptureFront.cycle`); the replica keeps the newest
such point of every N-hour slot (:mod:`vmreplica.consumers.retention`). The schedule counts
from the last attempt, successful or not (a guest agent that does not answer is not asked again
at every cycle), kept in ``<vm folder>/app-consistent`` so an agent restart does not move it;
the first attempt comes N hours after the VM's first cycle at this site.

The length of an "hour" is :func:`hour_seconds`: 3600, unless the environment variable
``VMREPLICA_APP_CONSISTENT_HOUR_SECONDS`` says otherwise, which only tests do (a schedule of
hours is not testable by waiting).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from vmreplica.storage.safefile import replace_atomically

HOUR_SECONDS_VARIABLE: Final = "VMREPLICA_APP_CONSISTENT_HOUR_SECONDS"
"""Test-only: the length of an hour of the schedule, in seconds."""
FILE_NAME: Final = "app-consistent"


def hour_seconds() -> float:
    """3600, or the test-only override (ignored unless a positive number)."""
    try:
        value = float(os.environ.get(HOUR_SECONDS_VARIABLE, "3600"))
    except ValueError:
        return 3600.0
    return value if value > 0 else 3600.0


def due(last_ms: int, now_ms: int, every_hours: int, hour_ms: float) -> bool:
    """Whether an application-consistent cut is due: ``every_hours`` passed since the last
    attempt (a clock set back makes one due at once rather than never)."""
    return now_ms < last_ms or now_ms - last_ms >= every_hours * hour_ms


class AppConsistentSchedule:
    """The schedule of one primary VM at this site."""

    def __init__(self, folder: Path, every_hours: int | None) -> None:
        self.path = folder / FILE_NAME
        self.every_hours = every_hours
        self.hour_ms = hour_seconds() * 1000
        self._last: int | None = None
        if every_hours is not None:
            try:
                self._last = int(self.path.read_text().strip())
            except (OSError, ValueError):
                self._last = None

    def due(self, now_ms: int) -> bool:
        """Whether the next cycle is application-consistent. The first call for a VM starts
        the schedule (nothing is due then)."""
        if self.every_hours is None:
            return False
        if self._last is None:
            self.attempted(now_ms)
            return False
        return due(self._last, now_ms, self.every_hours, self.hour_ms)

    def attempted(self, at_ms: int) -> None:
        """Record an attempt (made or failed) at ``at_ms``: the next is due from there."""

        def write(temporary: Path) -> None:
            temporary.write_text(f"{at_ms}\n")

        replace_atomically(self.path, write)
        self._last = at_ms
