"""`vmreplica resync VM`, on the primary: make a diverged replica equal to it again.

The replica sends the digests of its disks' blocks, the primary sends only the blocks that
differ, and the VM keeps running (:mod:`vmreplica.failover.resync`). When this site's agent
runs, the command hands the resync to it through the mailbox and returns once it is accepted
(``--wait``: once it ends, with a progress bar); without an agent, it runs the resync itself, to
its end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import click

from vmreplica.cli.failover import through_agent
from vmreplica.cli.replication import config_option, json_option, with_site
from vmreplica.cli.support import emit_json, parse_at, progress, reported
from vmreplica.errors import ConfigurationError, ResyncRefused
from vmreplica.failover.requests import Resynchronize, carry_out
from vmreplica.failover.resync_job import ResyncJob, load_job
from vmreplica.runtime.site import Site
from vmreplica.storage.mailbox import Mailbox

WAIT_POLL_SECONDS: Final = 0.5


async def _wait_until_done(site: Site, vm: str) -> ResyncJob:
    """Poll the job file until the agent's run ends, drawing its progress on stderr."""
    folder = site.config.vm_folder(vm)
    with progress(f"resync of {vm}") as advance:
        while True:
            job = load_job(folder)
            if job is None:
                raise ResyncRefused(f"the resync of VM {vm!r} disappeared while it ran")
            if not job.active:
                return job
            advance(job.examined_bytes, job.total_bytes, job.phase)
            await asyncio.sleep(WAIT_POLL_SECONDS)


@click.command()
@click.argument("vm")
@click.option(
    "--site",
    "target",
    default="",
    metavar="SITE",
    help="The replica site to resynchronize (default: the VM's replica site).",
)
@click.option(
    "--at",
    "at",
    default=None,
    metavar="TIME",
    help="Not before TIME: HH:MM (the next one) or an ISO date and time. The agent runs it then.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the resync ends, with a progress bar, and print its figures.",
)
@click.option("--cancel", is_flag=True, help="Stop the running resync (until it sends).")
@config_option
@json_option
@reported
def resync(
    vm: str,
    target: str,
    at: str | None,
    wait: bool,
    cancel: bool,
    config_path: Path | None,
    as_json: bool,
) -> None:
    """On the primary: compare block digests with VM's replica and send only the blocks that
    differ, while the VM keeps running (Resume-VMReplication -Resynchronize)."""
    if cancel and (at or target):
        raise ConfigurationError("--cancel stops the running resync; it takes no --at or --site")
    request = Resynchronize(vm, target, parse_at(at) if at else 0, cancel)

    async def run(site: Site) -> tuple[str, ResyncJob | None]:
        await site.catalog.vm(vm)
        async with Mailbox(site.config.catalog_path) as mailbox:
            agent = await mailbox.agent_running(site.config.site)
            if agent:
                said = await through_agent(mailbox, request)
        if agent:
            if wait and not cancel:
                job = await _wait_until_done(site, vm)
                if job.phase != "done":
                    raise ResyncRefused(job.summary())
                return job.summary(), job
            return said, load_job(site.config.vm_folder(vm))
        if request.at_ms:
            raise ConfigurationError(
                f"--at leaves the resync to this site's agent, which is not "
                f"running: start `vmreplica agent`, or resync {vm} now "
                "without --at"
            )
        said = await carry_out(site, request)
        return said, load_job(site.config.vm_folder(vm))

    said, job = with_site(config_path, run)
    if as_json:
        emit_json(job.figures() if job is not None else {"vm": vm, "message": said})
    else:
        click.echo(said)


def register(main: click.Group) -> None:
    main.add_command(resync)
