"""Static check that data written with one Avro schema can be read with another.

vmreplica's schemas may only evolve compatibly: records written by an older release must decode
in a newer one (backward), and records of a newer release must decode in an older one that has
been given the new schema (forward). Both are the Avro specification's "Schema Resolution"
rules applied in one direction or the other, which :func:`incompatibilities` checks without any
data. The registry runs it on every historic schema at start-up; the evolution tests run it both
ways.

Only what the rules need is modelled: promotions of primitives, records with added, removed and
aliased fields, enums, arrays, maps, fixed and unions. Logical types are compared by their
underlying type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .avro import PRIMITIVE_TYPES, ParsedSchema

__all__ = ["incompatibilities", "incompatibilities_both_ways"]

_PROMOTIONS: Final[Mapping[str, frozenset[str]]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
"""Writer primitive -> reader primitives it may be read as, besides itself."""


def incompatibilities(writer: ParsedSchema, reader: ParsedSchema) -> list[str]:
    """Say why records written with ``writer`` cannot be read with ``reader``.

    :returns: one sentence per problem, each naming the field path; empty when every record
        ``writer`` can produce resolves to ``reader``.
    """
    checker = _Checker(writer, reader)
    checker.check(writer.tree, reader.tree, _short(reader.name))
    return checker.problems


def incompatibilities_both_ways(old: ParsedSchema, new: ParsedSchema) -> list[str]:
    """Problems of ``old`` data read by ``new`` code and of ``new`` data read by ``old`` code."""
    return [f"old data, new reader: {p}" for p in incompatibilities(old, new)] + [
        f"new data, old reader: {p}" for p in incompatibilities(new, old)
    ]


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Checker:
    """One walk over a writer/reader pair, collecting problems rather than stopping at the first."""

    def __init__(self, writer: ParsedSchema, reader: ParsedSchema) -> None:
        self._writer = writer
        self._reader = reader
        self._seen: set[tuple[str, str]] = set()
        self.problems: list[str] = []

    def check(self, writer_type: Any, reader_type: Any, path: str) -> None:
        """Record every way ``writer_type`` fails to resolve to ``reader_type``."""
        w = _normalise(self._writer.resolve(writer_type))
        r = _normalise(self._reader.resolve(reader_type))
        if isinstance(r, list):
            for branch in w if isinstance(w, list) else [w]:
                self._check_branch(branch, r, path)
            return
        if isinstance(w, list):
            for branch in w:
                self.check(branch, r, path)
            return
        if not self._matches(w, r):
            self.problems.append(
                f"{path}: written as {_describe(w)}, cannot be read as {_describe(r)}"
            )
            return
        if isinstance(w, str):
            return
        kind = w["type"]
        if kind == "record":
            self._check_record(w, r, path)
        elif kind == "enum":
            missing = [s for s in w["symbols"] if s not in r["symbols"]]
            if missing and "default" not in r:
                self.problems.append(
                    f"{path}: symbols {missing} of enum {_short(w['name'])} are unknown to the "
                    "reader, which has no default symbol"
                )
        elif kind == "array":
            self.check(w["items"], r["items"], f"{path}[]")
        elif kind == "map":
            self.check(w["values"], r["values"], f"{path}{{}}")
        elif kind == "fixed" and w["size"] != r["size"]:
            self.problems.append(f"{path}: fixed size {w['size']} read as size {r['size']}")

    def _check_branch(self, branch: Any, reader_union: list[Any], path: str) -> None:
        resolved = _normalise(self._writer.resolve(branch))
        for candidate in reader_union:
            if self._matches(resolved, _normalise(self._reader.resolve(candidate))):
                self.check(branch, candidate, path)
                return
        self.problems.append(
            f"{path}: written as {_describe(resolved)}, which no branch of the reader's union "
            "accepts"
        )

    def _check_record(self, w: Mapping[str, Any], r: Mapping[str, Any], path: str) -> None:
        pair = (w["name"], r["name"])
        if pair in self._seen:
            return
        self._seen.add(pair)
        written = {field["name"]: field for field in w["fields"]}
        for field in r["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            source = next((written[name] for name in names if name in written), None)
            field_path = f"{path}.{field['name']}"
            if source is not None:
                self.check(source["type"], field["type"], field_path)
            elif "default" not in field:
                self.problems.append(
                    f"{field_path}: the reader needs this field, the writer does not write it, "
                    "and it has no default"
                )

    @staticmethod
    def _matches(w: Any, r: Any) -> bool:
        """Whether a writer type may resolve to a reader type at all (the union-branch test)."""
        if isinstance(w, str) or isinstance(r, str):
            return (
                isinstance(w, str)
                and isinstance(r, str)
                and (w == r or r in _PROMOTIONS.get(w, frozenset()))
            )
        if w["type"] != r["type"]:
            return False
        if w["type"] in ("record", "enum", "fixed"):
            aliases = {_short(alias) for alias in r.get("aliases", [])}
            return _short(w["name"]) in {_short(r["name"]), *aliases}
        return True


def _normalise(schema: Any) -> Any:
    """Reduce ``{"type": "long", ...}`` (logical types included) to ``"long"``."""
    if isinstance(schema, dict) and schema.get("type") in PRIMITIVE_TYPES:
        return schema["type"]
    return schema


def _describe(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    name = schema.get("name")
    return f"{schema['type']} {_short(name)}" if name else str(schema["type"])
