"""The ``vmreplica`` command line: tables for people, ``--json`` for scripts.

User mistakes and unavailable prerequisites end with a one-paragraph message and exit code 2 or
1, never a traceback.
"""

from __future__ import annotations

import click
from rich.table import Table

from vmreplica.cli import failover as cli_failover
from vmreplica.cli import operations as cli_operations
from vmreplica.cli import replication as cli_replication
from vmreplica.cli import resync as cli_resync
from vmreplica.cli.support import console, emit_json, errors, reported


@click.group()
@click.version_option(package_name="vmreplica")
def main() -> None:
    """Replicate virtual-machine disks to another site through Apache Kafka."""


cli_replication.register(main)
cli_failover.register(main)
cli_resync.register(main)
cli_operations.register(main)


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
@reported
def broker_up(brokers: str, port: int | None) -> None:
    """Resolve Kafka with Maven, start it on loopback and wait until it answers."""
    from vmreplica.devtools.cluster import LocalCluster  # noqa: PLC0415

    with errors.status("starting Kafka (the first run downloads the jars)…"):
        state = LocalCluster(base_port=port).up(int(brokers))
    click.echo(state.bootstrap_servers)


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
        "log",
        title=(
            f"Kafka at {status['bootstrap_servers']}"
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
