"""The replication model: what a VM's relationship, disks, position and recovery points are.

Frozen values and the rules over them (which settings are allowed, which way a position may
move); the catalog (``vmreplica.storage.catalog``) stores them, the roles and the failover read
them. Nothing here does I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Final, Literal, Self

from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError

Role = Literal["primary", "replica"]
InitialMode = Literal["network", "export", "existing"]
"""How a replica gets its first copy (``vmreplica enable --initial``): SeedChunk records over
the journal, a folder on external media, or a copy it already holds (block-digest compare)."""

FREQUENCIES_SECONDS: Final = (30, 300, 900, 0)
"""Hyper-V's 30 s, 5 min and 15 min, and 0 for continuous."""
EXTENDED_FREQUENCIES_SECONDS: Final = (300, 900)
"""Hyper-V extends only at 5 or 15 minutes: the hop never outpaces its source."""
MAX_HISTORY_HOURS: Final = 24
"""Hyper-V Replica 2012 R2 keeps at most 24 hourly points; vmreplica keeps the same bound."""
MAX_APP_CONSISTENT_HOURS: Final = 12
"""Hyper-V takes application-consistent (VSS) points every 1 to 12 hours."""
MIN_BANDWIDTH_BYTES_PER_SECOND: Final = 64 * 1024
"""A bandwidth limit below this makes a single 4 MiB record take over a minute: a mistake."""


def parse_frequency(text: str, what: str = "frequency") -> int:
    """``30``, ``300``, ``900`` or ``continuous`` (0) as seconds between cycles.

    :raises ConfigurationError: any other text; the message names ``what`` (a CLI option).
    """
    for seconds in FREQUENCIES_SECONDS:
        if text == (str(seconds) if seconds else "continuous"):
            return seconds
    raise ConfigurationError(f"{what} must be 30, 300, 900 or continuous, not {text!r}")


def check_frequency(seconds: int) -> int:
    """:raises ConfigurationError: not one of :data:`FREQUENCIES_SECONDS`."""
    if seconds not in FREQUENCIES_SECONDS:
        raise ConfigurationError(
            f"replication frequency must be 30, 300, 900 seconds or continuous, not {seconds}"
        )
    return seconds


def check_extended_frequency(seconds: int) -> int:
    """:raises ConfigurationError: not one of :data:`EXTENDED_FREQUENCIES_SECONDS`."""
    if seconds not in EXTENDED_FREQUENCIES_SECONDS:
        raise ConfigurationError(
            f"extended replication runs every 300 or 900 seconds, not {seconds}"
        )
    return seconds


def check_history_hours(hours: int, what: str = "recovery history") -> int:
    """:raises ConfigurationError: outside 0 to :data:`MAX_HISTORY_HOURS`."""
    if not 0 <= hours <= MAX_HISTORY_HOURS:
        raise ConfigurationError(f"{what} must be 0-{MAX_HISTORY_HOURS} hours, got {hours}")
    return hours


def check_app_consistent_hours(every: int, history_hours: int) -> int:
    """Application-consistent points every ``every`` hours, kept for ``history_hours``.

    :raises ConfigurationError: outside 1 to :data:`MAX_APP_CONSISTENT_HOURS`, or longer than the
        history (the slot of such a point would fall outside it).
    """
    if not 1 <= every <= MAX_APP_CONSISTENT_HOURS:
        raise ConfigurationError(
            f"application-consistent points must come every 1-{MAX_APP_CONSISTENT_HOURS} "
            f"hours, got {every}"
        )
    if every > history_hours:
        raise ConfigurationError(
            f"application-consistent points every {every} hours would fall outside a "
            f"recovery history of {history_hours} hours: raise hours to at least {every}"
        )
    return every


class Consistency(StrEnum):
    """What kind of recovery point a cycle boundary is.

    The values are the text the catalog stores and the CLI prints (a ``StrEnum``, so code that
    compared a point's consistency with that text keeps working); the member names are the
    symbols of the Avro enum ``CycleCommit.consistency``, so the wire's enum converts by name
    (``Consistency[commit.consistency.name]``).
    """

    CRASH = "crash"
    """As after a power loss: every write before the cut, none after."""
    APPLICATION = "application"
    """Applications were quiesced before the cut."""

    @classmethod
    def parse(cls, text: str) -> Consistency:
        """:raises ConfigurationError: ``text`` is not ``crash`` or ``application``."""
        try:
            return cls(text)
        except ValueError:
            raise ConfigurationError(
                f"consistency must be 'crash' or 'application', got {text!r}"
            ) from None


