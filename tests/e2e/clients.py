"""Running the programs the end-to-end tests drive: NBD clients nobody here wrote, and the
`vmreplica` command line as an operator types it."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import pytest

CLIENT_TIMEOUT_SECONDS: Final = 180
PACKAGES: Final = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "fio": "fio",
}


def require(binary: str) -> str:
    """The client's path, or a skip naming the Debian package that provides it."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install -y {PACKAGES[binary]})")
    return path


async def run(*argv: str) -> str:
    """Run a client to completion; return its stdout, failing the test on a non-zero exit."""
    process = await asyncio.create_subprocess_exec(
        require(argv[0]), *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT_SECONDS)
    assert process.returncode == 0, (
        f"{' '.join(argv)} exited {process.returncode}:\n{stdout.decode()}\n{stderr.decode()}"
    )
    return stdout.decode()


async def cli(config: Path, *args: str) -> str:
    """`vmreplica ARGS --config CONFIG`; its stdout, failing the test on a non-zero exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmreplica.cli",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, seconds: float = 120.0
) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
