"""CLI commands for replication relationships: enable, agent, status, points.

Each command opens the site from ``--config`` (or ``$VMREPLICA_CONFIG``) and the ``VMREPLICA_*``
environment, does one thing, and prints a table, or JSON with ``--json``.

About 460 lines: one click command per function, each short; split by topic from failover,
resync, operations and security (their own modules).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from vmreplica.cli.support import console, emit_json, parse_at, reported
from vmreplica.config import load_config
from vmreplica.consumers.points import FORMATS, apply_lock, choose_point, export_point
from vmreplica.domain.hypervisor import parse_hypervisor
from vmreplica.domain.model import (
    MAX_APP_CONSISTENT_HOURS,
    MAX_HISTORY_HOURS,
    VmRecord,
    VmSettings,
    parse_frequency,
)
from vmreplica.errors import BrokerUnreachable, ConfigurationError
from vmreplica.producers.nbd_exports import socket_path
from vmreplica.runtime.site import Site, parse_disks
from vmreplica.runtime.status import (
    CaptureStatus,
    PrimaryProgress,
    VmStatus,
    capture_status,
    vm_status,
)
from vmreplica.storage.mailbox import Mailbox

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Site configuration (TOML). Default: $VMREPLICA_CONFIG, then VMREPLICA_* variables.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def with_site(config_path: Path | None, action: Callable[[Site], Awaitable[T]]) -> T:
    """Run ``action`` on the configured site. Kafka not answering a secured site is checked
    once more as a login, so that a wrong password or CA is named as such, not as a broker
    that cannot be reached (which is how a refused SASL handshake first shows)."""
    config = load_config(config_path)

    async def run() -> T:
        async with Site(config) as site:
            try:
                return await action(site)
            except BrokerUnreachable:
                from vmreplica.journal.credentials import check_login  # noqa: PLC0415

                connection = site.connection
                await check_login(connection.bootstrap_servers, connection.security, config.site)
                raise

    return asyncio.run(run())


@click.command()
@click.argument("vm")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A disk of the VM and its raw image; repeat for each disk.",
)
@click.option(
    "--replica-site",
    "replica_sites",
    required=True,
    multiple=True,
    help="The site that keeps the replica; repeat to fan out to several sites.",
)
@click.option(
    "--frequency",
    default="300",
    show_default=True,
    help="Seconds between cycles: 30, 300, 900, or continuous.",
)
@click.option(
    "--recovery-history",
    type=click.IntRange(0, MAX_HISTORY_HOURS),
    default=0,
    show_default=True,
    help="Additional hourly recovery points to keep (0: latest only).",
)
@click.option(
    "--app-consistent-hours",
    type=click.IntRange(1, MAX_APP_CONSISTENT_HOURS),
    default=None,
    help="Every how many hours a cut is application-consistent.",
)
@click.option(
    "--continuous-points-hours",
    type=click.IntRange(1, MAX_HISTORY_HOURS),
    default=None,
    help="Keep every cycle of the last N hours as a recovery point.",
)
@click.option("--compression", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option(
    "--encrypt/--no-encrypt",
    default=False,
    show_default=True,
    help="Encrypt payloads end to end (AES-256-GCM); needs an authorization entry holding "
    "each replica site's key.",
)
@click.option(
    "--capture",
    type=click.Choice(["api", "nbd", "scan"]),
    default="api",
    show_default=True,
    help="How writes are captured on this primary.",
)
@click.option("--exclude-disk", "excluded", multiple=True, help="A disk not to replicate.")
@click.option(
    "--changelog-budget",
    default=None,
    metavar="SIZE",
    help="Largest change log per cycle before capture tracks dirty blocks instead "
    "(e.g. 2G; default: a tenth of the VM's disks).",
)
@click.option(
    "--bandwidth",
    default=None,
    metavar="SIZE",
    help="The most the primary sends per second, on average (e.g. 10M; default: no limit).",
)
@click.option(
    "--pre-cut-hook",
    default=None,
    metavar="COMMAND",
    help="Shell command run before each scan (--capture scan), or before each "
    "application-consistent cut (fsfreeze, pause).",
)
@click.option(
    "--post-cut-hook",
    default=None,
    metavar="COMMAND",
    help="Shell command run after each scan or application-consistent cut (thaw, resume).",
)
@click.option(
    "--hypervisor",
    default=None,
    metavar="SPEC",
    help="This site's hypervisor adapter for the VM: qemu:<qmp socket>[,ga=<guest agent "
    "socket>][,timeout=S] or libvirt:<domain>[,connect=URI][,timeout=S] ({vm}: the VM's "
    "name). Default: the site's `hypervisor`, else vm_stop_command/vm_start_command.",
)
@click.option(
    "--auto-resync/--no-auto-resync",
    default=True,
    show_default=True,
    help="Resynchronize a replica stopped by a journal violation without waiting "
    "for `vmreplica resync` (off: the primary's health turns critical).",
)
@click.option(
    "--initial",
    type=click.Choice(["network", "export", "existing"]),
    default="network",
    show_default=True,
    help="How the replica gets its first copy: over the network, on external media "
    "(`vmreplica initial export`/`import`), or from a copy it already holds (only the blocks "
    "that differ are sent).",
)
@click.option(
    "--initial-at",
    default=None,
    metavar="TIME",
    help="Start the initial replication at TIME: HH:MM (the next one) or an ISO date and time.",
)
@config_option
@json_option
@reported
def enable(
    vm: str,
    disks: tuple[str, ...],
    replica_sites: tuple[str, ...],
    frequency: str,
    recovery_history: int,
    app_consistent_hours: int | None,
    continuous_points_hours: int | None,
    compression: str,
    encrypt: bool,
    capture: str,
    excluded: tuple[str, ...],
    changelog_budget: str | None,
    bandwidth: str | None,
    pre_cut_hook: str | None,
    post_cut_hook: str | None,
    hypervisor: str | None,
    auto_resync: bool,
    initial: str,
    initial_at: str | None,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """Enable replication of VM to another site (Enable-VMReplication).

    With --capture nbd, the agent serves each disk over NBD and the hypervisor must use that
    export as the disk: the URIs to attach are printed (and shown by `status --json`).
    """
    if post_cut_hook and not pre_cut_hook:
        raise ConfigurationError(
            "--post-cut-hook undoes what --pre-cut-hook did; give --pre-cut-hook too"
        )
    settings = VmSettings(
        frequency_seconds=parse_frequency(frequency, "--frequency"),
        recovery_history=recovery_history,
        app_consistent_hours=app_consistent_hours,
        continuous_points_hours=continuous_points_hours,
        compression=compression == "on",
        encrypt=encrypt,
        capture=capture,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        excluded_disks=excluded,
        also_replicate_to=tuple(dict.fromkeys(replica_sites[1:])),
        changelog_budget_bytes=None
        if changelog_budget is None
        else parse_size("--changelog-budget", changelog_budget),
        bandwidth_bytes_per_second=None
        if bandwidth is None
        else parse_size("--bandwidth", bandwidth),
        pre_cut_hook=pre_cut_hook,
        post_cut_hook=post_cut_hook,
        auto_resync=auto_resync,
        hypervisor=hypervisor,
        initial=initial,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        initial_at_ms=parse_at(initial_at, option="--initial-at") if initial_at else None,
    )
    parsed = parse_disks(disks)
    for name in excluded:
        if name not in parsed:
            raise ConfigurationError(f"--exclude-disk {name!r} names no --disk of VM {vm!r}")
    config = load_config(config_path)
    if capture == "nbd":
        socket_path(config, vm)  # a socket path too long for Unix is refused before enabling
    if hypervisor is not None:
        parse_hypervisor(hypervisor, vm)  # refused before anything is enabled
    replica_site = replica_sites[0]
    record = with_site(config_path, lambda site: site.enable(vm, parsed, replica_site, settings))
    captured = capture_status(config, record)
    if as_json:
        emit_json(vm_json(record) | capture_json(captured))
        return
    console.print(
        f"VM [bold]{vm}[/] will replicate to {replica_site}: "
        f"{record.state.value}. Start `vmreplica agent` to begin."
    )
    if app_consistent_hours and not (hypervisor or config.hypervisor or pre_cut_hook):
        console.print(
            "[yellow]note:[/] nothing here can quiesce the guest (no --hypervisor, no "
            "`hypervisor` in the site configuration, no --pre-cut-hook): its "
            "application-consistent points will be crash-consistent, and counted as failed."
        )
    if captured.nbd is not None:
        console.print(
            "The agent serves its disks over NBD while it runs; attach the "
            'hypervisor to these (see README, "Attaching the hypervisor"):'
        )
        for disk, uris in captured.nbd.items():
            for uri in uris.values():
                console.print(f"  {disk}: {uri}", highlight=False, soft_wrap=True)


def parse_size(option: str, text: str) -> int:
    """``512M``, ``2G``, ``1048576``: bytes, in powers of 1024.

    :raises ConfigurationError: not a positive size.
    """
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in units else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise ConfigurationError(
            f"{option} {text!r}: expected a size such as 512M, 2G or a number of bytes"
        )
    return int(number) * units[unit]


@click.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True)
@reported
def agent(config_path: Path | None, log_level: str) -> None:
    """Run this site: ship cycles of its primary VMs, apply journals of its replicas."""
    # A stop asked for while the agent starts up is honoured once it runs, not by dying.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: early.append(signum))
    from vmreplica.journal.credentials import check_login  # noqa: PLC0415
    from vmreplica.runtime.agent import Agent  # noqa: PLC0415
    from vmreplica.runtime.folders import check_folders  # noqa: PLC0415

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(config_path)
    check_folders(config)

    async def run() -> None:
        async with Site(config) as site:
            await check_login(
                site.connection.bootstrap_servers, site.connection.security, config.site
            )
            await Agent(site, early_signals=early).run()

    asyncio.run(run())


@click.command()
@click.argument("vm", required=False)
@config_option
@json_option
@reported
def status(vm: str | None, config_path: Path | None, as_json: bool) -> None:
    """State, health and position of each VM (Get-VMReplication); `measure` gives statistics."""

    async def collect(site: Site) -> list[VmStatus]:
        records = [await site.catalog.vm(vm)] if vm else await site.catalog.vms()
        async with Mailbox(site.config.catalog_path) as mailbox:
            outage = await mailbox.kafka_outage(site.config.site)
        return [await vm_status(site, record, outage=outage) for record in records]

    statuses = with_site(config_path, collect)
    rows = [status_json(status) for status in statuses]
    if as_json:
        emit_json(rows)
        return
    table = Table(
        "VM",
        "role",
        "state",
        "health",
        "sent",
        "applied",
        "behind (s)",
        "pending",
        title="vmreplica status",
    )
    for row in rows:
        table.add_row(
            row["vm"],
            row["role"],
            row["state"],
            row["health"],
            str(row.get("last_sent_cycle", "")),
            str(row.get("last_applied_cycle", row.get("replica_cycle", ""))),
            str(row["seconds_behind"]),
            str(row.get("pending_bytes", "")),
        )
    console.print(table)
    for status in statuses:  # a running resync or initial replication, with its progress
        if status.resync is not None and status.resync.active:
            console.print(status.resync.summary(), highlight=False)
        if status.initial is not None:
            console.print(status.initial.summary(status.record.name), highlight=False)


@click.group()
def points() -> None:
    """Recovery points of a replica VM."""


@points.command("list")
@click.argument("vm")
@config_option
@json_option
@reported
def points_list(vm: str, config_path: Path | None, as_json: bool) -> None:
    """The recovery points a replica keeps for VM."""

    async def collect(site: Site) -> list[dict[str, Any]]:
        await site.catalog.vm(vm)
        return [
            {
                "point": p.cycle,
                "epoch": p.epoch,
                "offset": p.journal_offset,
                "cut_at_ms": p.cut_at_ms,
                "consistency": p.consistency.value,
            }
            for p in await site.catalog.points(vm)
        ]

    rows = with_site(config_path, collect)
    if as_json:
        emit_json(rows)
        return
    table = Table("point", "time (UTC)", "consistency", "epoch", title=f"recovery points of {vm}")
    for row in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["cut_at_ms"] / 1000))
        table.add_row(str(row["point"]), stamp, row["consistency"], str(row["epoch"]))
    console.print(table)


@points.command("export")
@click.argument("vm")
@click.argument("point")
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="raw", show_default=True)
@config_option
@reported
def points_export(
    vm: str, point: str, destination: Path, fmt: str, config_path: Path | None
) -> None:
    """Write VM's disks as they were at POINT (a cycle, or latest) into DESTINATION/."""

    async def export(site: Site) -> list[Path]:
        record = await site.catalog.vm(vm)
        if record.role != "replica":
            raise ConfigurationError(f"VM {vm!r} is primary here; export points on its replica")
        folder = site.config.vm_folder(vm)
        with apply_lock(folder):
            chosen = choose_point(await site.catalog.points(vm), point)
            position = await site.catalog.position(vm)
            head = position.cycle if position else chosen.cycle
            images = {d.name: Path(d.path) for d in record.disks}
            return export_point(images, folder / "undo", chosen, head, destination, fmt)  # type: ignore[arg-type]

    for path in with_site(config_path, export):
        click.echo(path)


