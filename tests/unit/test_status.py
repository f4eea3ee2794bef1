"""What `vmreplica status --json` prints and what the metrics show, for a primary and a replica.

Pinned key by key and value by value: scripts read this JSON, so a refactoring of the status
type must not change one character of it. No broker is needed (``with_replica=False`` skips the
status topic, as the agent's metrics loop does).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.cli.replication import status_json
from vmreplica.config import SiteConfig
from vmreplica.domain.model import Consistency, DiskRecord, Position, RecoveryPoint, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.runtime.metrics import CycleStat, SiteMetrics
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import VmStatus, vm_status
from vmreplica.storage.catalog import Catalog

NOW_MS = 1_800_000_000_000


def as_json(status: VmStatus) -> dict[str, Any]:
    return status_json(status)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW_MS / 1000)


async def test_primary_and_replica_status_json(tmp_path: Path) -> None:
    config = SiteConfig(
        site="site-a", root=tmp_path / "root", bootstrap_servers="127.0.0.1:1", nbd_tcp_port=10809
    )
    async with Site(config) as site:
        catalog = site.catalog
        await catalog.add_vm(
            "web",
            "primary",
            "tg",
            "site-b",
            VmSettings(frequency_seconds=30, capture="nbd"),
            [DiskRecord("disk0", "/images/web0.img", 4096)],
            ReplicationState.REPLICATING,
        )
        await catalog.add_vm(
            "db",
            "replica",
            "tg",
            "site-b",
            VmSettings(),
            [
                DiskRecord("disk0", "/images/db0.img", 8192),
                DiskRecord("disk1", "/images/db1.img", 4096),
            ],
            ReplicationState.REPLICATING,
            epoch=3,
        )
        await catalog.add_vm(
            "idle",
            "replica",
            "tg",
            "site-c",
            VmSettings(),
            [DiskRecord("disk0", "/images/idle.img", 4096)],
            ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
        )
        await _ship(site, "web", NOW_MS - 12_345)
        await _ship(site, "db", NOW_MS - 2_000)

        web = as_json(await vm_status(site, await catalog.vm("web"), with_replica=False))
        db = as_json(await vm_status(site, await catalog.vm("db"), with_replica=False))
        idle = as_json(await vm_status(site, await catalog.vm("idle"), with_replica=False))
        socket = f"{tmp_path}/root/vms/web/nbd.sock"
        assert web == {
            "vm": "web",
            "role": "primary",
            "state": "replicating",
            "message": "",
            "epoch": 1,
            "partner_site": "site-b",
            "disks": [{"name": "disk0", "path": "/images/web0.img", "size_bytes": 4096}],
            "capture": "nbd",
            "nbd_socket": socket,
            "nbd": {
                "disk0": {
                    "unix": f"nbd+unix:///disk0?socket={socket}",
                    "tcp": "nbd://127.0.0.1:10809/web.disk0",
                }
            },
            "health": "normal",
            "health_reasons": [],
            "seconds_behind": 12.8,
            "cycles_in_window": 1,
            "pending_bytes": 0,
            "replica_cycle": None,
            "replica_applied_at_ms": None,
            "last_sent_cycle": 1,
        }
        assert db == {
            "vm": "db",
            "role": "replica",
            "state": "replicating",
            "message": "",
            "epoch": 3,
            "partner_site": "site-b",
            "disks": [
                {"name": "disk0", "path": "/images/db0.img", "size_bytes": 8192},
                {"name": "disk1", "path": "/images/db1.img", "size_bytes": 4096},
            ],
            "capture": "api",
            "health": "normal",
            "health_reasons": [],
            "seconds_behind": 2.5,
            "cycles_in_window": 1,
            "last_applied_cycle": 1,
            "recovery_points": 0,
        }
        assert idle == {
            "vm": "idle",
            "role": "replica",
            "state": "waiting for initial replication",
            "message": "",
            "epoch": 1,
            "partner_site": "site-c",
            "disks": [{"name": "disk0", "path": "/images/idle.img", "size_bytes": 4096}],
            "capture": "api",
            "health": "warning",
            "health_reasons": ["state is waiting for initial replication"],
            "seconds_behind": None,
            "cycles_in_window": 0,
            "last_applied_cycle": None,
            "recovery_points": 0,
        }


async def test_an_unservable_nbd_socket_is_reported_not_raised(tmp_path: Path) -> None:
    config = SiteConfig(site="site-a", root=tmp_path / ("r" * 120), bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site:
        await site.catalog.add_vm(
            "web",
            "primary",
            "tg",
            "site-b",
            VmSettings(capture="nbd"),
            [DiskRecord("disk0", "/images/web0.img", 4096)],
            ReplicationState.READY_FOR_INITIAL_REPLICATION,
        )
        web = as_json(await vm_status(site, await site.catalog.vm("web"), with_replica=False))
    assert set(web) == {
        "vm",
        "role",
        "state",
        "message",
        "epoch",
        "partner_site",
        "disks",
        "capture",
        "nbd_error",
        "health",
        "health_reasons",
        "seconds_behind",
        "cycles_in_window",
        "pending_bytes",
        "replica_cycle",
        "replica_applied_at_ms",
        "last_sent_cycle",
        "initial_replication",
    }
    assert web["initial_replication"] == {
        "mode": "network",
        "examined_bytes": 0,
        "total_bytes": 4096,
        "scheduled_at_ms": None,
    }
    assert web["nbd_error"].startswith("NBD socket path ")
    assert web["last_sent_cycle"] is None


async def test_metrics_follow_the_status(tmp_path: Path) -> None:
    config = SiteConfig(site="site-a", root=tmp_path / "root", bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site:
        await site.catalog.add_vm(
            "db",
            "replica",
            "tg",
            "site-b",
            VmSettings(),
            [DiskRecord("disk0", "/images/db0.img", 4096)],
            ReplicationState.REPLICATING,
        )
        await _ship(site, "db", NOW_MS - 4_000)
        metrics = SiteMetrics("site-a")
        metrics.update(
            await vm_status(site, await site.catalog.vm("db"), with_replica=False),
            [CycleStat(*row) for row in await site.catalog.cycle_stats("db", 0)],
            await site.catalog.position("db"),
        )
    labels = {"site": "site-a", "vm": "db", "role": "replica"}
    sample = metrics.registry.get_sample_value
    assert sample("vmreplica_vm_state", {**labels, "state": "replicating"}) == 1.0
    assert sample("vmreplica_vm_state", {**labels, "state": "error"}) == 0.0
    assert sample("vmreplica_vm_health", {**labels, "health": "normal"}) == 1.0
    assert sample("vmreplica_last_cycle", labels) == 1.0
    assert (
        sample("vmreplica_last_successful_cycle_timestamp_seconds", labels)
        == (NOW_MS - 4_000) / 1000
    )
    assert sample("vmreplica_rpo_seconds", labels) == 4.5
    assert sample("vmreplica_recovery_points", labels) == 0.0
    assert sample("vmreplica_cycles_in_window", labels) == 1.0
    assert sample("vmreplica_pending_bytes", labels) is None


async def _ship(site: Site, vm: str, at_ms: int) -> None:
    """Record cycle 1 of ``vm`` as done at ``at_ms``, without a recovery point.

    Its cut is 500 ms earlier: seconds behind is the RPO, counted from the cut (the newest
    instant the site holds every write), not from when the cycle was done.
    """
    await site.catalog.advance_position(
        vm, Position(1, 1, bytes(32), 10, at_ms), cut_at_ms=at_ms - 500, size_bytes=4096
    )


def test_cli_status_and_points_json(tmp_path: Path) -> None:
    """The CLI's edge: the same keys and values as before status became a dataclass."""
    config_file = tmp_path / "site.toml"
    config_file.write_text(
        f'site = "site-a"\nroot = "{tmp_path / "root"}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )

    async def prepare() -> None:
        async with Catalog(tmp_path / "root" / "catalog.sqlite") as catalog:
            await catalog.add_vm(
                "db",
                "replica",
                "tg",
                "site-b",
                VmSettings(),
                [DiskRecord("disk0", "/images/db0.img", 4096)],
                ReplicationState.REPLICATING,
            )
            for cycle, kind in ((1, Consistency.APPLICATION), (2, Consistency.CRASH)):
                await catalog.advance_position(
                    "db",
                    Position(1, cycle, bytes(32), cycle * 10 + 1, NOW_MS - 1000),
                    point=RecoveryPoint(
                        cycle,
                        1,
                        cycle * 10,
                        NOW_MS - 60_000 * (3 - cycle),
                        kind,
                        bytes([cycle]) * 32,
                    ),
                    cut_at_ms=NOW_MS - 60_000,
                    size_bytes=4096,
                )

    asyncio.run(prepare())
    runner = CliRunner()
    status = runner.invoke(main, ["status", "--json", "--config", str(config_file)])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output) == [
        {
            "vm": "db",
            "role": "replica",
            "state": "replicating",
            "message": "",
            "epoch": 1,
            "partner_site": "site-b",
            "disks": [{"name": "disk0", "path": "/images/db0.img", "size_bytes": 4096}],
            "capture": "api",
            "health": "normal",
            "health_reasons": [],
            "seconds_behind": 60.0,
            "cycles_in_window": 2,
            "last_applied_cycle": 2,
            "recovery_points": 2,
        }
    ]
    assert status.output.index('"capture"') < status.output.index('"cycles_in_window"')
    points = runner.invoke(main, ["points", "list", "db", "--json", "--config", str(config_file)])
    assert points.exit_code == 0, points.output
    assert json.loads(points.output) == [
        {
            "point": 1,
            "epoch": 1,
            "offset": 10,
            "cut_at_ms": NOW_MS - 120_000,
            "consistency": "application",
        },
        {
            "point": 2,
            "epoch": 1,
            "offset": 20,
            "cut_at_ms": NOW_MS - 60_000,
            "consistency": "crash",
        },
    ]
