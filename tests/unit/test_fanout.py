"""Who follows whom when a VM on three sites fails over (pure rules, no broker)."""

from __future__ import annotations

import pytest

from vmreplica.domain.model import DiskRecord, Role, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError
from vmreplica.failover.fanout import check_target, regroup
from vmreplica.failover.planned import takes_over
from vmreplica.schemas.events import FailoverPrepared


def record(role: Role, partner: str, *others: str) -> VmRecord:
    return VmRecord(
        "web01",
        role,
        "tg",
        partner,
        VmSettings(capture="nbd", also_replicate_to=others),
        3,
        ReplicationState.REPLICATING,
        "",
        0,
        (DiskRecord("system", "/x/system.img", 1 << 20),),
    )


@pytest.mark.parametrize(
    ("here", "before", "primary", "partner", "others"),
    [
        # A (primary, replica B, also C) fails over to B: the planned default.
        ("site-b", record("replica", "site-a", "site-c"), "site-b", "site-a", ("site-c",)),
        ("site-a", record("primary", "site-b", "site-c"), "site-b", "site-b", ("site-c",)),
        ("site-c", record("replica", "site-a", "site-b"), "site-b", "site-b", ("site-a",)),
        # ... or to C, the site named second.
        ("site-c", record("replica", "site-a", "site-b"), "site-c", "site-a", ("site-b",)),
        ("site-a", record("primary", "site-b", "site-c"), "site-c", "site-c", ("site-b",)),
        ("site-b", record("replica", "site-a", "site-c"), "site-c", "site-c", ("site-a",)),
        # Two sites: nothing else to follow.
        ("site-b", record("replica", "site-a"), "site-b", "site-a", ()),
        ("site-a", record("primary", "site-b"), "site-b", "site-b", ()),
    ],
)
def test_every_site_regroups_around_the_new_primary(
    here: str, before: VmRecord, primary: str, partner: str, others: tuple[str, ...]
) -> None:
    got_partner, settings = regroup(before, here, primary)
    assert (got_partner, settings.also_replicate_to) == (partner, others)
    assert settings.capture == "nbd"  # everything else is kept


def test_the_target_defaults_to_the_replica_site_enable_named() -> None:
    primary = record("primary", "site-b", "site-c")
    assert check_target(primary, "") == "site-b"
    assert check_target(primary, "site-c") == "site-c"
    with pytest.raises(ConfigurationError, match="'site-a' is not a replica site"):
        check_target(primary, "site-a")


def test_only_the_named_replica_takes_over() -> None:
    prepared = FailoverPrepared("web01", 3, 41, b"h" * 32, 0, "site-a", target="site-c")
    assert takes_over(prepared, "site-c")
    assert not takes_over(prepared, "site-b")
    legacy = FailoverPrepared("web01", 3, 41, b"h" * 32, 0, "site-a")  # schema version 2
    assert takes_over(legacy, "site-b")
    assert takes_over(legacy, "site-c")
