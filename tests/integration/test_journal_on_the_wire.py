"""What a cycle looks like on the topic, read by a plain Avro reader that knows only the .avsc.

No vmreplica code decodes here: the bytes come from Kafka, the header is checked against
fastavro's own CRC-64-AVRO fingerprint of the schema file, and fastavro reads the body.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import fastavro
import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.journal.kafka import JournalReader, KafkaConnection

pytestmark = pytest.mark.integration
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def plain_readers() -> dict[bytes, tuple[str, Any]]:
    """fingerprint -> (record name, parsed schema), straight from the .avsc files."""
    readers = {}
    for path in SCHEMAS.glob("*.avsc"):
        schema = json.loads(path.read_text())
        canonical = fastavro.schema.to_parsing_canonical_form(schema)
        # fastavro prints the fingerprint's bytes in wire (little-endian) order.
        fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
        readers[fingerprint] = (schema["name"], fastavro.parse_schema(schema))
    return readers


async def test_a_shipped_cycle_decodes_with_plain_fastavro(
    sites: SiteFactory, vm: VmFactory, kafka: KafkaConnection
) -> None:
    async with sites.site("site-a") as site:
        record = (await vm(site, {"disk0": 4 * 1024 * 1024}, VmSettings())).record
        async with site.primary(record) as primary:
            await primary.initial_replication()
            await primary.capture.write("disk0", 8192, b"\x5a" * 4096)
            await primary.replicate()
        topic = site.journal_topic(record.name)

    readers = plain_readers()
    names = []
    async with JournalReader(kafka, topic) as reader:
        for _ in range(10):
            for message in await reader.fetch(0.5):
                assert message.value[:2] == b"\xc3\x01"
                name, schema = readers[message.value[2:10]]
                body = cast(
                    dict[str, Any],
                    fastavro.schemaless_reader(io.BytesIO(message.value[10:]), schema),
                )
                names.append(name)
                if name == "WriteBatch":
                    assert body["vm"] == record.name
                    assert body["extents"][0]["offset"] == 8192
                    assert body["extents"][0]["length"] == 4096
    assert names[:2] == ["EpochStart", "VmConfig"]
    assert names[-2:] == ["WriteBatch", "CycleCommit"]
