"""The event log and the durable statistics in the catalog, and the commands that show them
(`measure`, `reset-statistics`, `events`, `suspend`, `resume`) with their errors.

No broker: the catalog is written directly, the commands run through click's runner.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.config import SiteConfig
from vmreplica.domain.events import EventId, EventLevel
from vmreplica.domain.model import Consistency, DiskRecord, Position, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import StateRefused
from vmreplica.runtime.metrics import SiteMetrics
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.storage import history
from vmreplica.storage.catalog import Catalog

NOW_MS = 1_800_000_000_000


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW_MS / 1000)


async def _add(catalog: Catalog, name: str = "web", role: str = "primary") -> None:
    await catalog.add_vm(
        name,
        role,  # type: ignore[arg-type]
        "tg",
        "site-b",
        VmSettings(frequency_seconds=30),
        [DiskRecord("disk0", f"/images/{name}.img", 4096)],
        ReplicationState.REPLICATING,
    )


async def _ids(catalog: Catalog, vm: str | None = "web") -> list[int]:
    return [e.event_id for e in await history.events(catalog, vm)]


async def test_a_state_change_is_logged_once_in_its_transaction(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await _add(catalog)
        await catalog.set_state("web", ReplicationState.ERROR, "broker away")
        await catalog.set_state("web", ReplicationState.ERROR, "broker still away")
        await catalog.set_state("web", ReplicationState.REPLICATING)
        found = await history.events(catalog, "web")
    assert [(e.event_id, e.level, e.message) for e in found] == [
        (
            EventId.REPLICATION_ENABLED,
            EventLevel.INFORMATION,
            "replication enabled: primary here, partner site site-b, replicating",
        ),
        (
            EventId.STATE_ERROR,
            EventLevel.ERROR,
            "state changed from replicating to error: broker away",
        ),
        (
            EventId.STATE_REPLICATING,
            EventLevel.INFORMATION,
            "state changed from error to replicating",
        ),
    ]
    assert [e.seq for e in found] == [1, 2, 3]
    assert found[1].name == "state_error"


async def test_role_changes_test_failovers_and_failures_are_logged(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await _add(catalog, role="replica")
        await catalog.set_test_failover("web", 7, "requested")
        await catalog.set_test_failover("web", 7, "ready", "nbd+unix:///disk0")
        await catalog.clear_test_failover("web")
        await catalog.set_test_failover("web", 8, "failed", "no such point")
        await catalog.clear_test_failover("web")  # a failed one is not "stopped"
        await catalog.record_failure("web", "hook", "pre-cut hook exited 1")
        await catalog.change_role(
            "web",
            "primary",
            "site-a",
            2,
            ReplicationState.FAILED_OVER_WAITING_COMPLETION,
            "unplanned failover at point 7",
        )
        assert await _ids(catalog) == [
            EventId.REPLICATION_ENABLED,
            EventId.TEST_FAILOVER_STARTED,
            EventId.TEST_FAILOVER_STOPPED,
            EventId.TEST_FAILOVER_FAILED,
            EventId.FAILED_APPLICATION_CONSISTENT,
            EventId.STATE_FAILED_OVER_WAITING_COMPLETION,
            EventId.BECAME_PRIMARY,
        ]
        durable = await history.durable_statistics(catalog, "web")
        assert durable.last_test_failover_ms == NOW_MS
        assert await history.failures(catalog, "web", NOW_MS) == {
            EventId.FAILED_APPLICATION_CONSISTENT: 1
        }
        # removal is logged, and its events outlive the VM
        await catalog.remove_vm("web")
        assert (await _ids(catalog))[-1] == EventId.REPLICATION_REMOVED
        assert await catalog.find_vm("web") is None


async def test_statistics_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async with Catalog(path) as catalog:
        await _add(catalog)
        await catalog.record_initial_replication("web", 65536)
        await catalog.advance_position(
            "web",
            Position(1, 1, bytes(32), 5, NOW_MS - 1000),
            cut_at_ms=NOW_MS - 2000,
            size_bytes=10,
            consistency=Consistency.APPLICATION,
        )
        await catalog.advance_position(
            "web", Position(1, 2, bytes(32), 9, NOW_MS), cut_at_ms=NOW_MS - 500, size_bytes=10
        )
        await catalog.reset_statistics("web")
    async with Catalog(path) as catalog:
        durable = await history.durable_statistics(catalog, "web")
        assert await _ids(catalog) == [
            EventId.REPLICATION_ENABLED,
            EventId.INITIAL_REPLICATION_COMPLETED,
            EventId.STATISTICS_RESET,
        ]
    assert (durable.initial_replication_bytes, durable.initial_replication_at_ms) == (
        65536,
        NOW_MS,
    )
    assert (durable.last_app_consistent_ms, durable.reset_at_ms) == (NOW_MS - 2000, NOW_MS)


async def test_the_log_is_pruned_by_count_and_by_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "EVENTS_KEPT", 5)
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await _add(catalog)
        for n in range(10):
            await catalog.record_failure("web", "network", f"attempt {n}")
        kept = await history.events(catalog, "web")
        assert [e.message for e in kept] == [f"attempt {n}" for n in range(5, 10)]
        # thirty-one days later, one more event: everything older than thirty days goes
        later = NOW_MS + 31 * 86_400_000
        monkeypatch.setattr(time, "time", lambda: later / 1000)
        await catalog.record_failure("web", "network", "a month later")
        assert [e.message for e in await history.events(catalog)] == ["a month later"]


def _site(tmp_path: Path) -> Path:
    config = tmp_path / "site.toml"
    config.write_text(
        f'site = "site-a"\nroot = "{tmp_path / "root"}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )

    async def prepare() -> None:
        async with Catalog(tmp_path / "root" / "catalog.sqlite") as catalog:
            await _add(catalog)
            await _add(catalog, "db", "replica")
            for cycle in (1, 2, 3):
                await catalog.advance_position(
                    "web",
                    Position(1, cycle, bytes(32), cycle * 10, NOW_MS - (4 - cycle) * 30_000),
                    cut_at_ms=NOW_MS - (4 - cycle) * 30_000 - cycle * 1000,
                    size_bytes=cycle * 1000,
                    started_at_ms=NOW_MS - (5 - cycle) * 30_000,
                )
            await catalog.record_failure("web", "network", "broker away")

    asyncio.run(prepare())
    return config


def test_measure_and_reset_starts_the_window_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(_site(tmp_path))
    runner = CliRunner()
    measured = runner.invoke(main, ["measure", "web", "--json", "--config", config])
    assert measured.exit_code == 0, measured.output
    (row,) = json.loads(measured.output)
    assert row == {
        "vm": "web",
        "role": "primary",
        "state": "replicating",
        "health": "normal",
        "health_reasons": [],
        "partner_site": "site-b",
        "monitoring_start_ms": NOW_MS - 3_600_000,
        "monitoring_end_ms": NOW_MS,
        "average_size_bytes": 2000,
        "maximum_size_bytes": 3000,
        "average_latency_seconds": 2.0,
        "maximum_latency_seconds": 3.0,
        "successful_cycles": 3,
        "missed_cycles": 0,
        "failed_cycles": {"network": 1, "replication": 0, "application_consistent": 0},
        "errors": 1,
        "pending_bytes": 0,
        "last_replication_ms": NOW_MS - 30_000,
        "initial_replication_bytes": None,
        "last_app_consistent_ms": None,
        "last_test_failover_ms": None,
        "seconds_behind": 33.0,
    }
    monkeypatch.setattr(time, "time", lambda: (NOW_MS + 1) / 1000)
    reset = runner.invoke(main, ["reset-statistics", "web", "--config", config])
    assert reset.exit_code == 0, reset.output
    (after,) = json.loads(
        runner.invoke(main, ["measure", "web", "--json", "--config", config]).output
    )
    assert (after["monitoring_start_ms"], after["successful_cycles"], after["errors"]) == (
        NOW_MS + 1,
        0,
        0,
    )
    assert after["last_replication_ms"] == NOW_MS - 30_000  # a fact, not reset
    table = runner.invoke(main, ["measure", "--config", config])
    assert table.exit_code == 0, table.output
    assert "failed: network" in table.output
    assert "db" in table.output


def test_events_json_and_suspend_resume(tmp_path: Path) -> None:
    config = str(_site(tmp_path))
    runner = CliRunner()
    assert runner.invoke(main, ["suspend", "web", "--config", config]).exit_code == 0
    again = runner.invoke(main, ["suspend", "web", "--config", config])
    assert again.exit_code == 1
    assert "is suspended, not replicating" in again.output
    assert runner.invoke(main, ["resume", "web", "--config", config]).exit_code == 0
    events = runner.invoke(main, ["events", "web", "--json", "--config", config])
    assert events.exit_code == 0, events.output
    assert [(e["event_id"], e["name"], e["message"]) for e in json.loads(events.output)] == [
        (
            1000,
            "replication_enabled",
            "replication enabled: primary here, partner site site-b, replicating",
        ),
        (2001, "failed_network", "broker away"),
        (
            1105,
            "state_suspended",
            "state changed from replicating to suspended: suspended by the operator",
        ),
        (
            1101,
            "state_replicating",
            "state changed from suspended to replicating: resumed by the operator",
        ),
    ]
    every = runner.invoke(main, ["events", "--config", config])
    assert every.exit_code == 0
    assert "1000  information  db: replication enabled: replica here" in every.output


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["measure", "nope"], 2, "VM 'nope' is not replicated at this site"),
        (["reset-statistics", "nope"], 2, "VM 'nope' is not replicated at this site"),
        (["events", "nope"], 2, "VM 'nope' is not replicated at this site"),
        (["suspend", "nope"], 2, "VM 'nope' is not replicated at this site"),
        (["resume", "db"], 1, "VM 'db' is replicating, not suspended"),
        (["resume", "web"], 1, "VM 'web' is replicating, not suspended"),
        (["test-connection", "nope"], 2, "VM 'nope' is not replicated at this site"),
        (["test-connection", "web"], 1, "VM 'web': broker failed (see above). Operator action"),
    ],
)
def test_mistakes_and_refusals(tmp_path: Path, argv: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(main, [*argv, "--config", str(_site(tmp_path))])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


async def test_the_metrics_show_the_durable_statistics(tmp_path: Path) -> None:
    config = SiteConfig(site="site-b", root=tmp_path / "root", bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site:
        await _add(site.catalog, "db", "replica")
        await site.catalog.advance_position(
            "db",
            Position(1, 1, bytes(32), 5, NOW_MS - 1000),
            cut_at_ms=NOW_MS - 2000,
            size_bytes=10,
            consistency=Consistency.APPLICATION,
        )
        await site.catalog.set_test_failover("db", 1, "ready", "nbd+unix:///disk0")
        status = await vm_status(site, await site.catalog.vm("db"), with_replica=False)
    metrics = SiteMetrics("site-b")
    metrics.update(status)
    labels = {"site": "site-b", "vm": "db", "role": "replica"}
    sample = metrics.registry.get_sample_value
    assert sample("vmreplica_last_app_consistent_timestamp_seconds", labels) == NOW_MS / 1000 - 2
    assert sample("vmreplica_last_test_failover_timestamp_seconds", labels) == NOW_MS / 1000
    assert status.statistics is not None
    assert status.statistics.last_test_failover_ms == NOW_MS


async def test_a_state_change_from_an_expected_state_is_checked_in_its_transaction(
    tmp_path: Path,
) -> None:
    async with Catalog(tmp_path / "c.sqlite") as catalog:
        await _add(catalog)
        await catalog.set_state("web", ReplicationState.ERROR, "broker away")
        with pytest.raises(StateRefused) as refused:
            await catalog.set_state(
                "web", ReplicationState.SUSPENDED, expected=ReplicationState.REPLICATING
            )
        assert str(refused.value).startswith("VM 'web' is error, not replicating: nothing")
        assert (await catalog.vm("web")).state is ReplicationState.ERROR
        assert (await _ids(catalog))[-1] == EventId.STATE_ERROR  # no event for the refusal
