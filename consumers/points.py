"""Recovery points on the replica: listing them and exporting one as disk images.

Content at a point is the head image plus the undo records of the cycles after it, so an export
costs the allocated data of the head plus the changes since the point, never a walk over the
whole logical disk. Other formats than raw go through ``qemu-img convert``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final, Literal

from vmreplica.consumers.overlay import materialize_point
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.model import Consistency, RecoveryPoint
from vmreplica.domain.names import check_name
from vmreplica.errors import ConfigurationError, PrerequisiteMissingError
from vmreplica.storage.image import DiskImage
from vmreplica.storage.safefile import exclusive_lock

ExportFormat = Literal["raw", "qcow2", "vhdx", "vpc"]
FORMATS: Final = ("raw", "qcow2", "vhdx", "vpc")
APPLY_LOCK_NAME: Final = ".apply.lock"
"""In the VM's folder: the file whose lock the materialiser and point exports share."""


def apply_lock(folder: Path) -> AbstractContextManager[None]:
    """Held while a cycle is applied or a point exported, so an export sees one instant."""
    return exclusive_lock(folder / APPLY_LOCK_NAME)


def choose_point(points: list[RecoveryPoint], wanted: str) -> RecoveryPoint:
    """``latest``, ``latest-app-consistent`` or a cycle number.

    :raises ConfigurationError: no such point; the message lists the ones that exist.
    """
    if not points:
        raise ConfigurationError("this VM has no recovery point yet; wait for a cycle to apply")
    if wanted == "latest":
        return points[-1]
    if wanted == "latest-app-consistent":
        consistent = [p for p in points if p.consistency is Consistency.APPLICATION]
        if not consistent:
            raise ConfigurationError("this VM has no application-consistent recovery point")
        return consistent[-1]
    for point in points:
        if str(point.cycle) == wanted:
            return point
    raise ConfigurationError(
        f"no recovery point {wanted!r}; the points are cycles "
        f"{', '.join(str(p.cycle) for p in points)} (or 'latest', 'latest-app-consistent')"
    )


def export_point(
    images: Mapping[str, Path],
    undo_folder: Path,
    point: RecoveryPoint,
    head_cycle: int,
    destination: Path,
    fmt: ExportFormat = "raw",
) -> list[Path]:
    """Write each disk as it was at ``point`` to ``destination/<disk>.<fmt>``; return the files.

    :raises ConfigurationError: an unknown format, or a disk name that is not a plain name (the
        names came from the primary's VmConfig: ``../x`` must not write outside ``destination``);
        nothing is written then.
    """
    for disk in images:
        check_name("disk", disk)
    if fmt not in FORMATS:
        raise ConfigurationError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "raw" and shutil.which("qemu-img") is None:
        raise PrerequisiteMissingError(
            f"exporting as {fmt} needs qemu-img (Debian: apt-get install qemu-utils); "
            "or export as raw"
        )
    destination.mkdir(parents=True, exist_ok=True)
    opened = {disk: DiskImage.open(path, writable=False) for disk, path in images.items()}
    try:
        raw = {disk: destination / f"{disk}.raw" for disk in images}
        with UndoLog(undo_folder).overlay_at(point.cycle, head_cycle) as overlay:
            materialize_point(opened, overlay, raw)
    finally:
        for image in opened.values():
            image.close()
    if fmt == "raw":
        return list(raw.values())
    outputs = []
    for disk, path in raw.items():
        target = destination / f"{disk}.{fmt}"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", fmt, str(path), str(target)],
            check=True,
            capture_output=True,
        )
        path.unlink()
        outputs.append(target)
    return outputs
