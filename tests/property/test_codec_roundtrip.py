"""Properties of the codec: any event round-trips exactly; any bytes decode or raise DecodeError.

Events are generated from the ``.avsc`` files themselves (every Avro ``int`` and ``long`` over
its whole range, any text, any bytes, every enum symbol, null and non-null branches), so a field
added to a schema is covered without touching this file.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmreplica.errors import CorruptEventError, DecodeError
from vmreplica.schemas import codec, events
from vmreplica.schemas.avro import HEADER_SIZE, MAGIC

_LONGS = st.integers(-(2**63), 2**63 - 1)
_PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": _LONGS,
    "bytes": st.binary(max_size=64),
    "string": st.text(max_size=16),
}


def _strategy(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the Python type that mirrors an Avro type, built from the raw ``.avsc``."""
    if isinstance(schema, str):
        return _PRIMITIVES[schema] if schema in _PRIMITIVES else named[schema]
    if isinstance(schema, list):
        return st.one_of([_strategy(branch, named) for branch in schema])
    kind = schema["type"]
    if kind == "array":
        return st.lists(_strategy(schema["items"], named), max_size=4).map(tuple)
    cls = getattr(events, schema["name"])
    if kind == "enum":
        strategy: st.SearchStrategy[Any] = st.sampled_from(list(cls))
    else:
        fields = {f["name"]: _strategy(f["type"], named) for f in schema["fields"]}
        strategy = st.builds(cls, **fields)
    named[schema["name"]] = strategy
    return strategy


EVENTS: st.SearchStrategy[events.Event] = st.one_of(
    [_strategy(codec.load_schema(name), {}) for name in codec.schema_names()]
)
FINGERPRINTS = st.sampled_from([codec.fingerprint(name) for name in codec.schema_names()])


def _decodes_or_refuses(data: bytes) -> None:
    """Decode ``data``; an event or a DecodeError is fine, anything else fails the property."""
    with contextlib.suppress(DecodeError):
        assert isinstance(
            codec.decode(data), events.JOURNAL_EVENT_TYPES + events.STATUS_EVENT_TYPES
        )


@given(EVENTS)
@settings(max_examples=300)
def test_every_event_round_trips_exactly(event: events.Event) -> None:
    data = codec.encode(event)

    assert data[:2] == MAGIC
    assert codec.decode(data) == event


@given(st.binary(max_size=256))
@settings(max_examples=300)
def test_random_bytes_never_raise_anything_but_decode_errors(data: bytes) -> None:
    _decodes_or_refuses(data)


@given(FINGERPRINTS, st.binary(max_size=256))
@settings(max_examples=1000)
def test_random_bodies_behind_a_valid_header_never_raise_anything_but_decode_errors(
    fingerprint: bytes, body: bytes
) -> None:
    _decodes_or_refuses(MAGIC + fingerprint + body)


@given(EVENTS, st.data())
@settings(max_examples=300)
def test_a_record_cut_anywhere_is_corrupt(event: events.Event, data: st.DataObject) -> None:
    encoded = codec.encode(event)
    cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")

    with pytest.raises(CorruptEventError):
        codec.decode(encoded[:cut])


@given(EVENTS, st.data())
@settings(max_examples=300)
def test_records_with_a_damaged_body_byte_never_raise_anything_but_decode_errors(
    event: events.Event, data: st.DataObject
) -> None:
    encoded = bytearray(codec.encode(event))
    flip = data.draw(st.integers(HEADER_SIZE, len(encoded) - 1), label="flip")
    encoded[flip] ^= data.draw(st.integers(1, 255), label="mask")

    _decodes_or_refuses(bytes(encoded))
