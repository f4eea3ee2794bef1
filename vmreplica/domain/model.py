"""The replication model: what a VM's relationship, disks, position and recovery points are.

Frozen values only; the catalog (``vmreplica.storage.catalog``) stores them, the roles and the
failover read them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from vmreplica.domain.states import ReplicationState

Role = Literal["primary", "replica"]


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
    """Where a VM's journal stands at this site (shipped on a primary, applied on a replica)."""

    epoch: int
    cycle: int
    cycle_hash: bytes
    next_offset: int
    at_ms: int


@dataclass(frozen=True)
class StoredPoint:
    cycle: int
    epoch: int
    journal_offset: int
    cut_at_ms: int
    consistency: str
    cycle_hash: bytes = b""
