"""Running the programs the end-to-end tests drive: NBD clients nobody here wrote, and the
`vmreplica` command line as an operator types it."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

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


async def enable_nbd(
    config: Path,
    vm: str,
    disks: Mapping[str, Path],
    frequency: str,
    *options: str,
    replica_sites: Sequence[str] = ("site-b",),
) -> dict[str, Any]:
    """``vmreplica enable VM --capture nbd`` with ``disks`` (name -> image), ``--frequency``
    and any other ``options``: what its ``--json`` printed (the NBD URIs among it)."""
    argv = [f"--disk={name}={path}" for name, path in disks.items()]
    argv += [f"--replica-site={site}" for site in replica_sites]
    enabled = json.loads(
        await cli(
            config, "enable", vm, *argv, "--capture=nbd", f"--frequency={frequency}", *options,
            "--json",
        )
    )  # fmt: skip
    assert isinstance(enabled, dict), enabled
    return enabled


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, seconds: float = 120.0
) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def identical(primary: Path, replica: Path) -> None:
    output = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(primary), str(replica))
    assert "Images are identical" in output


def make_disk(path: Path, size: int, data: bytes = b"", at: int = 0) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
        if data:
            file.seek(at)
            file.write(data)
    return path


class AgentProcess:
    """``vmreplica agent --config CONFIG`` as a process, its output in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmreplica.cli", "agent", "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, self.tail()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.output()[-4000:]

    def assert_no_traceback(self) -> None:
        text = self.output()
        at = text.find("Traceback")
        assert at < 0, f"{self.log} holds a traceback:\n{text[max(0, at - 1500) : at + 4000]}"

    async def stop(self, *, check: bool = False) -> int | None:
        """SIGTERM, then the exit code (None if it had to be killed after 90 s); ``check``: it
        must be 0. Not checked when a failed test tears down: an agent still importing its
        modules dies of the signal, hiding the failure."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(process.wait, 90)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            code = None
        assert code == 0 or not check, self.tail()
        return code
