"""`test-connection`'s access check against the secured broker: a site with its trust group's
ACLs may do what replication does; a site whose principal holds another group's rights is told
which resource refused it and what to grant. On the plain broker (no authorizer) everything is
allowed. Nothing is changed by asking: the VM's producer is not fenced.
"""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.connection import Check, connection_checks

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture(params=["plain", "secured"])
def broker_security(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _named(checks: list[Check], name: str) -> Check:
    (check,) = [c for c in checks if c.name == name]
    return check


async def test_access_check_names_what_the_acls_refuse(
    sites: SiteFactory, vm: VmFactory, broker_security: str
) -> None:
    site_a = await sites.start("site-a")
    enabled = await vm(site_a, {"disk0": MiB}, VmSettings(frequency_seconds=30))
    record = await site_a.catalog.vm(enabled.name)
    async with site_a.primary(record) as primary:  # a live producer, not fenced by the check
        checks = await connection_checks(site_a, record)
        access = _named(checks, "access")
        assert access.ok, access
        assert "may read, write and describe both topics" in access.detail
        await primary.heartbeat()  # its producer still publishes

    if broker_security == "plain":
        return
    await sites.add_principal("site-x", f"tg-other{uuid.uuid4().hex[:6]}")
    site_x = await sites.start("site-x")
    await site_x.catalog.add_vm(
        record.name, "replica", record.trust_group, "site-a", record.settings, [], record.state
    )
    checks = await connection_checks(site_x, await site_x.catalog.vm(record.name))
    access = _named(checks, "access")
    assert not access.ok
    assert f"topic {site_x.journal_topic(record.name)}: TopicAuthorizationFailedError" in (
        access.detail
    )
    assert "TransactionalIdAuthorizationFailed" in access.detail, access.detail
    assert f"vmreplica broker add-site site-x --trust-group {sites.trust_group}" in access.detail
