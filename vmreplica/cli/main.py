"""The ``vmreplica`` command line: tables for people, ``--json`` for scripts.

User mistakes and unavailable prerequisites end with a one-paragraph message and exit code 2 or
1, never a traceback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.table import Table

from vmreplica.cli import failover as cli_failover
from vmreplica.cli import initial_stop as cli_initial_stop
from vmreplica.cli import operations as cli_operations
from vmreplica.cli import replication as cli_replication
from vmreplica.cli import resync as cli_resync
from vmreplica.cli import security as cli_security
from vmreplica.cli import server as cli_server
from vmreplica.cli import settings as cli_settings
from vmreplica.cli.support import console, emit_json, errors, reported
from vmreplica.domain.names import DEFAULT_PREFIX, DEFAULT_TRUST_GROUP
from vmreplica.errors import ConfigurationError


@click.group()
@click.version_option(package_name="vmreplica")
def main() -> None:
    """Replicate virtual-machine disks to another site through Apache Kafka."""


cli_replication.register(main)
cli_failover.register(main)
cli_resync.register(main)
cli_security.register(main)
cli_operations.register(main)
cli_settings.register(main)
cli_server.register(main)
cli_initial_stop.register(main)  # into the `initial` group, made by whichever registers first


@main.group()
def broker() -> None:
    """A local Apache Kafka broker for the demo and the tests."""


@broker.command("up")
@click.option(
    "--brokers",
    type=click.Choice(["1", "3"]),
    default="1",
    show_default=True,
    help="Nodes to start (3 for replication factor 3).",
)
@click.option(
    "--port", type=int, default=None, help="Base port (default 19092 or $VMREPLICA_BROKER_PORT)."
)
@click.option(
    "--secure",
    is_flag=True,
    help="TLS on every listener, SCRAM-SHA-512 logins, ACLs (add sites with `broker add-site`).",
)
@click.option(
    "--sites",
    default=None,
    metavar="A,B,C",
    help="A stretched cluster: the site each of the 3 nodes stands in (its broker.rack), so "
    "each topic keeps one replica per site.",
)
@reported
def broker_up(brokers: str, port: int | None, secure: bool, sites: str | None) -> None:
    """Resolve Kafka with Maven, start it on loopback and wait until it answers."""
    from vmreplica.devtools.cluster import LocalCluster  # noqa: PLC0415

    named = None if sites is None else [site.strip() for site in sites.split(",")]
    with errors.status("starting Kafka (the first run downloads the jars)…"):
        state = LocalCluster(base_port=port).up(int(brokers), secure=secure, sites=named)
    click.echo(state.bootstrap_servers)


@broker.command("add-site")
@click.argument("site")
@click.option("--trust-group", default=DEFAULT_TRUST_GROUP, show_default=True)
@click.option("--topic-prefix", default=DEFAULT_PREFIX, show_default=True)
@click.option("--user", default=None, help="Kafka user name (default: the site's name).")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the password goes, mode 0600 (default: <broker>/secure/sites/<user>.password); "
    "an existing file's password is kept.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@reported
def broker_add_site(
    site: str,
    trust_group: str,
    topic_prefix: str,
    user: str | None,
    password_file: Path | None,
    as_json: bool,
) -> None:
    """Give SITE a Kafka user of the secured local broker and the rights of its trust group.

    Prints the settings for SITE's site.toml; the password is only in the password file.
    """
    from vmreplica.devtools.cluster import LocalCluster  # noqa: PLC0415
    from vmreplica.security.sites import add_site  # noqa: PLC0415

    state = LocalCluster().state()
    secured = None if state is None else state.secured
    if state is None or secured is None:
        raise ConfigurationError(
            "no secured local Kafka is running; start one with `vmreplica broker up --secure` "
            "(a plain broker has no users or ACLs)"
        )
    name = user or site
    file = password_file or secured.sites_folder / f"{name}.password"
    access = asyncio.run(
        add_site(
            state.connection(),
            secured.ca_file,
            site,
            trust_group,
            file,
            user=user,
            prefix=topic_prefix,
        )
    )
    if as_json:
        emit_json({"site": site, "user": access.user, **access.settings()})
        return
    click.echo(
        f"# {access.user} may now replicate the VMs of trust group {trust_group!r}; "
        f"in {site}'s site.toml:"
    )
    for key, value in access.settings().items():
        click.echo(f'{key} = "{value}"')


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@reported
def broker_status(as_json: bool) -> None:
    """Whether the local broker runs, and where."""
    from vmreplica.devtools.cluster import LocalCluster  # noqa: PLC0415

    status = LocalCluster().status()
    if as_json:
        emit_json(status)
        return
    table = Table(
        "node",
        "pid",
        "alive",
        "port",
        "site",
        "log",
        title=(
            f"Kafka at {status['bootstrap_servers']} ({status['security_protocol']})"
            if status["bootstrap_servers"]
            else "no local Kafka running"
        ),
    )
    for node in status["nodes"]:  # type: ignore[attr-defined]
        table.add_row(
            str(node["node_id"]),
            str(node["pid"]),
            str(node["alive"]),
            str(node["port"]),
            node["site"] or "",
            node["log"],
        )
    console.print(table)


@broker.command("down")
@reported
def broker_down() -> None:
    """Stop what `broker up` started; nothing else."""
    from vmreplica.devtools.cluster import LocalCluster  # noqa: PLC0415

    stopped = LocalCluster().down()
    click.echo(f"stopped {len(stopped)} Kafka node(s)" if stopped else "no local Kafka was running")


if __name__ == "__main__":
    main()
