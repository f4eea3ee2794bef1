"""The settings a replica keeps for a VM: those its primary published in a signed ``VmConfig``.

One mapping, used when the replica adopts the VM (its first ``VmConfig``) and whenever a later
one says the primary's settings changed (`vmreplica set`): frequency (what missed cycles are
judged by), recovery history and application-consistent interval (which recovery points the
replica keeps), capture mode and compression (what it does if it takes over). The primary's
hooks and hypervisor adapter are its own and never travel.
"""

from __future__ import annotations

import dataclasses

from vmreplica.domain.model import VmSettings
from vmreplica.schemas.events import VmConfig


def replica_settings(config: VmConfig, site: str, current: VmSettings | None = None) -> VmSettings:
    """The replica ``site``'s settings for ``config``'s VM; ``current``: what it kept so far
    (this site's own fields, hooks and adapter, stay)."""
    return dataclasses.replace(
        current or VmSettings(),
        frequency_seconds=config.frequency_seconds,
        recovery_history=config.recovery_history,
        app_consistent_hours=config.app_consistent_hours,
        continuous_points_hours=config.continuous_points_hours,
        compression=config.compression,
        capture=config.capture,  # type: ignore[arg-type]  # check_event checked it
        continuous_max_bytes=config.continuous_max_bytes,
        also_replicate_to=tuple(
            s for s in config.replica_sites if s not in (site, config.primary_site)
        ),
        changelog_budget_bytes=config.changelog_budget_bytes,
        encrypt=bool(config.wrapped_keys),
        initial=config.initial,  # type: ignore[arg-type]  # check_event checked it
    )
