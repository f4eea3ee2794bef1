"""NBD wire format: constants, and pure encoders and decoders for the server side.

Everything here is pure (bytes in, values out) so it can be unit-tested without sockets; the
I/O lives in :mod:`vmreplica.nbd.session`. Names and numbers follow the NBD protocol
document (``doc/proto.md`` of NetworkBlockDevice/nbd). Only the *fixed newstyle* handshake and
*simple* replies are implemented, with ``NBD_OPT_STARTTLS`` on TCP: structured replies and
extended headers are refused with ``NBD_REP_ERR_UNSUP``, which every client must accept.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Final

from vmreplica.errors import NbdProtocolError

# --- Handshake -------------------------------------------------------------------------------

NBD_MAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and option header magic
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
SERVER_HANDSHAKE_FLAGS: Final = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES

NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_STARTTLS: Final = 5
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8

NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
_NBD_REP_ERR: Final = 1 << 31
NBD_REP_ERR_UNSUP: Final = _NBD_REP_ERR + 1
NBD_REP_ERR_POLICY: Final = _NBD_REP_ERR + 2
NBD_REP_ERR_INVALID: Final = _NBD_REP_ERR + 3
NBD_REP_ERR_TLS_REQD: Final = _NBD_REP_ERR + 5
NBD_REP_ERR_UNKNOWN: Final = _NBD_REP_ERR + 6
NBD_REP_ERR_SHUTDOWN: Final = _NBD_REP_ERR + 7
NBD_REP_ERR_TOO_BIG: Final = _NBD_REP_ERR + 9

NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3

# Export names and other strings MUST be at most 4096 bytes (proto.md, "Conventions").
STRING_MAX_BYTES: Final = 4096
# Options we accept carry at most a name and a few info requests; a client sending more is
# treated as a denial-of-service attempt and disconnected, as the spec allows.
OPTION_DATA_MAX_BYTES: Final = 64 * 1024
# We accept any alignment, so the minimum block size is 1; 4 KiB is what page-cache and
# journal writes are cheapest at.
BLOCK_SIZE_MINIMUM_BYTES: Final = 1
BLOCK_SIZE_PREFERRED_BYTES: Final = 4096

# --- Transmission ----------------------------------------------------------------------------

NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8

NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_WRITE_ZEROES: Final = 6

NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
# FUA is harmless on any command and NO_HOLE only changes WRITE_ZEROES; every other flag
# (DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN) needs a feature we never advertise.
ACCEPTED_COMMAND_FLAGS: Final = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE

# NBD error numbers are fixed by the protocol (they happen to equal Linux errno values).
# There is no EROFS among them: writes to a read-only or fenced export get EPERM.
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

WRITE_COMMANDS: Final = frozenset({NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES})
# Commands whose length is a payload on the wire, hence bounded by the maximum block size.
_PAYLOAD_COMMANDS: Final = frozenset({NBD_CMD_READ, NBD_CMD_WRITE})
_RANGE_COMMANDS: Final = frozenset(
    {NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES}
)

_GREETING: Final = struct.Struct(">QQH")
OPTION_HEADER: Final = struct.Struct(">QII")
_OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
_EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ExportInfoRequest:
    """The payload of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``: which export, which info items."""

    name: str
    info_types: tuple[int, ...]


def encode_greeting() -> bytes:
    """The 18 bytes the server sends first: magic, ``IHAVEOPT`` and its handshake flags."""
    return _GREETING.pack(NBD_MAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def decode_client_flags(data: bytes) -> bool:
    """Check the client's 32-bit flags; return whether it asked for ``NO_ZEROES``.

    :raises NbdProtocolError: on any flag we did not offer (the spec says: drop the connection).
    """
    (flags,) = _U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise NbdProtocolError(f"client sent unknown handshake flags {flags:#x}")
    return bool(flags & NBD_FLAG_C_NO_ZEROES)


def decode_option_header(data: bytes) -> tuple[int, int]:
    """Return ``(option, data_length)`` of an option header.

    :raises NbdProtocolError: on a bad magic or data too long to be a real option.
    """
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"bad option magic {magic:#x}")
    if length > OPTION_DATA_MAX_BYTES:
        raise NbdProtocolError(f"option {option} carries {length} bytes, more than we accept")
    return option, length


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def encode_option_error(option: int, reply_type: int, message: str) -> bytes:
    """An error option reply whose payload is a message for the client's user."""
    return encode_option_reply(option, reply_type, message.encode()[:STRING_MAX_BYTES])


def encode_server_entry(name: str) -> bytes:
    """An ``NBD_REP_SERVER`` reply to ``NBD_OPT_LIST`` naming one export."""
    raw = name.encode()
    return encode_option_reply(NBD_OPT_LIST, NBD_REP_SERVER, _U32.pack(len(raw)) + raw)


