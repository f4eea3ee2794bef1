"""Failover and resync requests as types: what the CLI asks for, and the one place that
carries it out.

Each action is a small frozen dataclass naming its VM and its options; :func:`carry_out` does
it, here (no agent runs) or in the site's agent, which receives it through the request mailbox
(:mod:`vmreplica.storage.mailbox`). In the mailbox a request is its ``kind`` and its other
fields as a JSON object — the action names and argument keys of the untyped
``run_action(action, arguments)`` this replaces, so rows written by it read the same.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar, Final, assert_never

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.failover.planned import (
    cancel_planned,
    check_planned,
    prepare_planned,
    resume_vm,
    stop_vm,
)
from vmreplica.failover.resync import cancel_resync, resync_here
from vmreplica.failover.reverse import reverse
from vmreplica.failover.unplanned import cancel, complete, promote
from vmreplica.runtime.initial_stop import stop_initial_replication
from vmreplica.runtime.removal import remove_replication
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import EpochStart, FailoverPrepared
from vmreplica.storage.mailbox import Mailbox, PostedRequest


@dataclass(frozen=True)
class PlannedFailover:
    """On the primary: stop the VM, ship the final cycle, let the replica take over.

    ``reverse``: this site then becomes the new primary's replica; ``start``: the replica site
    starts the VM; ``verify``: full-disk digests are compared before the takeover; ``target``:
    the replica site that takes over (empty: the one ``enable`` named), the VM's other replica
    sites follow it.
    """

    kind: ClassVar[str] = "planned"
    vm: str
    reverse: bool = False
    start: bool = False
    verify: bool = False
    target: str = ""


@dataclass(frozen=True)
class UnplannedFailover:
    """On the replica: take over at ``point`` (a cycle, ``latest``, ``latest-app-consistent``);
    ``force`` even though the primary still heartbeats."""

    kind: ClassVar[str] = "unplanned"
    vm: str
    point: str = "latest"
    force: bool = False


@dataclass(frozen=True)
class CompleteFailover:
    """After an unplanned failover: keep its point, delete every other recovery point."""

    kind: ClassVar[str] = "complete"
    vm: str


@dataclass(frozen=True)
class CancelFailover:
    """Undo a planned failover not yet taken over, or an unplanned one not yet completed."""

    kind: ClassVar[str] = "cancel"
    vm: str


@dataclass(frozen=True)
class ReverseReplication:
    """On the new primary: make the old primary its replica, sending only what diverged
    (``full_copy``: every disk whole, for an old primary that cannot say what diverged)."""

    kind: ClassVar[str] = "reverse"
    vm: str
    full_copy: bool = False


@dataclass(frozen=True)
class Resynchronize:
    """On the primary: compare block digests with a replica site and send only the blocks that
    differ (Hyper-V's ``Resume-VMReplication -Resynchronize``); the VM keeps running.

    ``site``: the replica site (default: the VM's); ``at_ms``: not before this instant (ms since
    the Unix epoch; 0 is now); ``cancel``: stop the running resync instead.
    """

    kind: ClassVar[str] = "resync"
    vm: str
    site: str = ""
    at_ms: int = 0
    cancel: bool = False


@dataclass(frozen=True)
class RemoveReplication:
    """At either site: stop replicating the VM here, keep its images
    (:mod:`vmreplica.runtime.removal`)."""

    kind: ClassVar[str] = "remove"
    vm: str


@dataclass(frozen=True)
class StopInitialReplication:
    """On the primary: stop the running seed; the VM waits, ready for initial replication
    (:mod:`vmreplica.runtime.initial_stop`)."""

    kind: ClassVar[str] = "initial-stop"
    vm: str


RESYNC_DIGESTS_TIMEOUT_SECONDS: Final = 600.0
"""Without an agent, a resync waits this long for the replica's digests, then stays pending."""

FailoverRequest = (
    PlannedFailover
    | UnplannedFailover
    | CompleteFailover
    | CancelFailover
    | ReverseReplication
    | Resynchronize
    | RemoveReplication
    | StopInitialReplication
)

REQUEST_TYPES: Final[dict[str, type[FailoverRequest]]] = {
    kind.kind: kind
    for kind in (
        PlannedFailover,
        UnplannedFailover,
        CompleteFailover,
        CancelFailover,
        ReverseReplication,
        Resynchronize,
        RemoveReplication,
        StopInitialReplication,
    )
}


def request_fields(request: FailoverRequest) -> dict[str, bool | str | int]:
    """The request's options (every field but ``vm``), as the mailbox stores them."""
    return {
        field.name: getattr(request, field.name)
        for field in dataclasses.fields(request)
        if field.name != "vm"
    }


def request_from(kind: str, vm: str, fields: object) -> FailoverRequest:
    """The request of ``kind`` for ``vm`` with ``fields``; options not given take defaults.

    :raises ConfigurationError: an unknown kind, an unknown option, or a value of another type.
    """
    request_type = REQUEST_TYPES.get(kind)
    if request_type is None:
        raise ConfigurationError(
            f"unknown failover request {kind!r} for VM {vm!r}; this "
            f"version knows {', '.join(sorted(REQUEST_TYPES))}"
        )
    if not isinstance(fields, dict):
        raise ConfigurationError(
            f"failover request {kind!r} for VM {vm!r}: its options are "
            f"not a JSON object: {fields!r}"
        )
    hints = typing.get_type_hints(request_type)
    options = {
        field.name: hints[field.name]
        for field in dataclasses.fields(request_type)
        if field.name != "vm"
    }
    for name, value in fields.items():
        expected = options.get(name)
        if expected is None:
            raise ConfigurationError(
                f"failover request {kind!r} for VM {vm!r} has an unknown option {name!r}"
            )
        if type(value) is not expected:
            raise ConfigurationError(
                f"failover request {kind!r} for VM {vm!r}: option "
                f"{name!r} must be a {expected.__name__}, not {value!r}"
            )
    return request_type(vm, **fields)


async def post_request(mailbox: Mailbox, request: FailoverRequest) -> int:
    """Leave ``request`` for the site's agent; returns the id to poll."""
    return await mailbox.post(request.vm, request.kind, request_fields(request))


def posted_request(posted: PostedRequest) -> FailoverRequest:
    """The typed request a mailbox row holds. :raises ConfigurationError: it is unreadable."""
    return request_from(posted.kind, posted.vm, posted.fields)


def fencing_said(old_primary: str, start: EpochStart, published: bool, site: Site) -> str:
    """What an unplanned failover says about the old primary: fenced or, with no broker
    reachable, not yet — and when it will be."""
    if published:
        return (
            f"the old primary ({old_primary}) is fenced: epoch {start.epoch} is in the journal "
            "and its producer can no longer publish."
        )
    return (
        f"the old primary ({old_primary}) was not fenced: no broker reachable "
        f"({site.config.bootstrap_servers}); it will be fenced when it next reaches the "
        f"cluster, by epoch {start.epoch}, which this site's agent publishes as soon as a "
        "broker answers (until then this site ships nothing)."
    )


def planned_done(prepared: FailoverPrepared) -> str:
    """What a planned failover prints once the final cycle shipped."""
    return (
        f"VM {prepared.vm} prepared for planned failover at cycle {prepared.final_cycle}; "
        f"site {prepared.target} takes over once it applied that cycle"
    )


async def carry_out(site: Site, request: FailoverRequest, *, resume: bool = True) -> str:
    """Carry out ``request`` at this site (the VM to itself); return what to print.

    ``resume``: a cancelled planned failover resumes the VM here (the agent passes False and
    resumes it itself, once the VM's writes are captured again).

    :raises ReplicationError: it was refused (:class:`~vmreplica.errors.FailoverRefused`) or
        failed; nothing the caller must undo.
    """
    vm = request.vm
    match request:
        case PlannedFailover():
            target = await check_planned(site, vm, request.target)  # before the VM stops
            await stop_vm(site, vm)
            try:
                prepared = await prepare_planned(
                    site, vm, request.reverse, request.start, request.verify, target
                )
            except ReplicationError:
                await resume_vm(site, vm, "the planned failover failed after the VM stopped")
                raise
            return planned_done(prepared)
        case UnplannedFailover():
            record = await site.catalog.vm(vm)
            start = await promote(site, vm, point=request.point, force=request.force)
            published = await site.catalog.pending_epoch(vm) is None
            return (
                f"VM {vm} failed over at cycle {start.start_cycle - 1} (epoch "
                f"{start.epoch}); {fencing_said(record.partner_site, start, published, site)} "
                "`vmreplica failover complete` keeps it, `... cancel` goes back"
            )
        case CompleteFailover():
            await complete(site, vm)
            return f"failover of VM {vm} completed; other recovery points deleted"
        case CancelFailover():
            record = await site.catalog.vm(vm)
            if record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER:
                await cancel_planned(site, vm)
                if resume:
                    await resume_vm(site, vm, "planned failover cancelled")
                return f"planned failover of VM {vm} cancelled; it replicates as before"
            await cancel(site, vm)
            return f"failover of VM {vm} cancelled; replaying the journal"
        case ReverseReplication():
            result = await reverse(site, vm, full_copy=request.full_copy)
            return (
                f"VM {vm} replicates to its old primary again: {result.diverged_bytes} "
                f"bytes diverged, {result.sent_bytes} bytes sent in cycle {result.cycle}"
                + (" (full copy, as asked)" if result.full_copy else "")
            )
        case Resynchronize(cancel=True):
            return (await cancel_resync(site, vm)).summary()
        case Resynchronize():
            return (
                await resync_here(
                    site,
                    vm,
                    request.site,
                    not_before_ms=request.at_ms,
                    digests_timeout_seconds=RESYNC_DIGESTS_TIMEOUT_SECONDS,
                )
            ).summary()
        case RemoveReplication():
            return await remove_replication(site, vm)
        case StopInitialReplication():
            return await stop_initial_replication(site, vm)
        case _:
            assert_never(request)
