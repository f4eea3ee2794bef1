"""The README's Python example ("A short tour"), taken from README.md and run against the broker.

It runs the way a reader would run it: saved as a script in a folder holding its ``site.toml``
and ``system.img``, and run with Python. Then a replica site adopts ``web01`` and must end with
exactly the bytes the example wrote.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import SiteFactory
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
README: Final = Path(__file__).resolve().parents[2] / "README.md"
VM: Final = "web01"
DISK_BYTES: Final = 1024 * 1024


def readme_example() -> str:
    """The README's one Python block that opens a Site."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    [example] = [block for block in blocks if "async with Site(load_config(" in block]
    return str(example)


def test_the_readme_python_example_ships_a_cycle_the_replica_applies(
    tmp_path: Path, bootstrap_servers: str, unique: Callable[[str], str]
) -> None:
    sites = SiteFactory(tmp_path / "sites", bootstrap_servers, unique("tg"))
    sites.config_file("site-a", to=tmp_path / "site.toml")
    with (tmp_path / "system.img").open("wb") as image:
        image.truncate(DISK_BYTES)

    (tmp_path / "example.py").write_text(readme_example())
    ran = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr

    async def replicated() -> None:
        async with sites.site("site-a") as site_a:
            shipped = await site_a.catalog.position(VM)
        assert shipped is not None
        async with sites.site("site-b") as site_b:
            assert [record.name for record in await site_b.discover()] == [VM]
            async with await site_b.replica(await site_b.catalog.vm(VM)) as replica:
                applied = await replica.catch_up()
                assert replica.violation is None
                assert applied == shipped.cycle
                assert replica.images["system"].read(0, 4096) == b"hello".ljust(4096, b"\0")
                assert sha256_of(replica.images["system"]) == sha256_of(tmp_path / "system.img")
            assert [p.cycle for p in await site_b.catalog.points(VM)] == [shipped.cycle]

    asyncio.run(replicated())
