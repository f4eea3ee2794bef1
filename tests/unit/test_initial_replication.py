"""Seeding without a broker: when a replica asks to be seeded by block compare, the external-media
folder (round trip, a corrupt chunk, a manifest that does not fit), and the commands' mistakes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.consumers.materializer import ReplicaCursor
from vmreplica.consumers.seeding import seed_by_compare_reason
from vmreplica.domain.model import DiskRecord, InitialMode, VmRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, CorruptEventError
from vmreplica.runtime.initial import awaits_import, check_fits
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.payload import PayloadPacker, PayloadUnpacker
from vmreplica.storage.seed_media import (
    SeedManifest,
    load_manifest,
    read_chunk,
    save_manifest,
    write_chunk,
)

MiB = 1024 * 1024


def record(
    initial: InitialMode = "network",
    state: ReplicationState = ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
    disks: tuple[tuple[str, int], ...] = (("disk0", 4 * MiB),),
) -> VmRecord:
    return VmRecord(
        "web",
        "replica",
        "tg",
        "site-a",
        VmSettings(initial=initial),
        1,
        state,
        "",
        0,
        tuple(DiskRecord(name, f"/r/{name}.img", size) for name, size in disks),
    )


def cursor(next_offset: int = 0, *, seeding: bool = True, awaiting: bool = False) -> ReplicaCursor:
    return ReplicaCursor(1, 0, GENESIS_HASH, next_offset, seeding, awaiting_resync=awaiting)


def test_a_replica_is_seeded_by_compare_only_when_the_journal_cannot_take_it_there() -> None:
    assert seed_by_compare_reason(record(), cursor(), 0) is None  # the seed is in the journal
    lost = seed_by_compare_reason(record(), cursor(), 65)
    assert lost is not None
    assert "no longer holds its seed (it starts at offset 65" in lost
    existing = seed_by_compare_reason(record("existing"), cursor(), 0)
    assert existing is not None
    assert "copy this site holds" in existing
    behind = seed_by_compare_reason(record(), cursor(10, seeding=False), 400)
    assert behind is not None
    assert "stands at journal offset 10, the journal now starts at offset 400" in behind
    assert seed_by_compare_reason(record(), cursor(400, seeding=False), 400) is None
    # Asked already (a restart while waiting): the reminder says it again, not this.
    assert seed_by_compare_reason(record("existing"), cursor(awaiting=True), 65) is None


def test_a_replica_waits_for_an_import_only_when_seeded_on_media_and_not_yet_imported() -> None:
    assert awaits_import(record("export"))
    assert awaits_import(record("export", ReplicationState.INITIAL_REPLICATION_IN_PROGRESS))
    assert not awaits_import(record("export", ReplicationState.REPLICATING))
    assert not awaits_import(record("network"))


def manifest(**changes: object) -> SeedManifest:
    fields: dict[str, object] = {
        "vm": "web",
        "primary_site": "site-a",
        "epoch": 1,
        "cycle": 4,
        "cycle_hash": GENESIS_HASH.hex(),
        "next_offset": 12,
        "disks": {"disk0": 4 * MiB},
        "compression": True,
        "started_ms": 1,
    }
    return SeedManifest(**{**fields, **changes})  # type: ignore[arg-type]


def test_chunks_round_trip_compressed_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    text = b"the quick brown fox " * 50_000
    chunk, size = write_chunk(tmp_path, "disk0", 4 * MiB, text, PayloadPacker())
    assert chunk.compressed
    assert size < len(text) / 10
    assert read_chunk(tmp_path, chunk, PayloadUnpacker()) == text
    noise = os.urandom(64 * 1024)
    raw, size = write_chunk(tmp_path, "disk0", 0, noise, PayloadPacker(compress=False))
    assert (raw.compressed, size) == (False, len(noise))
    (tmp_path / raw.file).write_bytes(noise[:-1] + b"\0")
    with pytest.raises(CorruptEventError, match="does not hold what the export wrote"):
        read_chunk(tmp_path, raw, PayloadUnpacker())
    saved = manifest(chunks=[chunk, raw])
    save_manifest(tmp_path, saved)
    assert load_manifest(tmp_path) == saved
    assert saved.reached("disk0") == 4 * MiB + len(text)


def test_a_manifest_of_another_vm_primary_or_disk_size_does_not_fit(tmp_path: Path) -> None:
    check_fits(manifest(), record("export"), tmp_path)
    with pytest.raises(ConfigurationError, match="holds the seed of VM 'db', not of 'web'"):
        check_fits(manifest(vm="db"), record("export"), tmp_path)
    with pytest.raises(ConfigurationError, match="exported at site 'site-x'"):
        check_fits(manifest(primary_site="site-x"), record("export"), tmp_path)
    with pytest.raises(
        ConfigurationError, match="disk0: 4194304 in the folder, 8388608 here; disk1: missing"
    ):
        check_fits(
            manifest(),
            record("export", disks=(("disk0", 8 * MiB), ("disk1", MiB))),
            tmp_path,
        )
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 7}))
    with pytest.raises(ConfigurationError, match="is not a seed manifest vmreplica can read"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["initial", "import", "web", "{empty}"], "holds no manifest.json: give the folder"),
        (
            ["enable", "vm", "--disk", "d0={disk}", "--replica-site", "b", "--initial-at", "soon"],
            "--initial-at 'soon': expected HH:MM",
        ),
        (
            ["enable", "vm", "--disk", "d0={disk}", "--replica-site", "b", "--initial", "tape"],
            "Invalid value for '--initial'",
        ),
    ],
)
def test_mistakes_exit_2_with_one_message(tmp_path: Path, args: list[str], message: str) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        f'site = "site-a"\nroot = "{tmp_path / "root"}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "disk0.img").write_bytes(bytes(4096))
    filled = [a.format(empty=tmp_path / "empty", disk=tmp_path / "disk0.img") for a in args]
    result = CliRunner().invoke(main, [*filled, "--config", str(config)])
    assert "Traceback" not in result.output
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