@dataclass(frozen=True)
class VmSettings:
    """What ``vmreplica enable`` chose for a VM (mirrors Enable-VMReplication)."""

    frequency_seconds: int = 300
    """30, 300 or 900; 0 means continuous (a cycle every second or every N MiB)."""
    recovery_history: int = 0
    app_consistent_hours: int | None = None
    continuous_points_hours: int | None = None
    compression: bool = True
    capture: Literal["api", "nbd", "scan"] = "api"
    continuous_max_bytes: int = 64 * 1024 * 1024
    excluded_disks: tuple[str, ...] = field(default_factory=tuple)
    also_replicate_to: tuple[str, ...] = field(default_factory=tuple)
    """Further replica sites reading the same journal directly (fan-out)."""
    changelog_budget_bytes: int | None = None
    """Largest open change-log segment before capture degrades to a dirty-block map for the
    rest of the cycle (None: a tenth of the VM's total disk size)."""
    pre_cut_hook: str | None = None
    """Scan capture: shell command run before the scan (fsfreeze, pausing the VM)."""
    post_cut_hook: str | None = None
    """Scan capture: shell command run after the scan, even if it failed (thaw, resume)."""
    auto_resync: bool = True
    encrypt: bool = False
    """Payloads are encrypted end to end (AES-256-GCM, keys wrapped for each replica site:
    :mod:`vmreplica.security.encryption`)."""
    """A replica that reports it needs a resynchronization (a journal violation stopped it) is
    resynchronized without the operator; off, the primary's health turns critical instead."""
    initial: InitialMode = "network"
    """How the replica gets its first copy (:data:`InitialMode`)."""
    initial_at_ms: int | None = None
    """``--initial-at``: the initial replication starts no earlier than this (ms since the Unix
    epoch); None: at once. This site's own: it does not travel to the replica."""
    bandwidth_bytes_per_second: int | None = None
    """The most the primary sends on average, in bytes per second (None: no limit): data
    transactions wait between them, heartbeats never (:mod:`vmreplica.journal.pace`)."""
    hypervisor: str | None = None
    """This site's hypervisor adapter for the VM (``qemu:<qmp>[,ga=<ga>]``, ``libvirt:<domain>``;
    :mod:`vmreplica.domain.hypervisor`); None: the site's ``hypervisor``, else the hooks. Like
    the hooks it is this site's own: it does not travel to the replica."""

    def validate(self) -> Self:
        """Check these settings by the rules the primary and its replicas apply; return them.

        :raises ConfigurationError: a frequency, an hour count or a combination is not allowed
            (the replica would refuse to keep its recovery points this way).
        """
        check_frequency(self.frequency_seconds)
        check_history_hours(self.recovery_history)
        if self.continuous_points_hours is not None:
            check_history_hours(self.continuous_points_hours, "continuous recovery points")
        if self.app_consistent_hours is not None:
            check_app_consistent_hours(
                self.app_consistent_hours, self.continuous_points_hours or self.recovery_history
            )
        if self.hypervisor is not None:
            parse_hypervisor(self.hypervisor)
        if (
            self.bandwidth_bytes_per_second is not None
            and self.bandwidth_bytes_per_second < MIN_BANDWIDTH_BYTES_PER_SECOND
        ):
            raise ConfigurationError(
                f"a bandwidth limit of {self.bandwidth_bytes_per_second} bytes per second is "
                f"below the least allowed, {MIN_BANDWIDTH_BYTES_PER_SECOND} (64K): a single "
                "record would take over a minute"
            )
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VmSettings:
        raw = json.loads(text)
        raw["excluded_disks"] = tuple(raw.get("excluded_disks", ()))
        raw["also_replicate_to"] = tuple(raw.get("also_replicate_to", ()))
        return cls(**raw)


@dataclass(frozen=True)
class DiskRecord:
    name: str
    path: str
    size_bytes: int


@dataclass(frozen=True)
class VmRecord:
    """A replication relationship as this site sees it."""

    name: str
    role: Role
    trust_group: str
    partner_site: str
    settings: VmSettings
    epoch: int
    state: ReplicationState
    state_message: str
    state_changed_ms: int
    disks: tuple[DiskRecord, ...]


@dataclass(frozen=True)
class Position:
    """Where a VM's journal stands at this site (shipped on a primary, applied on a replica).

    Positions only move forward: the epoch never decreases, nor does the cycle (cycle numbers
    carry on across epochs), and within one epoch and cycle the journal offset only grows (an
    initial replication records its progress that way). Only a failover goes back, and says why.
    """

    epoch: int
    cycle: int
    cycle_hash: bytes
    next_offset: int
    at_ms: int

    def moves_back_from(self, current: Position) -> bool:
        """True when recording this position after ``current`` would move the VM back."""
        if self.epoch < current.epoch or self.cycle < current.cycle:
            return True
        return (self.epoch, self.cycle) == (
            current.epoch,
            current.cycle,
        ) and self.next_offset < current.next_offset

    def __str__(self) -> str:
        return f"epoch {self.epoch}, cycle {self.cycle}, offset {self.next_offset}"


@dataclass(frozen=True)
class Rewind:
    """A position moved back on purpose, and why: only failover does this (cancel, demote,
    promote to an older point)."""

    position: Position
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    """A state the replica can go back to: the end of ``cycle``, whose CycleCommit is at
    ``journal_offset`` in the VM's journal."""

    cycle: int
    epoch: int
    journal_offset: int
    cut_at_ms: int
    """When the primary cut the cycle (epoch milliseconds): the point's time for the operator."""
    consistency: Consistency = Consistency.CRASH
    cycle_hash: bytes = b""