def encode_info_export(option: int, size: int, flags: int) -> bytes:
    """``NBD_REP_INFO`` / ``NBD_INFO_EXPORT``: the export size and transmission flags."""
    return encode_option_reply(
        option, NBD_REP_INFO, _INFO_EXPORT.pack(NBD_INFO_EXPORT, size, flags)
    )


def encode_info_name(option: int, name: str) -> bytes:
    """``NBD_REP_INFO`` / ``NBD_INFO_NAME``: the canonical export name."""
    return encode_option_reply(option, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + name.encode())


def encode_info_block_size(option: int, maximum_bytes: int) -> bytes:
    """``NBD_REP_INFO`` / ``NBD_INFO_BLOCK_SIZE``: minimum, preferred and maximum block sizes."""
    payload = _INFO_BLOCK_SIZE.pack(
        NBD_INFO_BLOCK_SIZE, BLOCK_SIZE_MINIMUM_BYTES, BLOCK_SIZE_PREFERRED_BYTES, maximum_bytes
    )
    return encode_option_reply(option, NBD_REP_INFO, payload)


def decode_export_name(data: bytes) -> str:
    """The export name of ``NBD_OPT_EXPORT_NAME``.

    :raises NbdProtocolError: if it is not UTF-8 or too long.
    """
    if len(data) > STRING_MAX_BYTES:
        raise NbdProtocolError(f"export name of {len(data)} bytes exceeds {STRING_MAX_BYTES}")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise NbdProtocolError("export name is not UTF-8") from exc


def decode_info_request(data: bytes) -> ExportInfoRequest:
    """Parse the data of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``.

    :raises NbdProtocolError: if the lengths inside disagree with the data length (the caller
        answers ``NBD_REP_ERR_INVALID`` and keeps the connection).
    """
    if len(data) < 6:
        raise NbdProtocolError(f"info request of {len(data)} bytes is too short")
    (name_length,) = _U32.unpack_from(data, 0)
    if 4 + name_length + 2 > len(data):
        raise NbdProtocolError(f"name length {name_length} overruns the option data")
    name = decode_export_name(data[4 : 4 + name_length])
    (count,) = _U16.unpack_from(data, 4 + name_length)
    start = 4 + name_length + 2
    if start + 2 * count != len(data):
        raise NbdProtocolError(f"{count} info requests do not match the option data length")
    info_types = struct.unpack_from(f">{count}H", data, start)
    return ExportInfoRequest(name=name, info_types=info_types)


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The reply to ``NBD_OPT_EXPORT_NAME``: size, flags and, unless declined, 124 zeroes."""
    reply = _EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(124)


def transmission_flags(*, read_only: bool) -> int:
    """The transmission flags of an export.

    ``CAN_MULTI_CONN`` is advertised: every connection to an export shares one
    :class:`~vmreplica.nbd.device.BlockDevice`, whose ``flush()`` must make durable
    every write it completed, whichever connection sent it (that is part of the device
    contract), and a FLUSH also waits for writes still in flight on any connection.
    """
    flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN
    if read_only:
        return flags | NBD_FLAG_READ_ONLY
    return flags | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES


def encode_simple_reply(error: int, cookie: int) -> bytes:
    """A 16-byte simple reply header (a successful READ reply is followed by the data)."""
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def check_request(
    command: int, flags: int, offset: int, length: int, *, size: int, max_request_bytes: int
) -> int:
    """Return the NBD error a request must be answered with before reaching the device, or 0.

    Unknown commands and flags get EINVAL; READ/WRITE longer than the advertised maximum get
    EOVERFLOW; a range past the end gets ENOSPC for writes (as the spec asks) and EINVAL
    otherwise. TRIM and WRITE_ZEROES carry no payload, so they may exceed the maximum.
    """
    if flags & ~ACCEPTED_COMMAND_FLAGS:
        return NBD_EINVAL
    if command not in _RANGE_COMMANDS:
        return 0 if command in (NBD_CMD_FLUSH, NBD_CMD_DISC) else NBD_EINVAL
    if command in _PAYLOAD_COMMANDS and length > max_request_bytes:
        return NBD_EOVERFLOW
    if offset + length > size:
        return NBD_EINVAL if command in (NBD_CMD_READ, NBD_CMD_TRIM) else NBD_ENOSPC
    return 0


_ERRNO_TO_NBD: Final = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error_for(exc: BaseException) -> int:
    """The NBD error reported for an exception a device raised (EIO unless it is telling)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, NBD_EIO)
    return NBD_EIO
