"""CLI commands for failover: test, planned, unplanned, complete, cancel, and reverse.

A role change needs the VM to itself. When this site's agent is running, the command posts a
typed request (:mod:`vmreplica.failover.requests`) to the agent's mailbox and the agent carries
it out between two steps of that VM (and prints the outcome); when no agent runs, the command
does the work itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

import click

from vmreplica.cli.replication import config_option, json_option, with_site
from vmreplica.cli.support import console, emit_json, progress, reported
from vmreplica.consumers.points import choose_point
from vmreplica.domain.model import EXTENDED_FREQUENCIES_SECONDS
from vmreplica.errors import ConfigurationError, FailoverRefused, ResyncRefused
from vmreplica.failover.requests import (
    CancelFailover,
    CompleteFailover,
    FailoverRequest,
    PlannedFailover,
    Resynchronize,
    ReverseReplication,
    UnplannedFailover,
    carry_out,
    post_request,
)
from vmreplica.runtime.extension import extend as extend_vm
from vmreplica.runtime.site import Site
from vmreplica.storage.mailbox import Mailbox

REQUEST_TIMEOUT_SECONDS: Final = 300.0
REQUEST_POLL_SECONDS: Final = 0.2


async def _agent_running(site: Site) -> bool:
    async with Mailbox(site.config.catalog_path) as mailbox:
        return await mailbox.agent_running(site.config.site)


async def perform(site: Site, request: FailoverRequest) -> str:
    """Carry out ``request`` through the agent when it runs, else here; return its outcome.

    :raises ConfigurationError: the request was a mistake (exit 2).
    :raises FailoverRefused: it could not be done now, or failed in the agent (exit 1);
        :class:`ResyncRefused` for a resync.
    """
    await site.catalog.vm(request.vm)
    async with Mailbox(site.config.catalog_path) as mailbox:
        if await mailbox.agent_running(site.config.site):
            return await through_agent(mailbox, request)
    return await carry_out(site, request)


async def through_agent(mailbox: Mailbox, request: FailoverRequest) -> str:
    """Post ``request`` to the running agent and wait for its outcome."""
    refused = ResyncRefused if isinstance(request, Resynchronize) else FailoverRefused
    posted = await post_request(mailbox, request)
    deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
    with progress(f"{request.kind} of {request.vm}") as advance:
        while time.monotonic() < deadline:
            done = await mailbox.request(posted)
            if done.status == "done":
                return done.result
            if done.status == "failed":
                raise ConfigurationError(done.result)
            if done.status == "refused":
                raise refused(done.result)
            advance(0, 0, "the agent carries it out")
            await asyncio.sleep(REQUEST_POLL_SECONDS)
    raise refused(
        f"the agent did not carry out {request.kind} of VM {request.vm!r} "
        f"within {REQUEST_TIMEOUT_SECONDS:.0f} s; see its log"
    )


def _run(config_path: Path | None, request: FailoverRequest) -> None:
    click.echo(with_site(config_path, lambda site: perform(site, request)))


class FailoverGroup(click.Group):
    """``vmreplica failover VM`` is the unplanned failover; the other words are subcommands."""

    def resolve_command(
        self,
        ctx: click.Context,
        args: list[str],
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "unplanned", self.commands["unplanned"], args
        return super().resolve_command(ctx, args)


@click.group(cls=FailoverGroup)
def failover() -> None:
    """Fail a VM over to its replica site: test, planned, or unplanned (`failover VM`)."""


@failover.command("unplanned")
@click.argument("vm")
@click.option(
    "--point",
    default="latest",
    show_default=True,
    help="Recovery point: a cycle number, latest, or latest-app-consistent.",
)
@click.option("--force", is_flag=True, help="Even though the primary still heartbeats.")
@config_option
@reported
def unplanned(vm: str, point: str, force: bool, config_path: Path | None) -> None:
    """On the replica: start VM here at a recovery point (the primary is lost)."""
    _run(config_path, UnplannedFailover(vm, point=point, force=force))


@failover.command("planned")
@click.argument("vm")
@click.option("--reverse", is_flag=True, help="Make this site the new primary's replica.")
@click.option("--start", is_flag=True, help="Start the VM at the replica site afterwards.")
@click.option(
    "--verify", is_flag=True, help="Also compare full-disk digests before the replica takes over."
)
@click.option(
    "--to",
    "target",
    default="",
    help="The replica site that takes over (default: the one `enable` named); the "
    "VM's other replica sites follow it.",
)
@config_option
@reported
def planned(
    vm: str, reverse: bool, start: bool, verify: bool, target: str, config_path: Path | None
) -> None:
    """On the primary: ship the final cycle; the replica takes over with no data loss."""
    _run(
        config_path, PlannedFailover(vm, reverse=reverse, start=start, verify=verify, target=target)
    )


@failover.command("complete")
@click.argument("vm")
@config_option
@reported
def complete(vm: str, config_path: Path | None) -> None:
    """Keep the failed-over point; delete every other recovery point."""
    _run(config_path, CompleteFailover(vm))


@failover.command("cancel")
@click.argument("vm")
@config_option
@reported
def cancel(vm: str, config_path: Path | None) -> None:
    """Undo a failover: a planned one on the primary until the replica has taken over, or an
    unplanned one not yet completed (on the replica: replay the journal forward)."""
    _run(config_path, CancelFailover(vm))


@failover.command("test")
@click.argument("vm")
@click.option("--point", default="latest", show_default=True)
@config_option
@json_option
@reported
def test(vm: str, point: str, config_path: Path | None, as_json: bool) -> None:
    """On the replica: serve `VM - Test` disks at a point, while replication goes on."""

    async def request(site: Site) -> dict[str, Any]:
        record = await site.catalog.vm(vm)
        if record.role != "replica":
            raise ConfigurationError(
                f"VM {vm!r} is primary here; test failover runs on its replica site"
            )
        if await site.catalog.test_failover(vm) is not None:
            raise ConfigurationError(
                f"VM {vm!r} already has a test failover; stop it first "
                f"(`vmreplica failover stop-test {vm}`)"
            )
        if not await _agent_running(site):
            raise ConfigurationError(
                "test failover is served by the agent: start `vmreplica agent` at this site first"
            )
        chosen = choose_point(await site.catalog.points(vm), point)
        started = time.monotonic()
        await site.catalog.set_test_failover(vm, chosen.cycle, "requested")
        while time.monotonic() - started < REQUEST_TIMEOUT_SECONDS:
            found = await site.catalog.test_failover(vm)
            if found is not None and found[1] in ("ready", "failed"):
                if found[1] == "failed":
                    await site.catalog.clear_test_failover(vm)
                    raise ConfigurationError(f"test failover of {vm!r} failed: {found[2]}")
                return {
                    "vm": f"{vm} - Test",
                    "point": chosen.cycle,
                    "uris": found[2].split(),
                    "seconds": time.monotonic() - started,
                }
            await asyncio.sleep(0.05)
        raise ConfigurationError("the agent did not start the test failover in time")

    result = with_site(config_path, request)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"[bold]{result['vm']}[/] at point {result['point']} is ready in {result['seconds']:.2f} s:"
    )
    for uri in result["uris"]:
        click.echo(f"  {uri}")


@failover.command("stop-test")
@click.argument("vm")
@config_option
@reported
def stop_test(vm: str, config_path: Path | None) -> None:
    """Discard VM's test failover and its scratch writes."""

    async def stop(site: Site) -> None:
        if await site.catalog.test_failover(vm) is None:
            raise ConfigurationError(f"VM {vm!r} has no test failover running")
        await site.catalog.set_test_failover(vm, 0, "stopping")
        for _ in range(600):
            if await site.catalog.test_failover(vm) is None:
                return
            await asyncio.sleep(0.1)
        raise ConfigurationError("the agent did not stop the test failover in time")

    with_site(config_path, stop)
    click.echo(f"test failover of {vm} stopped")


