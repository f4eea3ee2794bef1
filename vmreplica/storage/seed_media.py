"""A seed on external media: the folder ``vmreplica initial export`` writes at the primary and
``vmreplica initial import`` reads at the replica (Hyper-V's initial replication "using external
media").

The folder::

    manifest.json          what the seed is (:class:`SeedManifest`); written last, atomically:
                           a folder without it holds an export that has not finished
    export.json            the same, while the export runs: it resumes from it after a kill
    <disk>/<offset>.chunk  one chunk of a disk per file (the offset as 16 hex digits), zstd
                           compressed when the VM's compression is on and it gains; each file
                           written atomically, its SHA-256 (of the data) in the manifest

Only the allocated, non-zero parts of each disk are written, in chunks of the network seed's
size; the rest reads as zeros. The manifest names the position the seed stands for — the
primary's last shipped cycle before the disks were read — so the replica applies the journal's
cycles from the next one on, which makes the copy exact (every block read is at least as new as
that cycle; every block written since is overwritten by the cycles that wrote it). The chunks
are not encrypted: keep the media as safe as the disks themselves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from vmreplica.errors import ConfigurationError, CorruptEventError
from vmreplica.schemas.events import Compression
from vmreplica.schemas.payload import PayloadPacker, PayloadUnpacker
from vmreplica.storage.safefile import replace_atomically

MANIFEST_FILE: Final = "manifest.json"
EXPORT_PROGRESS_FILE: Final = "export.json"
MEDIA_FORMAT: Final = 1
"""Version of the folder's layout; an import refuses another."""


@dataclass(frozen=True)
class MediaChunk:
    """One chunk file: ``length`` bytes of ``disk`` at ``offset``."""

    disk: str
    offset: int
    length: int
    compressed: bool
    sha256: str
    """SHA-256 of the chunk's data (uncompressed), hex."""

    @property
    def file(self) -> str:
        return f"{self.disk}/{self.offset:016x}.chunk"


@dataclass(frozen=True)
class SeedManifest:
    """What a seed folder holds and which point of the VM's journal it stands for."""

    vm: str
    primary_site: str
    epoch: int
    cycle: int
    """The primary's last shipped cycle before the disks were read: the replica applies the
    journal from ``cycle + 1`` on."""
    cycle_hash: str
    """That cycle's hash (hex): the replica's chain continues from it."""
    next_offset: int
    """Journal offset after that cycle's commit: where the replica starts reading."""
    disks: dict[str, int]
    """Disk name → size in bytes."""
    compression: bool
    started_ms: int
    finished_ms: int | None = None
    chunks: list[MediaChunk] = field(default_factory=list)
    format: int = MEDIA_FORMAT

    @property
    def data_bytes(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def reached(self, disk: str) -> int:
        """Where the export of ``disk`` resumes: the end of its last chunk written."""
        ends = [c.offset + c.length for c in self.chunks if c.disk == disk]
        return max(ends, default=0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> SeedManifest:
        """:raises ConfigurationError: not a manifest this release wrote."""
        try:
            fields: dict[str, Any] = json.loads(text)
            if fields.get("format") != MEDIA_FORMAT:
                raise ValueError(
                    f"format {fields.get('format')!r}, this release reads {MEDIA_FORMAT}"
                )
            fields["chunks"] = [MediaChunk(**chunk) for chunk in fields.get("chunks", [])]
            fields["disks"] = {str(k): int(v) for k, v in fields["disks"].items()}
            return cls(**fields)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ConfigurationError(
                f"{where} is not a seed manifest vmreplica can read ({error}). Give the folder "
                "that `vmreplica initial export` wrote"
            ) from error


def save_manifest(folder: Path, manifest: SeedManifest, name: str = MANIFEST_FILE) -> None:
    """Replace ``folder/name`` atomically (temp file, fsync, rename, fsync the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = manifest.to_json()

    def write(path: Path) -> None:
        path.write_text(text)

    replace_atomically(folder / name, write)


def load_manifest(folder: Path, name: str = MANIFEST_FILE) -> SeedManifest | None:
    """The manifest ``folder/name``, or None when there is none.

    :raises ConfigurationError: it is unreadable.
    """
    path = folder / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror}") from error
    return SeedManifest.from_json(text, path)


def write_chunk(
    folder: Path, disk: str, offset: int, data: bytes, packer: PayloadPacker
) -> tuple[MediaChunk, int]:
    """Write one chunk file atomically; return it and its size on the media."""
    compression, packed = packer.pack(data)
    chunk = MediaChunk(
        disk, offset, len(data), compression is Compression.ZSTD, hashlib.sha256(data).hexdigest()
    )
    (folder / disk).mkdir(parents=True, exist_ok=True)

    def write(path: Path) -> None:
        path.write_bytes(packed)

    replace_atomically(folder / chunk.file, write)
    return chunk, len(packed)


def read_chunk(folder: Path, chunk: MediaChunk, unpacker: PayloadUnpacker) -> bytes:
    """The data of one chunk, checked against its SHA-256.

    :raises CorruptEventError: missing, truncated, or not what the export wrote.
    """
    path = folder / chunk.file
    try:
        packed = path.read_bytes()
    except OSError as error:
        raise CorruptEventError(f"seed chunk {path}: {error.strerror}") from error
    data = unpacker.unpack(
        Compression.ZSTD if chunk.compressed else Compression.NONE, packed, chunk.length
    )
    if len(data) != chunk.length or hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise CorruptEventError(
            f"seed chunk {path} does not hold what the export wrote (its SHA-256 differs): "
            "copy the folder from the primary's export again"
        )
    return data


def finished(manifest: SeedManifest, at_ms: int) -> SeedManifest:
    return replace(manifest, finished_ms=at_ms)
