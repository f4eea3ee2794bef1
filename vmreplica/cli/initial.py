"""`vmreplica initial export|import`: a VM's initial replication on external media
(Hyper-V's initial replication "using external media" and ``Import-VMInitialReplication``).

``export`` at the primary writes the seed to a folder; ``import`` at the replica applies it, and
the replica then applies the cycles the primary shipped meanwhile. Both resume where a kill left
them (:mod:`vmreplica.runtime.initial`). Their progress is a bar on a terminal, plain lines
in a log (:func:`~vmreplica.cli.support.progress`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import click

from vmreplica.cli.replication import config_option, json_option, with_site
from vmreplica.cli.support import emit_json, progress, reported
from vmreplica.runtime.initial import MediaResult, export_seed, import_seed
from vmreplica.runtime.initial import Progress as Advance
from vmreplica.runtime.site import Site

Transfer = Callable[[Site, str, Path, Advance | None], Awaitable[MediaResult]]


def _run(
    transfer: Transfer, verb: str, vm: str, folder: Path, config_path: Path | None, as_json: bool
) -> None:
    folder = folder.expanduser().resolve()

    async def run(site: Site) -> MediaResult:
        with progress(f"{verb} {vm}") as advance:
            return await transfer(site, vm, folder, advance)

    result = with_site(config_path, run)
    if as_json:
        manifest = result.manifest
        emit_json(
            {
                "vm": vm,
                "folder": str(result.folder),
                "epoch": manifest.epoch,
                "cycle": manifest.cycle,
                "chunks": len(manifest.chunks),
                "data_bytes": manifest.data_bytes,
                "disk_bytes": sum(manifest.disks.values()),
                "media_bytes": result.media_bytes,
                "compression": manifest.compression,
            }
        )
    else:
        click.echo(result.summary(verb))


@click.group()
def initial() -> None:
    """A VM's initial replication on external media (enable it with --initial export)."""


@initial.command("export")
@click.argument("vm")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@config_option
@json_option
@reported
def export_command(vm: str, folder: Path, config_path: Path | None, as_json: bool) -> None:
    """At the primary: write VM's seed to FOLDER (external media), resuming an export cut
    short. The VM may keep running; its cycles ship meanwhile."""
    _run(export_seed, "exported", vm, folder, config_path, as_json)


@initial.command("import")
@click.argument("vm")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@config_option
@json_option
@reported
def import_command(vm: str, folder: Path, config_path: Path | None, as_json: bool) -> None:
    """At the replica: apply the seed in FOLDER, resuming an import cut short; the agent then
    applies the cycles the primary shipped since the export."""
    _run(import_seed, "imported", vm, folder, config_path, as_json)


def register(main: click.Group) -> None:
    main.add_command(initial)
