"""The schemas this release writes and every schema it can read, indexed by fingerprint.

Current schemas are the ``*.avsc`` files next to this module, one per event kind; encode always
writes with them and decode always resolves to them. Historic schemas are earlier versions of
the same records kept under ``history/`` (``WriteBatch.1.avsc``, say): records already on a
topic were written with them, and decode still finds their fingerprints here. When a schema
changes, copy the released ``.avsc`` into ``history/`` before editing it.

Everything is checked when the registry is built, so a packaging mistake fails the first
encode or decode (and the test suite) rather than a replica days later:

1. every current schema is a valid record and its dataclass in :mod:`.events` mirrors it;
2. names, short names and fingerprints are unique;
3. every historic schema names a current record and resolves to it (old data, new reader).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Final

from vmreplica.errors import ConfigurationError

from . import events
from .avro import MAGIC, ParsedSchema, fingerprint_of, parse
from .compatibility import incompatibilities
from .records import RecordMapping, build_mapping

__all__ = ["CurrentSchema", "SchemaRegistry", "WriterSchema", "load_package_schemas"]

SCHEMA_SUFFIX: Final = ".avsc"
HISTORY_DIRECTORY: Final = "history"

_EVENT_CLASSES: Final[Mapping[str, type[Any]]] = {
    name: value for name, value in vars(events).items() if isinstance(value, type)
}
"""Classes the Avro named types map to, by short name."""


@dataclass(frozen=True, slots=True)
class CurrentSchema:
    """A schema this release writes, with everything encode and decode need precomputed."""

    name: str
    """Full Avro name, e.g. ``io.vmreplica.journal.WriteBatch``."""
    raw: Mapping[str, Any]
    """The ``.avsc`` document as loaded."""
    parsed: ParsedSchema
    fingerprint: bytes
    """CRC-64-AVRO of the Parsing Canonical Form, little-endian, as on the wire."""
    header: bytes
    """``C3 01`` + fingerprint: the first ten bytes of every record written with this schema."""
    mapping: RecordMapping


@dataclass(frozen=True, slots=True)
class WriterSchema:
    """A schema records may have been written with: a current one or a historic one."""

    fingerprint: bytes
    parsed: ParsedSchema
    current: CurrentSchema
    """The schema a record written with this one is decoded into."""
    reader: ParsedSchema | None
    """``current.parsed`` when resolution is needed; None when this is the current schema."""


class SchemaRegistry:
    """Current and historic schemas, by name, by event class and by fingerprint."""

    def __init__(
        self,
        current: Iterable[Mapping[str, Any]],
        history: Iterable[Mapping[str, Any]] = (),
        classes: Mapping[str, type[Any]] = _EVENT_CLASSES,
    ) -> None:
        """Parse and cross-check the schemas (see the module docstring for the checks).

        :param current: the schemas encode writes, one record per event class.
        :param history: other schemas of the same records that decode must still read; in
            tests, also a newer variant, to show an older release reads it once given it.
        :param classes: Python classes by short Avro name; the event classes by default.
        :raises ValueError: if a schema is invalid, duplicated or incompatible.
        :raises TypeError: if a class does not mirror its schema.
        """
        self._by_name: dict[str, CurrentSchema] = {}
        self._by_short_name: dict[str, CurrentSchema] = {}
        self._by_class: dict[type[Any], CurrentSchema] = {}
        self._by_fingerprint: dict[bytes, WriterSchema] = {}
        for raw in current:
            self._add_current(raw, classes)
        for raw in history:
            self._add_history(raw)

    def _add_current(self, raw: Mapping[str, Any], classes: Mapping[str, type[Any]]) -> None:
        parsed = parse(raw)
        short = parsed.name.rsplit(".", 1)[-1]
        if parsed.name in self._by_name or short in self._by_short_name:
            raise ValueError(f"two current schemas are named {short}")
        fingerprint = fingerprint_of(raw)
        schema = CurrentSchema(
            name=parsed.name,
            raw=raw,
            parsed=parsed,
            fingerprint=fingerprint,
            header=MAGIC + fingerprint,
            mapping=build_mapping(parsed, classes),
        )
        self._register(WriterSchema(fingerprint, parsed, schema, reader=None))
        self._by_name[schema.name] = schema
        self._by_short_name[short] = schema
        self._by_class[schema.mapping.cls] = schema

    def _add_history(self, raw: Mapping[str, Any]) -> None:
        parsed = parse(raw)
        current = self._by_name.get(parsed.name)
        if current is None:
            raise ValueError(f"historic schema {parsed.name} has no current schema of that name")
        problems = incompatibilities(parsed, current.parsed)
        if problems:
            raise ValueError(
                f"historic schema {parsed.name} cannot be read with the current one: "
                + "; ".join(problems)
            )
        fingerprint = fingerprint_of(raw)
        if fingerprint == current.fingerprint:
            return
        self._register(WriterSchema(fingerprint, parsed, current, reader=current.parsed))

    def _register(self, writer: WriterSchema) -> None:
        known = self._by_fingerprint.get(writer.fingerprint)
        if known is not None and known.parsed.name != writer.parsed.name:
            raise ValueError(
                f"schemas {known.parsed.name} and {writer.parsed.name} share fingerprint "
                f"{writer.fingerprint.hex()}"
            )
        self._by_fingerprint.setdefault(writer.fingerprint, writer)

    def names(self) -> tuple[str, ...]:
        """Full names of the current schemas, sorted."""
        return tuple(sorted(self._by_name))

    def schema(self, name: str) -> CurrentSchema:
        """The current schema called ``name``, full (``io.vmreplica.journal.Heartbeat``) or short.

        :raises ConfigurationError: if no current schema has that name.
        """
        found = self._by_name.get(name) or self._by_short_name.get(name)
        if found is None:
            raise ConfigurationError(
                f"no schema named {name!r}; known schemas: {', '.join(sorted(self._by_short_name))}"
            )
        return found

    def for_class(self, cls: type[Any]) -> CurrentSchema | None:
        """The schema events of class ``cls`` are written with, or None if it is no event."""
        return self._by_class.get(cls)

    def writer(self, fingerprint: bytes) -> WriterSchema | None:
        """The schema a record with this fingerprint was written with, or None if unknown."""
        return self._by_fingerprint.get(fingerprint)

    def writers(self) -> tuple[WriterSchema, ...]:
        """Every readable writer schema, current ones first."""
        return tuple(self._by_fingerprint.values())


def load_package_schemas() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read the current and historic ``.avsc`` files shipped in this package.

    :returns: ``(current, history)``, each sorted by file name.
    """
    root = resources.files(__package__ or "vmreplica.schemas")
    history = root / HISTORY_DIRECTORY
    return _read_schemas(root), _read_schemas(history) if history.is_dir() else []


def _read_schemas(directory: Traversable) -> list[dict[str, Any]]:
    files = sorted(
        (entry for entry in directory.iterdir() if entry.name.endswith(SCHEMA_SUFFIX)),
        key=lambda entry: entry.name,
    )
    schemas: list[dict[str, Any]] = []
    for entry in files:
        try:
            document = json.loads(entry.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"schema file {entry.name} is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ValueError(f"schema file {entry.name} must hold one record schema")
        schemas.append(document)
    return schemas
