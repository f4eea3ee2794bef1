"""A replica site whose storage fills up pauses, loses nothing, and resumes once space is freed.

The replica site's root is a 64 MiB tmpfs the test mounts (it needs root); both agents run as
processes, and the VM is written through the primary's NBD export with real clients (nbdcopy,
qemu-io). Twice, a filler file leaves the tmpfs almost full and the VM writes more than fits:

1. over data the replica holds (random, so the undo log of the cycle, written first, does not
   fit: ENOSPC while saving the old content);
2. into holes (the undo log is a few zero records, the image write does not fit: ENOSPC while
   writing the image, after the undo log was sealed).

Each time the replica's health turns critical with the reason (no space left, free space and it
resumes), its image stays exactly at the last cycle it had applied (no half-applied cycle), the
test removes the filler, and the replica resumes by itself and ends equal to the primary. At the
end the journal's cycles and those the replica applied are consecutive, and neither agent
logged a traceback.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.e2e.agent_pair import MiB, Pair, replicating_pair, wait_for_health
from tests.e2e.clients import require, run, wait_until
from vmreplica.domain import names

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TMPFS_BYTES: Final = 64 * MiB
LEFT_FREE_BYTES: Final = 512 * 1024
"""What the filler leaves free: less than any of the test's cycles needs."""
DISK_BYTES: Final = 96 * MiB
"""Larger than the replica's file system: only its sparseness lets it fit at all."""


@pytest.fixture
def replica_root(short_dir: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for the replica site's root, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the replica's storage needs root")
    root = short_dir / "b"
    root.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(root)], check=True
    )
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _fill(root: Path) -> Path:
    """A filler file that leaves :data:`LEFT_FREE_BYTES` free on ``root``'s file system."""
    stat = os.statvfs(root)
    free = stat.f_bavail * stat.f_frsize
    filler = root / "filler"
    with filler.open("wb") as file:
        os.posix_fallocate(file.fileno(), 0, free - LEFT_FREE_BYTES)
    return filler


async def _fill_write_and_free(pair: Pair, root: Path, *qemu_io: str) -> str:
    """Fill the replica's file system, write ``qemu_io`` commands through the export, check
    the replica pauses critical at its last cycle, free the space, wait for it to resume.
    Returns the reason the status gave."""
    settled = await pair.settled()
    before = _sha256(await pair.replica_disk())
    assert before == _sha256(pair.disk)
    filler = _fill(root)
    commands = [arg for command in qemu_io for arg in ("-c", command)]
    await run("qemu-io", "-f", "raw", pair.uri, *commands)
    row = await wait_for_health(pair.config_b, pair.vm, ("critical",), "no space left", 60)
    assert row["state"] == "error"
    [reason] = row["health_reasons"]
    assert isinstance(reason, str)
    assert "free space there" in reason
    assert "resumes by itself" in reason
    # Nothing of the cycle that did not fit is applied: the image is the last cycle's.
    assert await pair.applied() == settled
    assert _sha256(await pair.replica_disk()) == before
    filler.unlink()

    async def resumed() -> bool:
        return await pair.applied() > settled

    await wait_until(resumed, "the replica to resume once space was freed", 90)
    await pair.settled()
    await pair.assert_identical()
    return reason


async def test_replica_disk_fills_up_pauses_critical_and_resumes(
    short_dir: Path, replica_root: Path, bootstrap_servers: str
) -> None:
    require("qemu-io")
    require("qemu-img")
    require("nbdcopy")
    trust_group = f"tg-{uuid.uuid4().hex[:8]}"
    common: dict[str, Any] = {
        "trust_group": trust_group,
        "bootstrap_servers": bootstrap_servers,
        "heartbeat_seconds": 1.0,
    }
    async with replicating_pair(
        short_dir,
        DISK_BYTES,
        {"site": "site-a", "root": short_dir / "a", **common},
        {"site": "site-b", "root": replica_root, **common},
        f"vm-{uuid.uuid4().hex[:6]}",
    ) as pair:
        random_data = short_dir / "random.raw"
        random_data.write_bytes(os.urandom(8 * MiB))
        await run("nbdcopy", str(random_data), pair.uri)

        # 1. Overwrite what the replica holds: its undo log does not fit.
        reason = await _fill_write_and_free(pair, replica_root, "write -P 0x22 0 8M")
        print(f"\nreplica paused: {reason}")
        # 2. Write into holes: the undo log fits, the image does not.
        await _fill_write_and_free(pair, replica_root, "write -P 0x33 32M 8M")

        await pair.assert_cycles_exact(bootstrap_servers, names.journal_topic(pair.vm, trust_group))
        pair.agent_a.assert_no_traceback()
        pair.agent_b.assert_no_traceback()
        assert "no space left" in pair.agent_b.output()
