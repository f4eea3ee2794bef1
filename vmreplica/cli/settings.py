"""CLI commands that change or end a replication relationship: `set` (Set-VMReplication) and
`remove` (Remove-VMReplication).

`set` runs on the primary: the agent restarts the VM's worker with the new settings and
publishes them to the replica in a signed ``VmConfig`` (:mod:`vmreplica.runtime.settings`).
`remove` runs on either site, through the agent when it runs (:mod:`vmreplica.runtime.removal`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vmreplica.cli.failover import perform
from vmreplica.cli.replication import config_option, json_option, parse_size, with_site
from vmreplica.cli.support import console, emit_json, reported
from vmreplica.domain.model import MAX_APP_CONSISTENT_HOURS, MAX_HISTORY_HOURS, parse_frequency
from vmreplica.domain.settings_change import UNSET, SettingsChange
from vmreplica.errors import ConfigurationError
from vmreplica.failover.requests import RemoveReplication
from vmreplica.runtime.removal import remove_replication
from vmreplica.runtime.settings import SettingsChanged, change_settings
from vmreplica.runtime.site import Site, parse_disks
from vmreplica.storage.mailbox import Mailbox


def _hours(option: str, text: str | None, highest: int) -> int | None:
    """``N`` (1..highest) or ``off``; :data:`UNSET` when the option was not given."""
    if text is None:
        return UNSET  # type: ignore[no-any-return]
    if text == "off":
        return None
    if not text.isdigit() or not 1 <= int(text) <= highest:
        raise ConfigurationError(f"{option} must be 1-{highest} or off, not {text!r}")
    return int(text)


def _given(value: Any) -> Any:
    return UNSET if value is None else value


@click.command("set")
@click.argument("vm")
@click.option("--frequency", default=None, help="Seconds between cycles: 30, 300, 900, continuous.")
@click.option(
    "--recovery-history",
    type=click.IntRange(0, MAX_HISTORY_HOURS),
    default=None,
    help="Additional hourly recovery points the replica keeps (0: latest only).",
)
@click.option(
    "--app-consistent-hours",
    default=None,
    metavar="N|off",
    help=f"Every how many hours (1-{MAX_APP_CONSISTENT_HOURS}) a cut is application-consistent.",
)
@click.option(
    "--continuous-points-hours",
    default=None,
    metavar="N|off",
    help=f"Keep every cycle of the last N hours (1-{MAX_HISTORY_HOURS}) as a recovery point.",
)
@click.option("--compression", type=click.Choice(["on", "off"]), default=None)
@click.option(
    "--encrypt/--no-encrypt",
    default=None,
    help="Encrypt payloads end to end (needs an authorization entry for each replica site).",
)
@click.option("--auto-resync/--no-auto-resync", default=None)
@click.option(
    "--changelog-budget",
    default=None,
    metavar="SIZE|default",
    help="Largest change log per cycle before dirty blocks are tracked (default: a tenth of "
    "the disks).",
)
@click.option(
    "--bandwidth",
    default=None,
    metavar="SIZE|off",
    help="The most the primary sends per second, on average (e.g. 10M; off: no limit).",
)
@click.option(
    "--exclude-disk",
    "excluded",
    multiple=True,
    help="Stop replicating a disk (before the initial replication only).",
)
@click.option(
    "--include-disk",
    "included",
    multiple=True,
    metavar="NAME=PATH",
    help="Replicate a disk again (before the initial replication only).",
)
@click.option(
    "--replica-site", default=None, help="Another replica site (before the initial replication)."
)
@config_option
@json_option
@reported
def set_replication(
    vm: str,
    frequency: str | None,
    recovery_history: int | None,
    app_consistent_hours: str | None,
    continuous_points_hours: str | None,
    compression: str | None,
    encrypt: bool | None,
    auto_resync: bool | None,
    changelog_budget: str | None,
    bandwidth: str | None,
    excluded: tuple[str, ...],
    included: tuple[str, ...],
    replica_site: str | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Change the replication settings of VM, on its primary (Set-VMReplication).

    The agent starts the VM's worker again with them and publishes them to the replica, which
    keeps its recovery points by the new history from then on.
    """
    budget: Any = UNSET
    if changelog_budget == "default":
        budget = None
    elif changelog_budget is not None:
        budget = parse_size("--changelog-budget", changelog_budget)
    limit: Any = UNSET
    if bandwidth == "off":
        limit = None
    elif bandwidth is not None:
        limit = parse_size("--bandwidth", bandwidth)
    include = parse_disks(included)
    change = SettingsChange(
        frequency_seconds=UNSET if frequency is None else parse_frequency(frequency, "--frequency"),
        recovery_history=_given(recovery_history),
        app_consistent_hours=_hours(
            "--app-consistent-hours", app_consistent_hours, MAX_APP_CONSISTENT_HOURS
        ),
        continuous_points_hours=_hours(
            "--continuous-points-hours", continuous_points_hours, MAX_HISTORY_HOURS
        ),
        compression=UNSET if compression is None else compression == "on",
        encrypt=_given(encrypt),
        auto_resync=_given(auto_resync),
        changelog_budget_bytes=budget,
        bandwidth_bytes_per_second=limit,
        exclude_disks=tuple(dict.fromkeys(excluded)),
        include_disks=tuple(include),
        replica_site=replica_site,
    )

    async def run(site: Site) -> tuple[SettingsChanged, bool]:
        done = await change_settings(site, vm, change, include)
        async with Mailbox(site.config.catalog_path) as mailbox:
            return done, await mailbox.agent_running(site.config.site)

    done, agent = with_site(config_path, run)
    if as_json:
        emit_json(
            {
                "vm": vm,
                "changed": {k: {"before": b, "after": a} for k, (b, a) in done.changed.items()},
                "settings": dataclasses.asdict(done.after.settings),
                "replica_site": done.after.partner_site,
                "agent_running": agent,
            }
        )
        return
    if not done.changed:
        click.echo(f"VM {vm}: those are its settings already; nothing changed")
        return
    table = Table("setting", "before", "after", title=f"settings of {vm}")
    for name, (before, after) in done.changed.items():
        table.add_row(name, str(before), str(after))
    console.print(table)
    click.echo(
        "the agent runs the VM with them now and publishes them to the replica"
        if agent
        else "they take effect, and reach the replica, when `vmreplica agent` starts"
    )


@click.command()
@click.argument("vm")
@config_option
@reported
def remove(vm: str, config_path: Path | None) -> None:
    """Stop replicating VM at this site (Remove-VMReplication), primary or replica.

    The images stay (the command says where); the VM's catalog rows go, and this site's agent
    stops its worker. Refused while a failover or a test failover of the VM runs. Run it at the
    partner site too to end the relationship there.
    """

    async def run(site: Site) -> str:
        if await site.catalog.find_vm(vm) is None:  # removed before, or never here
            return await remove_replication(site, vm)
        return await perform(site, RemoveReplication(vm))

    click.echo(with_site(config_path, run))


def register(main: click.Group) -> None:
    main.add_command(set_replication)
    main.add_command(remove)