def vm_json(record: VmRecord) -> dict[str, Any]:
    """A relationship as `enable --json` and `status --json` print it."""
    return {
        "vm": record.name,
        "role": record.role,
        "state": record.state.value,
        "message": record.state_message,
        "epoch": record.epoch,
        "partner_site": record.partner_site,
        "disks": [
            {"name": d.name, "path": d.path, "size_bytes": d.size_bytes} for d in record.disks
        ],
    }


def capture_json(capture: CaptureStatus) -> dict[str, Any]:
    """How writes are captured, as `enable --json` and `status --json` print it."""
    details: dict[str, Any] = {"capture": capture.mode}
    if capture.nbd_socket is not None:
        details["nbd_socket"] = capture.nbd_socket
    if capture.nbd is not None:
        details["nbd"] = {disk: dict(uris) for disk, uris in capture.nbd.items()}
    if capture.nbd_error is not None:
        details["nbd_error"] = capture.nbd_error
    return details


def status_json(status: VmStatus) -> dict[str, Any]:
    """One VM of `status --json`. Scripts read these keys: tests/unit/test_status.py pins them."""
    row = (
        vm_json(status.record)
        | capture_json(status.capture)
        | {
            "health": status.report.health.value,
            "health_reasons": list(status.report.reasons),
            "seconds_behind": status.seconds_behind,
            "cycles_in_window": status.cycles_in_window,
        }
    )
    progress = status.progress
    if status.resync is not None:
        row["resync"] = status.resync.figures()
    if status.initial is not None:
        row["initial_replication"] = asdict(status.initial)
    if isinstance(progress, PrimaryProgress):
        return row | {
            "pending_bytes": progress.pending_bytes,
            "replica_cycle": progress.replica_cycle,
            "replica_applied_at_ms": progress.replica_applied_at_ms,
            "last_sent_cycle": progress.last_sent_cycle,
        }
    return row | {
        "last_applied_cycle": progress.last_applied_cycle,
        "recovery_points": progress.recovery_points,
    }


def register(main: click.Group) -> None:
    for command in (enable, agent, status, points):
        main.add_command(command)
