"""Typed failover and resync requests through the agent's mailbox: a round trip for every kind,
rows of the untyped format before them, unreadable requests, and how the agent reports
outcomes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.model import DiskRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, FailoverRefused, HookError
from vmreplica.failover.requests import (
    REQUEST_TYPES,
    CancelFailover,
    CompleteFailover,
    FailoverRequest,
    PlannedFailover,
    RemoveReplication,
    Resynchronize,
    ReverseReplication,
    StopInitialReplication,
    UnplannedFailover,
    carry_out,
    post_request,
    posted_request,
    request_fields,
    request_from,
)
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.mailbox import Mailbox

REQUESTS: list[FailoverRequest] = [
    PlannedFailover("vm1", reverse=True, start=False, verify=True),
    PlannedFailover("vm1"),
    PlannedFailover("vm1", reverse=True, target="site-c"),
    UnplannedFailover("vm 2", point="17", force=True),
    UnplannedFailover("vm2"),
    CompleteFailover("vm3"),
    CancelFailover("vm4"),
    ReverseReplication("vm5"),
    ReverseReplication("vm5", full_copy=True),
    Resynchronize("vm6"),
    Resynchronize("vm6", site="site-c", at_ms=1_800_000_000_000),
    Resynchronize("vm6", cancel=True),
    RemoveReplication("vm7"),
    StopInitialReplication("vm8"),
]


def test_every_kind_is_known_once() -> None:
    assert sorted(REQUEST_TYPES) == [
        "cancel",
        "complete",
        "initial-stop",
        "planned",
        "remove",
        "resync",
        "reverse",
        "unplanned",
    ]
    assert {type(r) for r in REQUESTS} == set(REQUEST_TYPES.values())


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
async def test_round_trip_through_the_mailbox(tmp_path: Path, request_: FailoverRequest) -> None:
    async with Mailbox(tmp_path / "catalog.sqlite") as mailbox:
        posted_id = await post_request(mailbox, request_)
        [pending] = await mailbox.pending()
        assert (pending.id, pending.vm, pending.kind, pending.status) == (
            posted_id,
            request_.vm,
            request_.kind,
            "pending",
        )
        assert posted_request(pending) == request_
        await mailbox.finish(posted_id, "done", "ok")
        assert await mailbox.pending() == []
        done = await mailbox.request(posted_id)
        assert (done.status, done.result) == ("done", "ok")


async def test_rows_of_the_untyped_format_read_as_typed_requests(tmp_path: Path) -> None:
    """``add_request(vm, action, arguments)`` wrote these before requests had types."""
    path = tmp_path / "catalog.sqlite"
    async with Catalog(path):  # an existing site: the catalog made the file first
        pass
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS request (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " vm TEXT NOT NULL, action TEXT NOT NULL, arguments TEXT NOT NULL,"
            " status TEXT NOT NULL DEFAULT 'pending', result TEXT NOT NULL DEFAULT '',"
            " created_ms INTEGER NOT NULL)"
        )
        db.executemany(
            "INSERT INTO request (vm, action, arguments, created_ms) VALUES (?, ?, ?, 0)",
            [
                ("vm1", "planned", '{"reverse": true, "start": false, "verify": false}'),
                ("vm2", "unplanned", '{"point": "latest", "force": true}'),
                ("vm3", "complete", "{}"),
                ("vm4", "cancel", "{}"),
                ("vm5", "reverse", "{}"),
            ],
        )
    async with Mailbox(path) as mailbox:
        assert [posted_request(p) for p in await mailbox.pending()] == [
            PlannedFailover("vm1", reverse=True),
            UnplannedFailover("vm2", force=True),
            CompleteFailover("vm3"),
            CancelFailover("vm4"),
            ReverseReplication("vm5"),
        ]


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        (
            "teleport",
            {},
            "unknown failover request 'teleport' for VM 'vm'; this version knows "
            "cancel, complete, initial-stop, planned, remove, resync, reverse, unplanned",
        ),
        ("resync", {"at_ms": "18:30"}, "option 'at_ms' must be a int, not '18:30'"),
        ("planned", {"reverse": True, "eject": True}, "has an unknown option 'eject'"),
        ("planned", {"vm": "other"}, "has an unknown option 'vm'"),
        ("planned", {"kind": "unplanned"}, "has an unknown option 'kind'"),
        ("unplanned", {"force": "yes"}, "option 'force' must be a bool, not 'yes'"),
        ("unplanned", {"point": 17}, "option 'point' must be a str, not 17"),
        ("complete", [], "its options are not a JSON object: []"),
        ("complete", "{garbled", "its options are not a JSON object: '{garbled'"),
    ],
)
def test_unreadable_requests_are_configuration_errors(
    kind: str, fields: object, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        request_from(kind, "vm", fields)
    assert message in str(caught.value)


def test_fields_leave_out_the_vm() -> None:
    assert request_fields(UnplannedFailover("vm", "3", True)) == {"point": "3", "force": True}
    assert request_fields(ReverseReplication("vm")) == {"full_copy": False}
    assert request_fields(PlannedFailover("vm", target="site-c")) == {
        "reverse": False,
        "start": False,
        "verify": False,
        "target": "site-c",
    }


async def test_agent_liveness(tmp_path: Path) -> None:
    async with Mailbox(tmp_path / "catalog.sqlite") as mailbox:
        assert not await mailbox.agent_running("site-a")
        await mailbox.agent_alive("site-a", os.getpid())
        assert await mailbox.agent_running("site-a")
        assert not await mailbox.agent_running("site-b")
        await mailbox.agent_alive("site-b", 2**22 + 1)  # above pid_max: no such process
        assert await mailbox.agent_seen_ms("site-b") is None
        await mailbox.agent_gone("site-a")
        assert not await mailbox.agent_running("site-a")


async def test_agent_finishes_requests_failed_refused_or_done(tmp_path: Path) -> None:
    """A mistake fails (the CLI exits 2), a refusal is refused (exit 1); neither stops the
    agent. No broker is needed: both are decided before anything reaches Kafka."""
    config = SiteConfig(site="site-a", root=tmp_path, bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site, Mailbox(config.catalog_path) as mailbox:
        await site.catalog.add_vm(
            "vm1",
            "replica",
            "tg",
            "site-b",
            VmSettings(),
            [DiskRecord("disk0", str(tmp_path / "d.img"), 4096)],
            ReplicationState.REPLICATING,
        )
        unknown = await mailbox.post("vm1", "teleport", {})
        refused = await post_request(mailbox, CompleteFailover("vm1"))
        missing = await post_request(mailbox, CompleteFailover("ghost"))
        replica = await post_request(mailbox, Resynchronize("vm1"))
        agent = Agent(site)
        await agent.mailbox.start()
        try:
            await agent._carry_out_requests()
        finally:
            await agent.mailbox.stop()
        outcomes = [
            (r.status, r.result)
            for r in [await mailbox.request(i) for i in (unknown, refused, missing, replica)]
        ]
        assert outcomes == [
            (
                "failed",
                "unknown failover request 'teleport' for VM 'vm1'; this version knows "
                "cancel, complete, initial-stop, planned, remove, resync, reverse, unplanned",
            ),
            ("refused", "VM 'vm1' is 'replicating', not failed over waiting completion"),
            (
                "failed",
                "VM 'ghost' is not replicated at this site; `vmreplica status` lists the VMs",
            ),
            (
                "failed",
                "VM 'vm1' is a replica at site site-a; a resync starts on its primary: "
                "run `vmreplica resync vm1` at site-b",
            ),
        ]
        assert await mailbox.pending() == []


async def test_a_failing_stop_hook_refuses_the_planned_failover(tmp_path: Path) -> None:
    """The hypervisor hooks run through the one hook runner; a failure is a FailoverRefused
    (exit 1) and the failover does not start."""
    seen = tmp_path / "seen"
    config = SiteConfig(
        site="site-a",
        root=tmp_path,
        bootstrap_servers="127.0.0.1:1",
        vm_stop_command=f"echo {{vm}} $VMREPLICA_HOOK $VMREPLICA_SITE > {seen};"
        " echo 'no such domain' >&2; exit 4",
    )
    async with Site(config) as site:
        await site.catalog.add_vm(
            "vm1",
            "primary",
            "tg",
            "site-b",
            VmSettings(),
            [DiskRecord("disk0", str(tmp_path / "d.img"), 4096)],
            ReplicationState.REPLICATING,
        )
        with pytest.raises(FailoverRefused) as caught:
            await carry_out(site, PlannedFailover("vm1", reverse=True))
        assert str(caught.value) == (
            f"VM 'vm1': stop hook {config.vm_stop_command!r} exited with 4: no such domain. "
            "The planned failover did not start; VM 'vm1' stays primary here. Operator action: "
            "stop the VM by other means (or fix vm_stop_command or --hypervisor), then retry"
        )
        assert isinstance(caught.value.__cause__, HookError)
        assert seen.read_text() == "vm1 stop site-a\n"
        assert (await site.catalog.vm("vm1")).state is ReplicationState.REPLICATING


async def test_a_planned_failover_to_a_site_that_is_no_replica_is_refused_before_the_stop(
    tmp_path: Path,
) -> None:
    """The target is checked first: the VM is neither stopped nor fenced, and stays primary."""
    seen = tmp_path / "seen"
    config = SiteConfig(
        site="site-a",
        root=tmp_path,
        bootstrap_servers="127.0.0.1:1",
        vm_stop_command=f"echo stopped > {seen}",
    )
    async with Site(config) as site:
        await site.catalog.add_vm(
            "vm1",
            "primary",
            "tg",
            "site-b",
            VmSettings(also_replicate_to=("site-c",)),
            [DiskRecord("disk0", str(tmp_path / "d.img"), 4096)],
            ReplicationState.REPLICATING,
        )
        with pytest.raises(ConfigurationError) as caught:
            await carry_out(site, PlannedFailover("vm1", target="site-x"))
        assert str(caught.value) == (
            "site 'site-x' is not a replica site of VM 'vm1'; its replica sites are site-b, "
            "site-c. The VM stays primary here"
        )
        assert not seen.exists()
        assert (await site.catalog.vm("vm1")).state is ReplicationState.REPLICATING
