"""Encode events as Avro single-object records and decode them back, by schema fingerprint.

Every record on a journal or status topic is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO
fingerprint of its writer schema + the Avro binary body. A plain Avro reader given the ``.avsc``
file can decode it; vmreplica decodes it by looking the fingerprint up among the current and
historic schemas (:mod:`.registry`) and resolving the body to the current schema, so records
written by an older release still decode after an upgrade.

Decoding untrusted bytes raises only :class:`~vmreplica.errors.DecodeError` subclasses:

* :class:`~vmreplica.errors.CorruptEventError` for too short, wrong marker, truncated or garbled
  bodies and trailing bytes;
* :class:`~vmreplica.errors.UnknownSchemaError` for a fingerprint this release does not know
  (most likely a record from a newer vmreplica);
* :class:`~vmreplica.errors.InvalidEventError` from :func:`decode_journal` and
  :func:`decode_status` for a record that decodes but holds a value out of bounds (a name that
  could escape a folder, a negative offset, an absurd size: :mod:`.validation`). Every reader of
  a topic uses these two; :func:`decode` reads the format alone, for tools and round-trip tests.

Encoding is for our own events only; a value that does not fit its schema is a programming
error and raises ``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

import copy
import functools
import io
from typing import Any

from vmreplica.errors import CorruptEventError, DecodeError, UnknownSchemaError

from .avro import (
    HEADER_SIZE,
    MAGIC,
    READ_ERRORS,
    SchemaResolutionError,
    read_body,
    write_body,
)
from .events import JOURNAL_EVENT_TYPES, STATUS_EVENT_TYPES, Event, JournalEvent, StatusEvent
from .registry import SchemaRegistry, load_package_schemas
from .validation import check_event

__all__ = [
    "EventCodec",
    "decode",
    "decode_journal",
    "decode_status",
    "default_codec",
    "encode",
    "fingerprint",
    "load_schema",
    "schema_names",
]


class EventCodec:
    """Encodes and decodes events against one :class:`SchemaRegistry`.

    The module-level functions use :func:`default_codec`, built from the schemas shipped in this
    package; build your own only to read with extra writer schemas (tests, tooling).
    """

    __slots__ = ("_registry",)

    def __init__(self, registry: SchemaRegistry) -> None:
        self._registry = registry

    @property
    def registry(self) -> SchemaRegistry:
        """The schemas this codec writes with and reads."""
        return self._registry

    def encode(self, event: Event) -> bytes:
        """Single-object encode ``event`` with its current schema.

        :raises TypeError: if ``event`` is not an event, or a field holds a value of the wrong
            type.
        :raises ValueError: if an integer is outside the range of its Avro ``int`` or ``long``.
        """
        schema = self._registry.for_class(type(event))
        if schema is None:
            raise TypeError(f"cannot encode {type(event).__name__}: not a vmreplica event")
        datum = schema.mapping.to_datum(event)
        buffer = io.BytesIO()
        buffer.write(schema.header)
        try:
            write_body(buffer, schema.parsed, datum)
        except OverflowError as exc:
            raise ValueError(
                f"cannot encode {type(event).__name__}: an integer does not fit an Avro long "
                "(64 bits)"
            ) from exc
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise TypeError(
                f"cannot encode {type(event).__name__}: a field does not match its Avro type "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return buffer.getvalue()

    def decode(self, data: bytes) -> Event:
        """Decode one single-object encoded record into its event.

        :raises CorruptEventError: if ``data`` is too short, lacks the ``C3 01`` marker, or its
            body is truncated, garbled or followed by extra bytes.
        :raises UnknownSchemaError: if the fingerprint names a schema this release does not know.
        :raises DecodeError: if the body cannot be resolved to the current schema.
        """
        size = len(data)
        if size < HEADER_SIZE:
            raise CorruptEventError(
                f"record is {size} bytes, shorter than the {HEADER_SIZE}-byte Avro single-object "
                "header (C3 01 + 8-byte schema fingerprint); it is truncated or not a vmreplica "
                "record"
            )
        if data[:2] != MAGIC:
            raise CorruptEventError(
                f"record of {size} bytes starts with {data[:2].hex(' ').upper()}, expected the "
                "Avro single-object marker C3 01; it is not a vmreplica record or is corrupted"
            )
        fingerprint = bytes(data[2:HEADER_SIZE])
        writer = self._registry.writer(fingerprint)
        if writer is None:
            raise UnknownSchemaError(
                f"record of {size} bytes names schema fingerprint {fingerprint.hex()}, which this "
                "vmreplica does not know; it may come from a newer vmreplica: upgrade this site "
                "to the release that wrote it"
            )
        name = writer.current.mapping.cls.__name__
        buffer = io.BytesIO(data)
        buffer.seek(HEADER_SIZE)
        try:
            datum = read_body(buffer, writer.parsed, writer.reader)
        except EOFError as exc:
            raise CorruptEventError(
                f"{name} record of {size} bytes is truncated: its body ends before the record "
                "is complete"
            ) from exc
        except SchemaResolutionError as exc:
            raise DecodeError(
                f"{name} record of {size} bytes (schema fingerprint {fingerprint.hex()}) cannot "
                f"be resolved to the current {name} schema: {exc}"
            ) from exc
        except READ_ERRORS as exc:
            raise CorruptEventError(
                f"{name} record of {size} bytes is garbled: {type(exc).__name__}: {exc}"
            ) from exc
        extra = size - buffer.tell()
        if extra:
            raise CorruptEventError(
                f"{name} record of {size} bytes has {extra} unexpected bytes after its body; "
                "it is corrupted or was framed wrongly"
            )
        event: Event = writer.current.mapping.from_datum(datum)
        return event

    def decode_journal(self, data: bytes) -> JournalEvent:
        """Decode a record read from a journal topic and check every value in it.

        :raises InvalidEventError: a value is out of bounds (:mod:`.validation`).
        :raises DecodeError: as :meth:`decode`, and if the record is a status event.
        """
        event = self.decode(data)
        if not isinstance(event, JOURNAL_EVENT_TYPES):
            raise DecodeError(
                f"a {type(event).__name__} status record was found where journal records are "
                "expected; check the topic name"
            )
        return check_event(event)

    def decode_status(self, data: bytes) -> StatusEvent:
        """Decode a record read from a status topic and check every value in it.

        :raises InvalidEventError: a value is out of bounds (:mod:`.validation`).
        :raises DecodeError: as :meth:`decode`, and if the record is a journal event.
        """
        event = self.decode(data)
        if not isinstance(event, STATUS_EVENT_TYPES):
            raise DecodeError(
                f"a {type(event).__name__} journal record was found where status records are "
                "expected; check the topic name"
            )
        return check_event(event)


@functools.cache
def default_codec() -> EventCodec:
    """The codec over the schemas shipped in this package, built (and checked) on first use."""
    current, history = load_package_schemas()
    return EventCodec(SchemaRegistry(current, history))


def encode(event: Event) -> bytes:
    """Single-object encode ``event``; see :meth:`EventCodec.encode`."""
    return default_codec().encode(event)


def decode(data: bytes) -> Event:
    """Decode one record of either topic; see :meth:`EventCodec.decode`."""
    return default_codec().decode(data)


def decode_journal(data: bytes) -> JournalEvent:
    """Decode one journal record; see :meth:`EventCodec.decode_journal`."""
    return default_codec().decode_journal(data)


def decode_status(data: bytes) -> StatusEvent:
    """Decode one status record; see :meth:`EventCodec.decode_status`."""
    return default_codec().decode_status(data)


def fingerprint(schema_name: str) -> bytes:
    """The 8 fingerprint bytes (as on the wire) of a current schema, by full or short name.

    :raises ConfigurationError: if no current schema has that name.
    """
    return default_codec().registry.schema(schema_name).fingerprint


def schema_names() -> tuple[str, ...]:
    """Full Avro names of the current schemas, sorted."""
    return default_codec().registry.names()


def load_schema(name: str) -> dict[str, Any]:
    """The ``.avsc`` document of a current schema, by full or short name, as a fresh dict.

    :raises ConfigurationError: if no current schema has that name.
    """
    raw = default_codec().registry.schema(name).raw
    return copy.deepcopy(dict(raw))