@click.command("reverse")
@click.argument("vm")
@click.option(
    "--full-copy",
    is_flag=True,
    help="Send every disk whole instead of waiting for the old primary to report "
    "what diverged (for an old primary that cannot report).",
)
@config_option
@reported
def reverse(vm: str, full_copy: bool, config_path: Path | None) -> None:
    """On the new primary: make the old primary its replica, sending only diverged blocks."""
    _run(config_path, ReverseReplication(vm, full_copy=full_copy))


@click.command("extend")
@click.argument("vm")
@click.option("--to", "to_site", required=True, help="The site that keeps the further replica.")
@click.option(
    "--frequency",
    type=click.Choice([str(s) for s in EXTENDED_FREQUENCIES_SECONDS]),
    default="300",
    show_default=True,
    help="Seconds between relays of the applied cycles.",
)
@click.option(
    "--trust-group",
    default=None,
    help="The hop's trust group (default: this site's, suffixed -ext).",
)
@click.option(
    "--bootstrap-servers", default=None, help="The hop's Kafka cluster (default: this site's)."
)
@config_option
@reported
def extend(
    vm: str,
    to_site: str,
    frequency: str,
    trust_group: str | None,
    bootstrap_servers: str | None,
    config_path: Path | None,
) -> None:
    """On a replica site: replicate VM further, to a third site (extended replication)."""

    async def record(site: Site) -> str:
        hop = await extend_vm(site, vm, to_site, int(frequency), trust_group, bootstrap_servers)
        return (
            f"VM {vm} extends to {to_site} through trust group {hop.trust_group} at "
            f"{hop.bootstrap_servers}, every {hop.frequency_seconds} s; the agent seeds "
            f"the hop, and {to_site} replicates it as any VM of that trust group"
        )

    click.echo(with_site(config_path, record))


def register(main: click.Group) -> None:
    main.add_command(failover)
    main.add_command(reverse)
    main.add_command(extend)
