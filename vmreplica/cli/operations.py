"""CLI commands for operating replication: measure, reset-statistics, events, suspend, resume.

`measure` prints Measure-VMReplication's statistics from the same computation as `status`
(:func:`vmreplica.runtime.status.vm_status`), so the two never disagree. `events` reads the
site's event log (:mod:`vmreplica.storage.history`); with ``--follow`` it keeps printing new
events until interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Final

import click
from rich.table import Table

from vmreplica.cli.replication import config_option, json_option, with_site
from vmreplica.cli.support import console, emit_json, reported
from vmreplica.config import load_config
from vmreplica.domain.events import Event
from vmreplica.domain.states import ReplicationState
from vmreplica.domain.statistics import FAILURE_COUNTS
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.runtime.connection import Check, connection_checks
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import VmStatus, vm_status
from vmreplica.storage import history

FOLLOW_POLL_SECONDS: Final = 0.5
"""How often `events --follow` looks for new events."""


def _stamp(ms: int | None) -> str:
    if ms is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def statistics_json(status: VmStatus) -> dict[str, Any]:
    """One VM of `measure --json`: Measure-VMReplication's fields, in base units."""
    statistics = status.statistics
    if statistics is None:  # vm_status always measures; a VmStatus built by hand may not
        raise ConfigurationError(f"VM {status.record.name!r}: no statistics were measured")
    record = status.record
    return {
        "vm": record.name,
        "role": record.role,
        "state": record.state.value,
        "health": status.report.health.value,
        "health_reasons": list(status.report.reasons),
        "partner_site": record.partner_site,
        "monitoring_start_ms": statistics.monitoring_start_ms,
        "monitoring_end_ms": statistics.monitoring_end_ms,
        "average_size_bytes": statistics.average_size_bytes,
        "maximum_size_bytes": statistics.maximum_size_bytes,
        "average_latency_seconds": statistics.average_latency_seconds,
        "maximum_latency_seconds": statistics.maximum_latency_seconds,
        "successful_cycles": statistics.successful_cycles,
        "missed_cycles": statistics.missed_cycles,
        "failed_cycles": dict(statistics.failed_cycles),
        "errors": statistics.errors,
        "pending_bytes": statistics.pending_bytes,
        "last_replication_ms": statistics.last_replication_ms,
        "initial_replication_bytes": statistics.initial_replication_bytes,
        "last_app_consistent_ms": statistics.last_app_consistent_ms,
        "last_test_failover_ms": statistics.last_test_failover_ms,
        "seconds_behind": status.seconds_behind,
    }


def statistics_table(rows: list[dict[str, Any]]) -> Table:
    """`measure` for people: one column per VM."""
    table = Table("statistic", *(row["vm"] for row in rows), title="replication statistics")

    def line(label: str, key: str, show: Any = str) -> None:
        table.add_row(label, *("" if r[key] is None else show(r[key]) for r in rows))

    line("state", "state")
    line("health", "health")
    line("window start (UTC)", "monitoring_start_ms", _stamp)
    line("average size (bytes)", "average_size_bytes")
    line("maximum size (bytes)", "maximum_size_bytes")
    line("average latency (s)", "average_latency_seconds")
    line("maximum latency (s)", "maximum_latency_seconds")
    line("successful cycles", "successful_cycles")
    line("missed cycles", "missed_cycles")
    for kind in FAILURE_COUNTS:
        table.add_row(
            f"failed: {kind.replace('application_consistent', 'app-consistent')}",
            *(str(r["failed_cycles"][kind]) for r in rows),
        )
    line("pending (bytes)", "pending_bytes")
    line("last replication (UTC)", "last_replication_ms", _stamp)
    line("initial size (bytes)", "initial_replication_bytes")
    line("last app-consistent", "last_app_consistent_ms", _stamp)
    line("last test failover", "last_test_failover_ms", _stamp)
    line("seconds behind", "seconds_behind")
    return table


@click.command()
@click.argument("vm", required=False)
@config_option
@json_option
@reported
def measure(vm: str | None, config_path: Path | None, as_json: bool) -> None:
    """Replication statistics of each VM over the monitoring window (Measure-VMReplication)."""

    async def collect(site: Site) -> list[VmStatus]:
        records = [await site.catalog.vm(vm)] if vm else await site.catalog.vms()
        return [await vm_status(site, record, with_replica=False) for record in records]

    rows = [statistics_json(status) for status in with_site(config_path, collect)]
    if as_json:
        emit_json(rows)
        return
    console.print(statistics_table(rows))
    for row in rows:
        for reason in row["health_reasons"]:
            console.print(f"{row['vm']}: {row['health']}: {reason}", highlight=False)


@click.command("reset-statistics")
@click.argument("vm")
@config_option
@reported
def reset_statistics(vm: str, config_path: Path | None) -> None:
    """Start VM's monitoring window now (Reset-VMReplicationStatistics): missed cycles and
    failures counted so far no longer count, so a Warning they caused turns back to Normal."""

    async def reset(site: Site) -> int:
        await site.catalog.vm(vm)
        return await site.catalog.reset_statistics(vm)

    at = with_site(config_path, reset)
    click.echo(f"statistics of VM {vm} reset at {_stamp(at)} UTC")


