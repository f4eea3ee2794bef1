"""`vmreplica initial stop VM` (Stop-VMInitialReplication), `vmreplica initial start VM`,
which lets a stopped seed go on (:mod:`vmreplica.runtime.initial_stop`), and `vmreplica initial
wait VM`, which follows the agent's network seed to its end.

A module of its own beside the other `initial` commands (export and import of a seed): each
registers its commands into the one `initial` group, whichever registers first makes it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import click

from vmreplica.cli.failover import perform
from vmreplica.cli.replication import config_option, with_site
from vmreplica.cli.support import progress, reported
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.failover.requests import StopInitialReplication
from vmreplica.runtime.initial_stop import start_initial_replication
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import initial_progress


@click.command("stop")
@click.argument("vm")
@config_option
@reported
def initial_stop(vm: str, config_path: Path | None) -> None:
    """Stop VM's running initial replication, on its primary (Stop-VMInitialReplication).

    The VM is ready for initial replication again and its writes are kept; `vmreplica initial
    start VM` goes on from where the seed stopped.
    """
    click.echo(with_site(config_path, lambda site: perform(site, StopInitialReplication(vm))))


@click.command("start")
@click.argument("vm")
@config_option
@reported
def initial_start(vm: str, config_path: Path | None) -> None:
    """Let a stopped initial replication of VM go on (Start-VMInitialReplication), from where
    it stopped; the agent seeds a new VM at once by itself."""
    click.echo(with_site(config_path, lambda site: start_initial_replication(site, vm)))


WAIT_POLL_SECONDS: Final = 1.0


@click.command("wait")
@click.argument("vm")
@config_option
@reported
def initial_wait(vm: str, config_path: Path | None) -> None:
    """Wait, on the primary, until VM's initial replication (which the agent runs) has ended,
    showing how far it got: a bar on a terminal, a line every 10 s in a log."""

    async def follow(site: Site) -> str:
        record = await site.catalog.vm(vm)
        if record.role != "primary":
            raise ConfigurationError(
                f"VM {vm!r} is a replica at site {site.config.site}: its initial replication "
                f"is followed on its primary, site {record.partner_site}"
            )
        with progress(f"initial replication of {vm}") as advance:
            while True:
                record = await site.catalog.vm(vm)
                seeding = await initial_progress(site, record)
                if seeding is None:
                    break
                advance(seeding.examined_bytes, seeding.total_bytes, record.state.value)
                await asyncio.sleep(WAIT_POLL_SECONDS)
        if record.state is not ReplicationState.REPLICATING:
            raise ReplicationError(
                f"the initial replication of VM {vm!r} ended {record.state.value}"
                f"{f' ({record.state_message})' if record.state_message else ''}. Operator "
                f"action: `vmreplica status {vm}` and the agent's log"
            )
        return f"VM {vm}: initial replication done, replicating"

    click.echo(with_site(config_path, follow))


def register(main: click.Group) -> None:
    group = main.commands.get("initial")
    if not isinstance(group, click.Group):
        group = click.Group("initial", help="Initial replication of a VM (its seed).")
        main.add_command(group)
    group.add_command(initial_stop)
    group.add_command(initial_start)
    group.add_command(initial_wait)
