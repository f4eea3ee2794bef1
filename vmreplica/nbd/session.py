"""One NBD client connection: the handshake, then pipelined transmission.

Each connection is an :class:`asyncio.Protocol` rather than a pair of streams: the read
callback parses every complete request in the bytes it receives and starts it at once, and the
replies produced while doing so leave in one write. A request whose device call completes
without suspending (a page-cache write) therefore costs no task, no wake-up and no syscall of
its own; one that suspends (fsync, a journal append) continues in a task while later requests
keep being served, and its reply is sent whenever it finishes — NBD allows replies in any order.

About 400 lines: one command per NBD request type and the pipelining they share; the handshake
and the wire format are :mod:`~vmreplica.nbd.handshake` and :mod:`~vmreplica.nbd.protocol`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine, Generator
from functools import partial
from typing import Any, Final

from vmreplica.errors import NbdProtocolError
from vmreplica.nbd import protocol as wire
from vmreplica.nbd.device import BlockDevice
from vmreplica.nbd.handshake import (
    HANDSHAKE_TIMEOUT_SECONDS,
    Export,
    ServerContext,
    StartTls,
    negotiate,
)
from vmreplica.nbd.tls import NbdTls

_log = logging.getLogger(__name__)

# Requests a connection may have suspended in the device before we stop reading its socket;
# bounds the memory a client can pin (fio and QEMU keep far fewer in flight).
MAX_INFLIGHT_REQUESTS: Final = 256
# Replies buffered for a slow reader before we stop reading its requests (backpressure).
REPLY_BUFFER_HIGH_BYTES: Final = 8 << 20
_HEADER_BYTES: Final = wire.REQUEST_HEADER.size
_pack_reply: Final = wire.SIMPLE_REPLY.pack

DeviceCall = Coroutine[Any, Any, Any]


class _Resumption:
    """Continue, inside a task, a device coroutine that was started outside one."""

    def __init__(self, coroutine: DeviceCall, awaited: Any) -> None:
        self._coroutine = coroutine
        self._awaited = awaited

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, awaited = self._coroutine, self._awaited
        while True:
            try:
                sent = yield awaited
            except BaseException as exc:  # the task's cancellation belongs to the coroutine
                try:
                    awaited = coroutine.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    awaited = coroutine.send(sent)
                except StopIteration as done:
                    return done.value


async def _resume(coroutine: DeviceCall, awaited: Any) -> Any:
    return await _Resumption(coroutine, awaited)


async def _trim(device: BlockDevice, offset: int, length: int, fua: bool) -> None:
    await device.trim(offset, length)
    if fua:
        await device.flush()


async def _flush(export: Export) -> None:
    # Writes replied to before this FLUSH are already in the device; those still suspended
    # (on any connection, as CAN_MULTI_CONN promises) are waited for, then one device flush.
    if export.pending_writes:
        await asyncio.wait(list(export.pending_writes))
    await export.device.flush()


class NbdSession(asyncio.Protocol):
    """The server end of one NBD connection."""

    def __init__(self, context: ServerContext, tls: NbdTls | None = None) -> None:
        """``tls``: what this connection offers of TLS (TCP listeners with credentials)."""
        self._context = context
        self._tls = tls
        self._secured = False
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.peer = "client"
        self._buffer = bytearray()
        self._wanted = 0
        self._waiter: asyncio.Future[None] | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._export: Export | None = None
        self._size = 0
        self._closed = False
        self._disconnecting = False
        self._discard_bytes = 0
        self._inflight: set[asyncio.Task[Any]] = set()
        self._replies: list[bytes] = []
        self._reply_pending = False
        self._in_batch = False
        self._reading_paused = False
        self._writing_paused = False

    # --- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = str(transport.get_extra_info("peername") or "unix-socket client")
        transport.set_write_buffer_limits(high=REPLY_BUFFER_HIGH_BYTES)
        self._context.sessions.add(self)
        transport.write(wire.encode_greeting())
        self._handshake = self._loop.create_task(self._negotiate())

    def data_received(self, data: bytes) -> None:
        if self._disconnecting:
            return  # after DISC, ABORT or a violation nothing more is served
        if self._discard_bytes:
            # Rest of an oversized WRITE payload, already answered with EOVERFLOW.
            if len(data) <= self._discard_bytes:
                self._discard_bytes -= len(data)
                return
            data = data[self._discard_bytes :]
            self._discard_bytes = 0
        self._buffer += data
        if self._export is None:
            if len(self._buffer) > 2 * wire.OPTION_DATA_MAX_BYTES:
                self._drop("sent far more handshake data than any option needs")
            elif (
                self._waiter is not None
                and not self._waiter.done()
                and len(self._buffer) >= self._wanted
            ):
                self._waiter.set_result(None)
        else:
            self._process_requests()

    def eof_received(self) -> bool:
        if self._export is None or self._secured:
            return False  # mid-handshake, or TLS (asyncio cannot half-close it): close now
        # A client may half-close after its last request (libnbd does after DISC): keep the
        # socket open for the replies still owed, and close once they are sent.
        self._close_when_idle()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._context.sessions.discard(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("NBD client went away"))
        if self._handshake is not None:
            self._handshake.cancel()
        self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._resume_reading()

    # --- handshake ---------------------------------------------------------------------------

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if self._closed:
                raise ConnectionResetError("NBD client went away")
            self._wanted = count
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _start_tls(self) -> None:
        """Upgrade the connection to TLS, right after the ACK of NBD_OPT_STARTTLS.

        :raises NbdProtocolError: the client sent more before the ACK, or the TLS handshake
            failed (no certificate, one the CA did not sign): the connection is dropped.
        """
        assert self._tls is not None
        assert self._transport is not None
        if self._buffer:
            raise NbdProtocolError("sent data after NBD_OPT_STARTTLS before its reply")
        try:
            transport = await self._loop.start_tls(
                self._transport, self, self._tls.context, server_side=True
            )
        except (ssl.SSLError, ConnectionError, OSError) as error:
            raise NbdProtocolError(f"failed the TLS handshake ({error})") from None
        if transport is None:
            raise ConnectionResetError("NBD client went away during the TLS handshake")
        transport.set_write_buffer_limits(high=REPLY_BUFFER_HIGH_BYTES)
        self._transport = transport
        self._secured = True

    async def _negotiate(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
                offer = None
                if self._tls is not None:
                    offer = StartTls(self._start_tls, self._tls.required)
                export = await negotiate(self._read_exactly, self._send, self._context, offer)
        except NbdProtocolError as exc:
            self._drop(str(exc))
        except TimeoutError:
            self._drop(f"did not finish the handshake in {HANDSHAKE_TIMEOUT_SECONDS:.0f} s")
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the server is stopping and closes us itself
        except Exception:
            _log.exception("NBD handshake with %s failed", self.peer)
            self._drop("internal error during the handshake")
        else:
            if export is None:  # NBD_OPT_ABORT, already acknowledged
                self._close_when_idle()
            else:
                self._enter_transmission(export)

    def _enter_transmission(self, export: Export) -> None:
        self._export = export
        self._size = export.device.size
        if self._buffer:
            self._process_requests()

    # --- transmission ------------------------------------------------------------------------

    def _process_requests(self) -> None:
        """Start every complete request in the buffer; send the replies ready meanwhile."""
        buffer = self._buffer
        available = len(buffer)
        position = 0
        max_request_bytes = self._context.max_request_bytes
        unpack = wire.REQUEST_HEADER.unpack_from
        violation = ""
        self._in_batch = True
        try:
            with memoryview(buffer) as view:
                while available - position >= _HEADER_BYTES and not self._disconnecting:
                    if len(self._inflight) >= MAX_INFLIGHT_REQUESTS:
                        self._pause_reading()
                        break
                    magic, flags, command, cookie, offset, length = unpack(buffer, position)
                    if magic != wire.NBD_REQUEST_MAGIC:
                        violation = f"sent request magic {magic:#x}"
                        break
                    payload = b""
                    if command == wire.NBD_CMD_WRITE:
                        start = position + _HEADER_BYTES
                        if length > max_request_bytes:
                            # Keep the connection: skip the payload as it arrives and refuse.
                            taken = min(available - start, length)
                            self._discard_bytes = length - taken
                            position = start + taken
                            self._reply_error(cookie, wire.NBD_EOVERFLOW)
                            continue
                        if start + length > available:
                            break
                        payload = bytes(view[start : start + length])
                        position = start + length
                    else:
                        position += _HEADER_BYTES
                    self._handle(command, flags, cookie, offset, length, payload=payload)
            # The view is released now, so the buffer may shrink.
            if self._disconnecting or violation:
                buffer.clear()
            else:
                del buffer[:position]
        finally:
            self._in_batch = False
            self._send_replies()
        if violation:
            self._drop(violation)

    def _handle(
        self, command: int, flags: int, cookie: int, offset: int, length: int, *, payload: bytes
    ) -> None:
        export = self._export
        assert export is not None
        if command == wire.NBD_CMD_DISC:
            self._close_when_idle()  # nothing sent after DISC is served
            return
        error = wire.check_request(
            command,
            flags,
            offset,
            length,
            size=self._size,
            max_request_bytes=self._context.max_request_bytes,
        )
        if error:
            self._reply_error(cookie, error)
            return
        if export.removed:
            self._reply_error(cookie, wire.NBD_ESHUTDOWN)  # the client must now disconnect
            return
        device = export.device
        fua = bool(flags & wire.NBD_CMD_FLAG_FUA)
        call: DeviceCall
        if command == wire.NBD_CMD_READ:
            call = device.read(offset, length)
        elif command == wire.NBD_CMD_FLUSH:
            call = _flush(export)
        elif export.read_only or export.refusal is not None:
            self._reply_error(cookie, wire.NBD_EPERM)
            return
        elif command == wire.NBD_CMD_WRITE:
            call = device.write(offset, payload, fua)
        elif command == wire.NBD_CMD_WRITE_ZEROES:
            may_trim = not flags & wire.NBD_CMD_FLAG_NO_HOLE
            call = device.write_zeroes(offset, length, fua, may_trim)
        else:
            call = _trim(device, offset, length, fua)
        self._run(command, cookie, length, call)

    def _run(self, command: int, cookie: int, length: int, call: DeviceCall) -> None:
        """Run ``call`` now; only if it suspends does it become a task."""
        try:
            awaited = call.send(None)
        except StopIteration as done:
            self._complete(command, cookie, length, done.value)
            return
        except Exception as exc:
            self._fail(command, cookie, exc)
            return
        task = self._loop.create_task(_resume(call, awaited))
        self._inflight.add(task)
        if command in wire.WRITE_COMMANDS and self._export is not None:
            self._export.pending_writes.add(task)
        task.add_done_callback(partial(self._finished, command, cookie, length))

    def _finished(self, command: int, cookie: int, length: int, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if self._export is not None:
            self._export.pending_writes.discard(task)
        if task.cancelled():
            self._reply_error(cookie, wire.NBD_ESHUTDOWN)
        elif (exc := task.exception()) is not None:
            self._fail(command, cookie, exc)
        else:
            self._complete(command, cookie, length, task.result())
        if self._disconnecting:
            self._close_when_idle()
        else:
            self._resume_reading()

    def _complete(self, command: int, cookie: int, length: int, result: Any) -> None:
        header = _pack_reply(wire.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
        if command != wire.NBD_CMD_READ:
            self._queue_reply(header)
        elif isinstance(result, bytes | bytearray | memoryview) and len(result) == length:
            self._queue_reply(header, result)
        else:
            error = OSError(f"device returned {type(result).__name__} instead of {length} bytes")
            self._fail(command, cookie, error)

    def _fail(self, command: int, cookie: int, exc: BaseException) -> None:
        name = self._export.name if self._export is not None else "?"
        _log.warning("NBD export %r: command %d from %s failed: %r", name, command, self.peer, exc)
        self._reply_error(cookie, wire.nbd_error_for(exc))

    def _reply_error(self, cookie: int, error: int) -> None:
        self._queue_reply(wire.encode_simple_reply(error, cookie))

    # --- output, flow control and closing ----------------------------------------------------

    def _queue_reply(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        if self._closed:
            return
        self._replies.append(header)
        if payload:
            self._replies.append(bytes(payload))
        if not self._reply_pending:
            self._reply_pending = True
            if not self._in_batch:  # a batch sends its replies when it ends
                self._loop.call_soon(self._send_replies)

    def _send_replies(self) -> None:
        self._reply_pending = False
        transport = self._transport
        if self._replies and transport is not None and not transport.is_closing():
            replies, self._replies = self._replies, []
            transport.writelines(replies)

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._closed and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._writing_paused
            and not self._disconnecting
            and not self._closed
            and len(self._inflight) < MAX_INFLIGHT_REQUESTS
            and self._transport is not None
        ):
            self._reading_paused = False
            self._transport.resume_reading()
            if self._export is not None and len(self._buffer) >= _HEADER_BYTES:
                self._process_requests()  # requests left unread when we paused

    def _close_when_idle(self) -> None:
        """Soft close: once no request is in flight, send what is queued and close."""
        self._disconnecting = True
        self._pause_reading()
        if not self._inflight and self._transport is not None:
            self._send_replies()
            self._transport.close()

    def _drop(self, reason: str) -> None:
        """Hard close after a protocol violation; other connections are not affected."""
        _log.warning("NBD client %s %s; closing its connection", self.peer, reason)
        self._disconnecting = True
        if self._transport is not None:
            self._transport.close()

    async def close(self, timeout_seconds: float) -> None:
        """Stop reading, let in-flight requests finish (up to the timeout), then hang up."""
        if self._handshake is not None and self._export is None:
            self._handshake.cancel()
        self._disconnecting = True
        self._pause_reading()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=timeout_seconds)
        self._send_replies()
        if self._transport is not None:
            self._transport.close()
            if not self._lost.done():
                await asyncio.wait([self._lost], timeout=timeout_seconds)
            if not self._lost.done():
                self._transport.abort()