def event_json(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "vm": event.vm,
        "at_ms": event.at_ms,
        "event_id": event.event_id,
        "name": event.name,
        "level": event.level.value,
        "message": event.message,
    }


def _event_line(event: Event) -> str:
    return (
        f"{_stamp(event.at_ms)}  {event.event_id}  {event.level.value:<11}  {event.vm}: "
        f"{event.message}"
    )


@click.command()
@click.argument("vm", required=False)
@click.option("--follow", is_flag=True, help="Keep printing new events until interrupted.")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="How many of the newest events to print first.",
)
@config_option
@json_option
@reported
def events(
    vm: str | None, follow: bool, limit: int, config_path: Path | None, as_json: bool
) -> None:
    """The site's event log: state changes, failures, failovers, resyncs, with their ids.

    With --json, a JSON array; with --json --follow, one JSON object per line.
    """
    config = load_config(config_path)

    async def run() -> None:
        async with Site(config) as site:
            if (
                vm is not None
                and await site.catalog.find_vm(vm) is None
                and not await history.events(site.catalog, vm, limit=1)
            ):
                await site.catalog.vm(vm)  # raises: neither replicated nor ever logged here
            found = await history.events(site.catalog, vm, limit=limit)
            if as_json and not follow:
                emit_json([event_json(e) for e in found])
                return
            seq = 0
            while True:
                for event in found:
                    if as_json:
                        click.echo(_json_line(event))
                    else:
                        click.echo(_event_line(event))
                    seq = event.seq
                if not follow:
                    return
                await asyncio.sleep(FOLLOW_POLL_SECONDS)
                found = await history.events(site.catalog, vm, after_seq=seq)

    with contextlib.suppress(KeyboardInterrupt):  # --follow ends with Ctrl-C
        asyncio.run(run())


def _json_line(event: Event) -> str:
    return json.dumps(event_json(event), sort_keys=True)


@click.command()
@click.argument("vm")
@config_option
@reported
def suspend(vm: str, config_path: Path | None) -> None:
    """Suspend VM's replication (Suspend-VMReplication). On its primary: stop shipping cycles,
    writes keep being captured in the change log and ship on `resume`. On a replica: stop
    applying them; the journal keeps them (for its retention) until `resume`."""

    async def run(site: Site) -> str:
        record = await site.catalog.vm(vm)
        if record.state is not ReplicationState.REPLICATING:
            raise ReplicationError(
                f"VM {vm!r} is {record.state.value}, not replicating: only a replicating VM "
                "can be suspended. Operator action: wait for it to replicate "
                f"(`vmreplica status {vm}`)"
            )
        await site.catalog.set_state(
            vm,
            ReplicationState.SUSPENDED,
            "suspended by the operator",
            expected=ReplicationState.REPLICATING,
        )
        if record.role == "primary":
            return f"VM {vm} suspended: writes are kept and ship on `vmreplica resume {vm}`"
        return (
            f"VM {vm} suspended at this replica: the cycles its primary ships wait in the "
            f"journal (for its retention) and are applied on `vmreplica resume {vm}`; test "
            "failovers and recovery points still work"
        )

    click.echo(with_site(config_path, run))


@click.command()
@click.argument("vm")
@config_option
@reported
def resume(vm: str, config_path: Path | None) -> None:
    """Resume a suspended VM (Resume-VMReplication): its primary ships, its replica applies."""

    async def run(site: Site) -> str:
        record = await site.catalog.vm(vm)
        if record.state is not ReplicationState.SUSPENDED:
            raise ReplicationError(
                f"VM {vm!r} is {record.state.value}, not suspended: there is nothing to resume"
                + (
                    f". Operator action: `vmreplica resync {vm}`"
                    if record.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
                    else ""
                )
            )
        await site.catalog.set_state(
            vm,
            ReplicationState.REPLICATING,
            "resumed by the operator",
            expected=ReplicationState.SUSPENDED,
        )
        if record.role == "primary":
            return f"VM {vm} resumed: what was written meanwhile ships with the next cycle"
        return f"VM {vm} resumed at this replica: it applies the cycles that waited"

    click.echo(with_site(config_path, run))


@click.command("test-connection")
@click.argument("vm")
@config_option
@json_option
@reported
def test_connection(vm: str, config_path: Path | None, as_json: bool) -> None:
    """Can VM replicate now (Test-VMReplicationConnection): the broker answers, the VM's topics
    exist with the right settings, its partner site answers. Exit 1 when a check fails."""

    async def check(site: Site) -> list[Check]:
        return await connection_checks(site, await site.catalog.vm(vm))

    checks = with_site(config_path, check)
    if as_json:
        emit_json([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        table = Table("check", "ok", "detail", title=f"connection of {vm}")
        for c in checks:
            table.add_row(c.name, "[green]yes[/]" if c.ok else "[red]NO[/]", c.detail)
        console.print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise ReplicationError(
            f"VM {vm!r}: {', '.join(failed)} failed (see above). Operator action: fix what "
            "the failed checks name, then run `vmreplica test-connection` again"
        )


def register(main: click.Group) -> None:
    for command in (measure, reset_statistics, events, suspend, resume, test_connection):
        main.add_command(command)
