"""Schemas evolve only compatibly: old records decode in new code, and new records in old code.

The scenario is the one an upgrade meets: take the current ``WriteBatch`` schema, an *old*
variant that lacks ``signature`` (a field with a default), and a *new* variant that adds a
field with a default. Each pair must resolve in both directions, through plain fastavro and
through vmreplica's codec with the other schema registered as a writer schema. The static
checker must agree, and must name the field when a change is not compatible. Finally every
historic ``.avsc`` shipped in ``schemas/history/`` must be compatible with its current schema.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import tomllib
from pathlib import Path
from typing import Any

import fastavro
import pytest

from vmreplica.errors import UnknownSchemaError
from vmreplica.schemas import codec
from vmreplica.schemas.avro import MAGIC, ParsedSchema, fingerprint_of, parse
from vmreplica.schemas.codec import EventCodec
from vmreplica.schemas.compatibility import incompatibilities, incompatibilities_both_ways
from vmreplica.schemas.events import Compression, Extent, ExtentKind, WriteBatch
from vmreplica.schemas.registry import SchemaRegistry, load_package_schemas

REPO = Path(__file__).resolve().parents[2]

BATCH = WriteBatch(
    vm="vm-01",
    epoch=4,
    cycle=9,
    batch=2,
    extents=(Extent("disk0", 4096, 4096, ExtentKind.DATA, 0, 0x12345678),),
    compression=Compression.NONE,
    payload=b"x" * 4096,
)


def _current() -> dict[str, Any]:
    return codec.load_schema("WriteBatch")


def _old() -> dict[str, Any]:
    """``WriteBatch`` as a release before signatures would have had it."""
    schema = _current()
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "signature"]
    return schema


def _new() -> dict[str, Any]:
    """``WriteBatch`` as a later release might extend it."""
    schema = _current()
    level = {"name": "compression_level", "type": "int", "default": 3, "doc": "zstd level."}
    schema["fields"] = [*schema["fields"], level]
    return schema


def _with_field(schema: dict[str, Any], name: str, **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    for field in changed["fields"]:
        if field["name"] == name:
            field.update(changes)
    return changed


def _required(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """``schema`` with field ``name`` made a plain ``bytes`` field without a default."""
    changed = _with_field(schema, name, type="bytes")
    for field in changed["fields"]:
        if field["name"] == name:
            del field["default"]
    return changed


def _single_object(schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
    """A record as a release with ``schema`` would have written it."""
    buffer = io.BytesIO()
    buffer.write(MAGIC + fingerprint_of(schema))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), datum)
    return buffer.getvalue()


def _read_plain(data: bytes, writer: dict[str, Any], reader: dict[str, Any]) -> Any:
    body = io.BytesIO(data[len(MAGIC) + 8 :])
    return fastavro.schemaless_reader(
        body, fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    )


def _codec_reading(*writers: dict[str, Any]) -> EventCodec:
    current, history = load_package_schemas()
    return EventCodec(SchemaRegistry(current, [*history, *writers]))


def _datum(**extra: Any) -> dict[str, Any]:
    return {
        "vm": "vm-01",
        "epoch": 4,
        "cycle": 9,
        "batch": 2,
        "extents": [
            {
                "disk": "disk0",
                "offset": 4096,
                "length": 4096,
                "kind": "DATA",
                "payload_offset": 0,
                "crc32": 0x12345678,
            }
        ],
        "compression": "NONE",
        "payload": b"x" * 4096,
        "encryption": None,
        **extra,
    }


def test_the_variants_are_compatible_both_ways_with_the_current_schema() -> None:
    current = parse(_current())

    assert incompatibilities_both_ways(parse(_old()), current) == []
    assert incompatibilities_both_ways(current, parse(_new())) == []


def test_old_writer_current_reader_fills_the_default() -> None:
    data = _single_object(_old(), _datum())

    assert _codec_reading(_old()).decode(data) == BATCH
    assert _read_plain(data, _old(), _current())["signature"] is None


def test_current_writer_old_reader_drops_the_field() -> None:
    data = codec.encode(BATCH)

    assert _read_plain(data, _current(), _old()) == _datum()


def test_new_writer_current_reader_ignores_the_added_field() -> None:
    data = _single_object(_new(), _datum(signature=b"sig", compression_level=19))

    assert _codec_reading(_new()).decode(data) == dataclasses.replace(BATCH, signature=b"sig")
    assert _read_plain(data, _new(), _current())["signature"] == b"sig"


def test_current_writer_new_reader_fills_the_default() -> None:
    decoded = _read_plain(codec.encode(BATCH), _current(), _new())

    assert decoded == _datum(signature=None, compression_level=3)


def test_the_current_codec_does_not_know_a_newer_schema_until_given_it() -> None:
    data = _single_object(_new(), _datum(signature=None, compression_level=19))

    with pytest.raises(UnknownSchemaError, match="may come from a newer vmreplica"):
        codec.decode(data)


@pytest.mark.parametrize(
    ("writer", "reader", "problem"),
    [
        (
            _old(),
            _required(_current(), "signature"),
            "WriteBatch.signature: the reader needs this field, the writer does not write it, "
            "and it has no default",
        ),
        (
            _with_field(_current(), "batch", type="long"),
            _current(),
            "WriteBatch.batch: written as long, cannot be read as int",
        ),
        (
            _with_field(
                _current(),
                "compression",
                type={"type": "enum", "name": "Compression", "symbols": ["NONE", "ZSTD", "LZ4"]},
            ),
            _current(),
            "WriteBatch.compression: symbols ['LZ4'] of enum Compression are unknown to the "
            "reader, which has no default symbol",
        ),
        (
            _with_field(_current(), "signature", type=["null", "bytes", "string"]),
            _with_field(_current(), "signature", type=["null", "int"]),
            "WriteBatch.signature: written as bytes, which no branch of the reader's union accepts",
        ),
    ],
    ids=["added-without-default", "narrowed", "new-enum-symbol", "union-branch"],
)
def test_incompatible_changes_are_named_by_field(
    writer: dict[str, Any], reader: dict[str, Any], problem: str
) -> None:
    assert problem in incompatibilities(parse(writer), parse(reader))


def test_promotions_are_compatible_one_way_only() -> None:
    widened = parse(_with_field(_current(), "batch", type="long"))
    current = parse(_current())

    assert incompatibilities(current, widened) == []
    assert incompatibilities(widened, current) != []


def test_the_registry_refuses_an_incompatible_historic_schema() -> None:
    current, _ = load_package_schemas()
    narrowed = _with_field(_current(), "cycle", type="string")

    with pytest.raises(ValueError, match=r"^historic schema ") as error:
        SchemaRegistry(current, [narrowed])

    assert str(error.value) == (
        "historic schema io.vmreplica.journal.WriteBatch cannot be read with the current one: "
        "WriteBatch.cycle: written as string, cannot be read as long"
    )


def _history_pairs() -> list[tuple[ParsedSchema, ParsedSchema]]:
    current, history = load_package_schemas()
    by_name = {parse(schema).name: parse(schema) for schema in current}
    pairs = []
    for schema in history:
        old = parse(schema)
        assert old.name in by_name, f"history holds {old.name}, which has no current schema"
        pairs.append((old, by_name[old.name]))
    return pairs


def test_every_historic_schema_is_compatible_both_ways_with_its_current_one() -> None:
    for old, current in _history_pairs():
        assert incompatibilities_both_ways(old, current) == [], old.name


def test_historic_schemas_are_shipped_in_the_wheel() -> None:
    if not _history_pairs():
        return
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = pyproject["tool"]["setuptools"]["package-data"]["vmreplica.schemas"]

    assert "history/*.avsc" in package_data
