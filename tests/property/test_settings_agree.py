"""`enable` refuses every recovery-point setting the replica would refuse: whatever
:meth:`VmSettings.validate` accepts, the replica's retention policy accepts too (the replica
builds it from the same settings, carried by VmConfig, and a refusal there would stop its
worker every 30 s, as `--recovery-history 2 --app-consistent-hours 4` once did)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from vmreplica.consumers.replica import retention_policy
from vmreplica.domain.model import DiskRecord, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError

RECORD = VmRecord(
    "vm", "replica", "tg", "site-a", VmSettings(), 1, ReplicationState.REPLICATING, "", 0,
    (DiskRecord("disk0", "/d.img", 4096),),
)  # fmt: skip
hours = st.integers(-1, 30)


@given(hours, st.one_of(st.none(), hours), st.one_of(st.none(), st.integers(-1, 14)))
def test_what_enable_accepts_the_replica_accepts(
    history: int, continuous: int | None, app_consistent: int | None
) -> None:
    settings = VmSettings(
        recovery_history=history,
        continuous_points_hours=continuous,
        app_consistent_hours=app_consistent,
    )
    try:
        settings.validate()
    except ConfigurationError:
        return
    retention_policy(replace(RECORD, settings=settings))  # must not raise
