"""The one module that calls fastavro, plus the Avro single-object encoding primitives.

Avro single-object encoding (Avro specification, "Single object encoding") frames each record as

* the two marker bytes ``C3 01``,
* the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form,
* the record's plain Avro binary body.

so any Avro reader holding the schema can decode a record found on a topic, with no schema
registry. The fingerprint is computed here from the specification's algorithm rather than taken
from fastavro, so the wire format does not depend on one library's reading of the specification;
a test cross-checks both.

fastavro ships loose type stubs; the small typed functions here are the seam the rest of
vmreplica uses, so fastavro's exceptions and ``Any`` values stop at this module.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastavro import parse_schema as _fastavro_parse_schema
from fastavro import schemaless_reader as _fastavro_schemaless_reader
from fastavro import schemaless_writer as _fastavro_schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form as _fastavro_canonical_form

__all__ = [
    "FINGERPRINT_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "PRIMITIVE_TYPES",
    "READ_ERRORS",
    "ParsedSchema",
    "SchemaResolutionError",
    "canonical_form",
    "crc64_avro",
    "fingerprint_of",
    "parse",
    "read_body",
    "write_body",
]

MAGIC: Final = b"\xc3\x01"
"""Marker that opens every single-object encoded record."""

FINGERPRINT_SIZE: Final = 8
"""Bytes of the CRC-64-AVRO fingerprint after the marker."""

HEADER_SIZE: Final = len(MAGIC) + FINGERPRINT_SIZE
"""Bytes before the Avro body: marker plus fingerprint."""

CRC64_AVRO_EMPTY: Final = 0xC15D213AA4D7A795
"""CRC-64-AVRO of the empty string; also the polynomial the lookup table is built from."""

_UINT64_MASK: Final = (1 << 64) - 1

READ_ERRORS: Final[tuple[type[Exception], ...]] = (
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    OverflowError,
    MemoryError,
    struct.error,
    SchemaResolutionError,
)
"""What fastavro raises while reading a truncated, garbled or unresolvable body; callers turn
these into vmreplica errors. ``EOFError`` means truncated, ``SchemaResolutionError`` means the
writer schema does not resolve to the reader schema, the rest mean garbled."""

PRIMITIVE_TYPES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
"""Avro's primitive type names; any other name in a parsed schema refers to a named type."""


@dataclass(frozen=True, slots=True)
class ParsedSchema:
    """A schema parsed by fastavro once, ready for the fast reader and writer.

    ``tree`` is fastavro's parsed form: names are fully qualified, and a named type appears as
    its full name wherever it is used after its definition; ``named`` maps those names to their
    definitions.
    """

    name: str
    tree: dict[str, Any]
    named: Mapping[str, dict[str, Any]]

    def resolve(self, schema: Any) -> Any:
        """Replace a reference to a named type by its definition; return anything else as is."""
        if isinstance(schema, str) and schema not in PRIMITIVE_TYPES:
            return self.named[schema]
        return schema


def _crc64_table() -> tuple[int, ...]:
    """Build the 256-entry table of the Avro specification's ``initFPTable``."""
    table: list[int] = []
    for byte in range(256):
        fp = byte
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_AVRO_EMPTY & -(fp & 1))
        table.append(fp & _UINT64_MASK)
    return tuple(table)


_CRC64_TABLE: Final = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) fingerprint of ``data`` as an unsigned 64-bit integer.

    This is the specification's ``fingerprint64``; ``crc64_avro(b"")`` is ``0xc15d213aa4d7a795``.
    """
    fp = CRC64_AVRO_EMPTY
    table = _CRC64_TABLE
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def canonical_form(schema: Mapping[str, Any]) -> str:
    """Parsing Canonical Form of a schema (names fully qualified, docs and defaults dropped).

    :raises ValueError: if ``schema`` is not a valid Avro schema.
    """
    try:
        return _fastavro_canonical_form(dict(schema))
    except Exception as exc:
        raise ValueError(f"not a valid Avro schema: {exc}") from exc


def fingerprint_of(schema: Mapping[str, Any]) -> bytes:
    """The 8 bytes that follow the marker for records written with ``schema``.

    :raises ValueError: if ``schema`` is not a valid Avro schema.
    """
    value = crc64_avro(canonical_form(schema).encode("utf-8"))
    return value.to_bytes(FINGERPRINT_SIZE, "little")


def parse(schema: Mapping[str, Any]) -> ParsedSchema:
    """Parse a self-contained record schema with fastavro.

    Each schema gets its own name table, so the same named type (``Encryption``, say) may be
    defined in several ``.avsc`` files without clashing.

    :raises ValueError: if ``schema`` is not a valid Avro record schema.
    """
    named: dict[str, dict[str, Any]] = {}
    try:
        tree = _fastavro_parse_schema(copy.deepcopy(dict(schema)), named_schemas=named)
    except Exception as exc:
        raise ValueError(f"not a valid Avro schema: {exc}") from exc
    if not isinstance(tree, dict) or tree.get("type") != "record":
        raise ValueError(f"expected an Avro record schema, got {schema!r:.80}")
    return ParsedSchema(name=str(tree["name"]), tree=tree, named=named)


def write_body(buffer: io.BytesIO, schema: ParsedSchema, datum: Mapping[str, Any]) -> None:
    """Append the Avro binary body of ``datum`` to ``buffer``.

    Union branches are chosen by value, never by fastavro's ``(name, value)`` tuple notation, so
    a tuple can never be mistaken for a branch selector.
    """
    _fastavro_schemaless_writer(buffer, schema.tree, datum, disable_tuple_notation=True)


def read_body(
    buffer: io.BytesIO, writer: ParsedSchema, reader: ParsedSchema | None
) -> dict[str, Any]:
    """Read one Avro body from ``buffer`` written with ``writer``, resolved to ``reader``.

    ``reader`` is None when the writer schema is the current one, which skips resolution.

    :raises: any of :data:`READ_ERRORS` when the body is truncated, garbled or unresolvable.
    """
    datum = _fastavro_schemaless_reader(
        buffer, writer.tree, None if reader is None else reader.tree
    )
    if not isinstance(datum, dict):
        raise TypeError(f"expected an Avro record, read {type(datum).__name__}")
    return datum
