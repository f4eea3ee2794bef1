"""`vmreplica initial stop VM` (Stop-VMInitialReplication) and `vmreplica initial start VM`,
which lets a stopped seed go on (:mod:`vmreplica.runtime.initial_stop`).

A module of its own beside the other `initial` commands (export and import of a seed): each
registers its commands into the one `initial` group, whichever registers first makes it.
"""

from __future__ import annotations

from pathlib import Path

import click

from vmreplica.cli.failover import perform
from vmreplica.cli.replication import config_option, with_site
from vmreplica.cli.support import reported
from vmreplica.failover.requests import StopInitialReplication
from vmreplica.runtime.initial_stop import start_initial_replication


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


def register(main: click.Group) -> None:
    group = main.commands.get("initial")
    if not isinstance(group, click.Group):
        group = click.Group("initial", help="Initial replication of a VM (its seed).")
        main.add_command(group)
    group.add_command(initial_stop)
    group.add_command(initial_start)
