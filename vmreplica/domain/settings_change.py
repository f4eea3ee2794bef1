"""Changing a replicating VM's settings (Set-VMReplication): which changes are allowed when.

Pure rules over :class:`~vmreplica.domain.model.VmSettings`; the runtime
(:mod:`vmreplica.runtime.settings`) reads the catalog, calls these, and writes the result.

What may change, and when:

- **at any time**, on the primary: the frequency, the recovery history, the
  application-consistent interval, continuous points, compression, payload encryption,
  automatic resynchronization, the change-log budget and the bandwidth limit. The primary's
  agent restarts the VM's worker with them, and publishes a signed ``VmConfig`` so that the
  replica keeps its recovery points by the new history and judges missed cycles by the new
  frequency.
- **only before the initial replication began** (nothing of the VM is in the journal): which
  disks are replicated, and the replica site. Afterwards the replica holds every disk from the
  seed: excluding one would leave it at an older instant than the others in every later recovery
  point (a VM that matches no moment of the primary), including one needs a seed of that disk,
  and another replica site holds nothing at all. Those are refused, with what to do instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vmreplica.domain.model import VmSettings
from vmreplica.errors import ConfigurationError, ReplicationError

UNSET: Any = object()
"""A field of :class:`SettingsChange` the operator did not give."""


@dataclass(frozen=True)
class SettingsChange:
    """What the operator asked to change; a field left :data:`UNSET` keeps its value.

    ``app_consistent_hours`` and ``continuous_points_hours`` take None to turn them off.
    """

    frequency_seconds: int = UNSET
    recovery_history: int = UNSET
    app_consistent_hours: int | None = UNSET
    continuous_points_hours: int | None = UNSET
    compression: bool = UNSET
    encrypt: bool = UNSET
    auto_resync: bool = UNSET
    changelog_budget_bytes: int | None = UNSET
    bandwidth_bytes_per_second: int | None = UNSET
    exclude_disks: tuple[str, ...] = field(default_factory=tuple)
    include_disks: tuple[str, ...] = field(default_factory=tuple)
    """Disk names to replicate again (their images are given to the runtime separately)."""
    replica_site: str | None = None

    def settings_fields(self) -> dict[str, Any]:
        """The :class:`VmSettings` fields this change sets."""
        names = {f.name for f in dataclasses.fields(VmSettings)}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in names and getattr(self, f.name) is not UNSET
        }

    @property
    def empty(self) -> bool:
        return not (
            self.settings_fields()
            or self.exclude_disks
            or self.include_disks
            or self.replica_site is not None
        )


def changed_settings(
    vm: str,
    current: VmSettings,
    change: SettingsChange,
    disks: tuple[str, ...],
    *,
    seeded: bool,
) -> VmSettings:
    """The VM's settings after ``change``, validated as ``enable`` validates them.

    ``disks``: the disks replicated now; ``seeded``: the initial replication began (something of
    the VM is in the journal).

    :raises ConfigurationError: a value out of range, a combination the replica would refuse, a
        disk that is not the VM's, or nothing to change (exit 2).
    :raises ReplicationError: a change that cannot be made safely once the seed began (exit 1).
    """
    if change.empty:
        raise ConfigurationError(
            f"`vmreplica set {vm}` was given nothing to change; name at least one setting "
            "(`vmreplica set --help` lists them)"
        )
    for name in change.exclude_disks:
        if name not in disks:
            raise ConfigurationError(
                f"--exclude-disk {name!r}: VM {vm!r} replicates no disk of that name "
                f"(its disks: {', '.join(disks)})"
            )
    for name in change.include_disks:
        if name in disks:
            raise ConfigurationError(f"--include-disk {name!r}: VM {vm!r} replicates it already")
    if set(change.exclude_disks) & set(change.include_disks):
        raise ConfigurationError("a disk cannot be both excluded and included")
    if seeded and (change.exclude_disks or change.include_disks):
        raise ReplicationError(
            f"VM {vm!r}: the disks it replicates cannot change once its initial replication "
            "began. The replica holds every disk from the seed: a disk excluded now would stay "
            "at an older instant than the others in every later recovery point (a VM that "
            "matches no moment of the primary), and a disk included now has never been seeded. "
            f"Operator action: `vmreplica remove {vm}` at both sites, then `vmreplica enable` "
            "again with the disks wanted"
        )
    if seeded and change.replica_site is not None:
        raise ReplicationError(
            f"VM {vm!r}: its replica site cannot change once its initial replication began: "
            f"site {change.replica_site!r} holds nothing of it. Operator action: to move the "
            f"replica, `vmreplica remove {vm}` at both sites and `vmreplica enable` it again "
            "with the new --replica-site (or add a site beside it by enabling fan-out anew)"
        )
    fields = change.settings_fields()
    excluded = [d for d in current.excluded_disks if d not in change.include_disks]
    excluded += [d for d in change.exclude_disks if d not in excluded]
    fields["excluded_disks"] = tuple(excluded)
    if len(disks) - len(change.exclude_disks) + len(change.include_disks) < 1:
        raise ConfigurationError(f"VM {vm!r} would have no disk left to replicate")
    if change.replica_site is not None and change.replica_site in current.also_replicate_to:
        raise ConfigurationError(
            f"--replica-site {change.replica_site!r} already keeps a replica of VM {vm!r} (fan-out)"
        )
    return dataclasses.replace(current, **fields).validate()


def differences(before: VmSettings, after: VmSettings) -> dict[str, tuple[Any, Any]]:
    """Each setting that differs: name → (before, after)."""
    old, new = dataclasses.asdict(before), dataclasses.asdict(after)
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}
