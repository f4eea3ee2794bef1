"""The ``.avsc`` files themselves: complete, documented, consistent with each other and the code."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmreplica.errors import ConfigurationError
from vmreplica.schemas import codec, events
from vmreplica.schemas.avro import parse
from vmreplica.schemas.registry import SchemaRegistry, load_package_schemas

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc"))
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def _named_types(schema: Any) -> Iterator[dict[str, Any]]:
    """Every record and enum defined inside ``schema``, the schema itself included."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _named_types(branch)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            yield schema
        for field in schema.get("fields", []):
            yield from _named_types(field["type"])
        yield from _named_types(schema.get("items"))


def test_there_is_one_schema_per_event_kind_in_its_topics_namespace() -> None:
    expected = {f"{events.JOURNAL_NAMESPACE}.{cls.__name__}" for cls in events.JOURNAL_EVENT_TYPES}
    expected |= {f"{events.STATUS_NAMESPACE}.{cls.__name__}" for cls in events.STATUS_EVENT_TYPES}

    assert set(codec.schema_names()) == expected
    assert {path.stem for path in SCHEMA_FILES} == {name.rsplit(".", 1)[1] for name in expected}


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda path: path.stem)
def test_every_record_starts_with_vm_and_epoch(path: Path) -> None:
    fields = _load(path)["fields"]

    assert [(f["name"], f["type"]) for f in fields[:2]] == [("vm", "string"), ("epoch", "long")]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda path: path.stem)
def test_every_type_and_field_is_documented_and_snake_case(path: Path) -> None:
    for named in _named_types(_load(path)):
        assert named.get("doc"), f"{path.name}: {named['name']} has no doc"
        for field in named.get("fields", []):
            assert field.get("doc"), f"{path.name}: {named['name']}.{field['name']} has no doc"
            assert SNAKE_CASE.match(field["name"]), f"{path.name}: {field['name']}"


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda path: path.stem)
def test_every_nullable_field_defaults_to_null(path: Path) -> None:
    for named in _named_types(_load(path)):
        for field in named.get("fields", []):
            if isinstance(field["type"], list) and "null" in field["type"]:
                assert field["type"][0] == "null", f"{path.name}: {field['name']}"
                assert "default" in field, f"{path.name}: {field['name']}"
                assert field["default"] is None, f"{path.name}: {field['name']}"


def test_a_named_type_defined_in_several_files_is_defined_identically() -> None:
    definitions: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in SCHEMA_FILES:
        parsed = parse(_load(path))
        for name, definition in parsed.named.items():
            first = definitions.setdefault(name, (path.name, definition))
            assert first[1] == definition, f"{name} differs between {first[0]} and {path.name}"
    shared = {"Compression", "Encryption", "DiskSize"}

    assert shared <= {name.rsplit(".", 1)[1] for name in definitions}


def test_a_dataclass_that_does_not_mirror_its_schema_is_refused() -> None:
    current, _ = load_package_schemas()
    heartbeat = next(schema for schema in current if schema["name"] == "Heartbeat")
    renamed = {**heartbeat, "fields": [*heartbeat["fields"][:-1], {"name": "last", "type": "long"}]}

    with pytest.raises(TypeError) as error:
        SchemaRegistry([renamed])

    assert str(error.value) == (
        "Heartbeat must be a dataclass with exactly the fields of io.vmreplica.journal.Heartbeat, "
        "in order: vm, epoch, site, at_ms, last_cycle, idle_at_ms, last"
    )


def test_an_enum_that_does_not_mirror_its_symbols_is_refused() -> None:
    current, _ = load_package_schemas()
    commit = next(schema for schema in current if schema["name"] == "CycleCommit")
    text = json.dumps(commit).replace('["CRASH", "APPLICATION"]', '["CRASH", "APPLICATION", "X"]')

    with pytest.raises(TypeError) as error:
        SchemaRegistry([json.loads(text)])

    assert str(error.value) == (
        "Consistency must be an Enum with values ['CRASH', 'APPLICATION', 'X']"
    )


def test_two_current_schemas_with_one_name_are_refused() -> None:
    current, _ = load_package_schemas()

    with pytest.raises(ValueError, match=r"^two current schemas are named Heartbeat$"):
        SchemaRegistry([*current, next(s for s in current if s["name"] == "Heartbeat")])


def test_schemas_are_found_by_full_or_short_name_and_copied_out() -> None:
    loaded = codec.load_schema("io.vmreplica.journal.WriteBatch")
    loaded["fields"].clear()

    assert codec.load_schema("WriteBatch") == json.loads(
        (SCHEMA_DIR / "WriteBatch.avsc").read_text(encoding="utf-8")
    )
    assert codec.fingerprint("WriteBatch") == codec.fingerprint("io.vmreplica.journal.WriteBatch")


def test_unknown_schema_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"^no schema named 'Snapshot'; known schemas: "):
        codec.fingerprint("Snapshot")
