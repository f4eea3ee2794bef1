"""The NBD handshake (fixed newstyle option haggling) and the exports it chooses among.

Kept apart from the connection's transport code: :func:`negotiate` only reads bytes through
one callable, writes replies through another and upgrades to TLS through a third, so its rules
can be read, and tested, without the transmission machinery of :mod:`vmreplica.nbd.session`.

**TLS** (the spec's "TLS support"): a connection offered :class:`StartTls` answers
``NBD_OPT_STARTTLS`` with ``NBD_REP_ACK`` and continues the haggling inside TLS. When TLS is
required (the spec's FORCEDTLS mode) every other option before it gets ``NBD_REP_ERR_TLS_REQD``
(``NBD_OPT_ABORT`` excepted), and ``NBD_OPT_EXPORT_NAME``, which cannot fail politely, hangs
up: no byte of an export is served in clear. Unix sockets are offered no TLS (``UNSUP``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from vmreplica.errors import NbdProtocolError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.device import BlockDevice

if TYPE_CHECKING:
    from vmreplica.nbd.session import NbdSession

HANDSHAKE_TIMEOUT_SECONDS: Final = 60.0  # a client that never finishes negotiating is dropped

ReadExactly = Callable[[int], Awaitable[bytes]]
Send = Callable[[bytes], None]


@dataclass(frozen=True)
class StartTls:
    """TLS as one connection offers it."""

    upgrade: Callable[[], Awaitable[None]]
    """Runs the TLS handshake over the connection (after the ACK is sent); raises when it
    fails, and the connection is dropped (too late to go on in clear)."""
    required: bool
    """No option but STARTTLS and ABORT is served before TLS (FORCEDTLS)."""


@dataclass(eq=False)
class Export:
    """An export as the sessions see it: its device and whether it may be written."""

    name: str
    device: BlockDevice
    read_only: bool = False
    refusal: str | None = None  # why writes are refused (a fenced primary), or None
    removed: bool = False
    # Writes suspended in the device, on any connection: a FLUSH waits for them first.
    pending_writes: set[asyncio.Task[Any]] = field(default_factory=set)

    def transmission_flags(self) -> int:
        """Flags for a new connection; a fenced export is announced read-only."""
        return wire.transmission_flags(read_only=self.read_only or self.refusal is not None)


@dataclass(eq=False)
class ServerContext:
    """What the server shares with its sessions; exports may change while they run."""

    exports: dict[str, Export]
    max_request_bytes: int
    sessions: set[NbdSession] = field(default_factory=set)

    def find(self, name: str) -> Export | None:
        """The export called ``name``; the empty (default) name means the only export."""
        export = self.exports.get(name)
        if export is None and name == "" and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return export


async def negotiate(
    read_exactly: ReadExactly,
    send: Send,
    context: ServerContext,
    tls: StartTls | None = None,
) -> Export | None:
    """Haggle options after the greeting; return the export chosen, or None on NBD_OPT_ABORT.

    Options we do not implement (STRUCTURED_REPLY, meta contexts, extended headers, STARTTLS
    without ``tls``) get ``NBD_REP_ERR_UNSUP``, which the spec obliges clients to accept; bad
    INFO/GO/LIST/STARTTLS data gets ``NBD_REP_ERR_INVALID`` and the haggling goes on.

    :raises NbdProtocolError: when the client breaks a rule that leaves hanging up as the only
        answer: unknown client flags, a bad option magic, oversized option data,
        ``NBD_OPT_EXPORT_NAME`` naming an export we do not have or sent before a required TLS.
    """
    no_zeroes = wire.decode_client_flags(await read_exactly(4))
    secured = False
    while True:
        option, length = wire.decode_option_header(await read_exactly(wire.OPTION_HEADER.size))
        data = await read_exactly(length)
        if option == wire.NBD_OPT_STARTTLS:
            secured = await _start_tls(tls, secured, data, send)
            continue
        if tls is not None and tls.required and not secured and option != wire.NBD_OPT_ABORT:
            if option == wire.NBD_OPT_EXPORT_NAME:  # cannot be refused politely: hang up
                raise NbdProtocolError(
                    "asked for an export without TLS, which this server requires"
                )
            message = "this server requires TLS: send NBD_OPT_STARTTLS first"
            send(wire.encode_option_error(option, wire.NBD_REP_ERR_TLS_REQD, message))
            continue
        if option == wire.NBD_OPT_EXPORT_NAME:
            name = wire.decode_export_name(data)
            export = context.find(name)
            if export is None:  # this option cannot fail politely: the spec says hang up
                raise NbdProtocolError(f"asked for unknown export {name!r}")
            size, flags = export.device.size, export.transmission_flags()
            send(wire.encode_export_name_reply(size, flags, no_zeroes=no_zeroes))
            return export
        if option in (wire.NBD_OPT_GO, wire.NBD_OPT_INFO):
            export = _answer_info(option, data, send, context)
            if export is not None and option == wire.NBD_OPT_GO:
                return export
        elif option == wire.NBD_OPT_LIST:
            _answer_list(data, send, context)
        elif option == wire.NBD_OPT_ABORT:
            send(wire.encode_option_reply(option, wire.NBD_REP_ACK))
            return None
        else:
            send(wire.encode_option_error(option, wire.NBD_REP_ERR_UNSUP, "not supported"))


async def _start_tls(tls: StartTls | None, secured: bool, data: bytes, send: Send) -> bool:
    """Answer NBD_OPT_STARTTLS; whether the connection is inside TLS afterwards."""
    option = wire.NBD_OPT_STARTTLS
    if tls is None:
        send(wire.encode_option_error(option, wire.NBD_REP_ERR_UNSUP, "no TLS on this socket"))
    elif secured:
        send(wire.encode_option_error(option, wire.NBD_REP_ERR_INVALID, "TLS is on already"))
    elif data:
        send(wire.encode_option_error(option, wire.NBD_REP_ERR_INVALID, "STARTTLS takes no data"))
    else:
        send(wire.encode_option_reply(option, wire.NBD_REP_ACK))
        await tls.upgrade()  # at once: the client's TLS handshake follows the ACK
        return True
    return secured


def _answer_info(option: int, data: bytes, send: Send, context: ServerContext) -> Export | None:
    try:
        request = wire.decode_info_request(data)
    except NbdProtocolError as exc:
        send(wire.encode_option_error(option, wire.NBD_REP_ERR_INVALID, str(exc)))
        return None
    export = context.find(request.name)
    if export is None:
        message = f"no export named {request.name!r}"
        send(wire.encode_option_error(option, wire.NBD_REP_ERR_UNKNOWN, message))
        return None
    replies = [
        wire.encode_info_export(option, export.device.size, export.transmission_flags()),
        # Sent even when not asked for (as qemu-nbd does): clients must tolerate it.
        wire.encode_info_block_size(option, context.max_request_bytes),
    ]
    if wire.NBD_INFO_NAME in request.info_types:
        replies.append(wire.encode_info_name(option, export.name))
    replies.append(wire.encode_option_reply(option, wire.NBD_REP_ACK))
    send(b"".join(replies))
    return export


def _answer_list(data: bytes, send: Send, context: ServerContext) -> None:
    if data:
        error = wire.NBD_REP_ERR_INVALID
        send(wire.encode_option_error(wire.NBD_OPT_LIST, error, "NBD_OPT_LIST takes no data"))
        return
    replies = [wire.encode_server_entry(name) for name in context.exports]
    replies.append(wire.encode_option_reply(wire.NBD_OPT_LIST, wire.NBD_REP_ACK))
    send(b"".join(replies))
