"""Convert event dataclasses to the plain values fastavro writes, and back, driven by the schema.

fastavro reads and writes dicts, lists and strings; vmreplica works with frozen dataclasses,
tuples and enums. A :class:`RecordMapping` is built once per schema by walking the parsed schema
and pairing every Avro named type with the Python class of the same name, so:

* a dataclass whose fields differ from its record (names or order), or an enum whose members
  differ from the Avro symbols, is refused when the mapping is built, not discovered on a replica;
* values of Avro ``int`` fields are range-checked on encode, because fastavro would happily
  write ``2**40`` into an ``int`` that every other Avro reader then rejects (fastavro itself
  refuses integers beyond 64 bits for ``long``);
* the per-value work is a precomputed chain of small functions, with identity conversions
  skipped, which keeps encode and decode of large write batches cheap.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Final

from .avro import PRIMITIVE_TYPES, ParsedSchema

__all__ = ["RecordMapping", "build_mapping"]

Convert = Callable[[Any], Any]
"""One value from one representation to the other; ``None`` in a slot stands for identity."""

AVRO_INT_MIN: Final = -(2**31)
AVRO_INT_MAX: Final = 2**31 - 1
_IDENTITY_TYPES: Final = frozenset(
    {"null", "boolean", "long", "float", "double", "bytes", "string"}
)
"""Values fastavro writes as they are; it range-checks ``long`` itself (``OverflowError``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RecordMapping:
    """How one top-level record and its Python class convert into each other.

    ``to_datum`` raises ``TypeError`` for a value of the wrong Python type and ``ValueError`` for
    an integer outside its Avro range, naming the field by its path (``WriteBatch.extents[].kind``).
    """

    name: str
    """Full Avro name of the record."""
    cls: type[Any]
    """The dataclass that mirrors it."""
    to_datum: Callable[[Any], dict[str, Any]]
    from_datum: Callable[[dict[str, Any]], Any]


def build_mapping(schema: ParsedSchema, classes: Mapping[str, type[Any]]) -> RecordMapping:
    """Pair ``schema`` with classes looked up by the short Avro name of each named type.

    :raises TypeError: if a class is missing or does not mirror its Avro type.
    """
    builder = _Builder(schema, classes)
    to_datum, from_datum = builder.record(schema.tree, schema.name.rsplit(".", 1)[-1])
    cls = builder.class_for(schema.name)
    return RecordMapping(name=schema.name, cls=cls, to_datum=to_datum, from_datum=from_datum)


class _Builder:
    """Walks one parsed schema and builds the converter pair for each type it meets."""

    def __init__(self, schema: ParsedSchema, classes: Mapping[str, type[Any]]) -> None:
        self._schema = schema
        self._classes = classes

    def class_for(self, full_name: str) -> type[Any]:
        short = full_name.rsplit(".", 1)[-1]
        cls = self._classes.get(short)
        if cls is None:
            raise TypeError(f"Avro type {full_name} has no Python class named {short}")
        return cls

    def convert(self, avro_type: Any, path: str) -> tuple[Convert | None, Convert | None]:
        """Return ``(encode, decode)`` for one Avro type; ``None`` means the value passes as is."""
        avro_type = self._schema.resolve(avro_type)
        if isinstance(avro_type, str):
            return self._primitive(avro_type, path)
        if isinstance(avro_type, list):
            return self._optional(avro_type, path)
        kind = avro_type["type"]
        if kind == "record":
            return self.record(avro_type, path)
        if kind == "enum":
            return self._enum(avro_type, path)
        if kind == "array":
            return self._array(avro_type, path)
        if kind in PRIMITIVE_TYPES and "logicalType" not in avro_type:
            return self.convert(kind, path)
        raise TypeError(f"{path}: Avro type {avro_type!r:.60} has no Python mapping in vmreplica")

    def _primitive(self, name: str, path: str) -> tuple[Convert | None, Convert | None]:
        if name in _IDENTITY_TYPES:
            return None, None

        def encode_int(value: Any) -> Any:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{path} must be an int, not {type(value).__name__}")
            if not AVRO_INT_MIN <= value <= AVRO_INT_MAX:
                raise ValueError(f"{path} = {value} does not fit an Avro int (32 bits)")
            return value

        return encode_int, None

    def _optional(self, branches: list[Any], path: str) -> tuple[Convert | None, Convert | None]:
        others = [branch for branch in branches if branch != "null"]
        if len(branches) != 2 or len(others) != 1:
            raise TypeError(f"{path}: only unions of null and one type map to Python (X | None)")
        encode, decode = self.convert(others[0], path)
        return _none_passes(encode), _none_passes(decode)

    def _enum(self, schema: Mapping[str, Any], path: str) -> tuple[Convert, Convert]:
        cls = self.class_for(schema["name"])
        if not issubclass(cls, Enum) or [m.value for m in cls] != list(schema["symbols"]):
            raise TypeError(f"{cls.__name__} must be an Enum with values {schema['symbols']}")
        members: dict[str, Enum] = {member.value: member for member in cls}

        def encode_enum(value: Any) -> Any:
            if value.__class__ is not cls:
                raise TypeError(f"{path} must be {cls.__name__}, not {type(value).__name__}")
            return value._value_  # the documented member attribute; faster than .value

        return encode_enum, members.__getitem__

    def _array(self, schema: Mapping[str, Any], path: str) -> tuple[Convert, Convert]:
        encode_item, decode_item = self.convert(schema["items"], f"{path}[]")

        def encode_array(value: Any) -> Any:
            if not isinstance(value, tuple):
                raise TypeError(f"{path} must be a tuple, not {type(value).__name__}")
            return list(value) if encode_item is None else [encode_item(item) for item in value]

        def decode_array(value: Any) -> Any:
            return tuple(value) if decode_item is None else tuple(map(decode_item, value))

        return encode_array, decode_array

    def record(
        self, schema: Mapping[str, Any], path: str
    ) -> tuple[Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], Any]]:
        cls = self.class_for(schema["name"])
        field_names = [field["name"] for field in schema["fields"]]
        if not dataclasses.is_dataclass(cls) or field_names != [
            field.name for field in dataclasses.fields(cls)
        ]:
            raise TypeError(
                f"{cls.__name__} must be a dataclass with exactly the fields of "
                f"{schema['name']}, in order: {', '.join(field_names)}"
            )
        converters = [
            (field["name"], *self.convert(field["type"], f"{path}.{field['name']}"))
            for field in schema["fields"]
        ]
        names = tuple(name for name, _, _ in converters)
        encoders = tuple((i, encode) for i, (_, encode, _) in enumerate(converters) if encode)
        decoders = tuple((i, decode) for i, (_, _, decode) in enumerate(converters) if decode)
        attributes_of = _getter(operator.attrgetter, names)
        items_of = _getter(operator.itemgetter, names)

        def encode_record(value: Any) -> dict[str, Any]:
            if value.__class__ is not cls:
                raise TypeError(f"{path} must be {cls.__name__}, not {type(value).__name__}")
            values = list(attributes_of(value))
            for index, encode in encoders:
                values[index] = encode(values[index])
            return dict(zip(names, values))  # noqa: B905 - same length by construction

        def decode_record(datum: dict[str, Any]) -> Any:
            values = list(items_of(datum))
            for index, decode in decoders:
                values[index] = decode(values[index])
            return cls(*values)

        return encode_record, decode_record


def _getter(
    make: Callable[..., Callable[[Any], Any]], names: tuple[str, ...]
) -> Callable[[Any], tuple[Any, ...]]:
    """``attrgetter``/``itemgetter`` over ``names`` that returns a tuple even for one name."""
    if len(names) > 1:
        return make(*names)
    single = [make(name) for name in names]

    def values_of(value: Any) -> tuple[Any, ...]:
        return tuple(get(value) for get in single)

    return values_of


def _none_passes(convert: Convert | None) -> Convert | None:
    """Wrap ``convert`` so that None (the null branch of an optional) passes through untouched."""
    if convert is None:
        return None
    inner = convert

    def optional(value: Any) -> Any:
        return None if value is None else inner(value)

    return optional
