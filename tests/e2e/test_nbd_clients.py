"""The NBD server against real clients: nbdinfo, qemu-io, nbdcopy, qemu-img and fio.

The server runs in this test's event loop; every client is a subprocess started with
``asyncio.create_subprocess_exec`` so the loop keeps serving while the client runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.clients import CLIENT_TIMEOUT_SECONDS, require, run
from vmreplica.nbd.server import FileBlockDevice, NbdServer

pytestmark = pytest.mark.e2e

EXPORT_BYTES = {"disk0": 64 << 20, "disk1": 8 << 20, "golden": 1 << 20}


@dataclass
class Served:
    server: NbdServer
    images: dict[str, Path]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    images = {}
    devices = {}
    for name, size in EXPORT_BYTES.items():
        images[name] = tmp_path / f"{name}.raw"
        images[name].write_bytes(b"")
        os.truncate(images[name], size)
        devices[name] = FileBlockDevice(images[name])
    # A short directory: Unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="nbd-e2e-") as socket_dir:
        server = NbdServer(
            devices, unix_path=os.path.join(socket_dir, "nbd.sock"), read_only={"golden": True}
        )
        async with server:
            yield Served(server, images)
    for device in devices.values():
        device.close()


async def test_nbdinfo_lists_every_export_with_its_size(served: Served) -> None:
    listing = json.loads(await run("nbdinfo", "--json", "--list", served.server.uri("")))
    sizes = {export["export-name"]: export["export-size"] for export in listing["exports"]}
    assert sizes == EXPORT_BYTES


async def test_nbdinfo_shows_flags_and_block_sizes(served: Served) -> None:
    info = json.loads(await run("nbdinfo", "--json", served.server.uri("disk0")))
    [export] = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == EXPORT_BYTES["disk0"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, served.server.max_request_bytes)
    golden = json.loads(await run("nbdinfo", "--json", served.server.uri("golden")))
    assert golden["exports"][0]["is_read_only"] is True
    assert golden["exports"][0]["can_trim"] is False


async def test_qemu_io_writes_and_reads_a_pattern(served: Served) -> None:
    uri = served.server.uri("disk0")
    output = await run(
        "qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"
    )
    assert "Pattern verification failed" not in output
    assert "wrote 1048576/1048576 bytes at offset 0" in output
    assert "read 1048576/1048576 bytes at offset 0" in output
    with served.images["disk0"].open("rb") as image:
        assert image.read(1 << 20) == b"\xab" * (1 << 20)
        assert image.read(4096) == bytes(4096)


async def test_qemu_io_write_to_read_only_export_fails(served: Served) -> None:
    process = await asyncio.create_subprocess_exec(
        require("qemu-io"),
        "-f",
        "raw",
        served.server.uri("golden"),
        "-c",
        "write -P 0x11 0 4k",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT_SECONDS)
    # qemu-io opens read-write by default, and the export's READ_ONLY flag makes that fail.
    assert process.returncode == 1
    assert b"Permission denied" in output
    assert served.images["golden"].read_bytes() == bytes(EXPORT_BYTES["golden"])


async def test_nbdcopy_into_an_export_then_qemu_img_compare(served: Served, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(EXPORT_BYTES["disk1"]))
    uri = served.server.uri("disk1")
    await run("nbdcopy", str(source), uri)
    output = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(source))
    assert "Images are identical" in output
    digest = hashlib.sha256(served.images["disk1"].read_bytes()).hexdigest()
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()


async def test_fio_random_writes_verify_with_crc32c(served: Served) -> None:
    output = await run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.server.uri('disk0')}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no state file left in the working directory
        "--output-format=json",
    )
    report = json.loads(output[output.index("{") :])
    [job] = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 << 20
    assert job["read"]["io_bytes"] == 32 << 20  # the verification pass read everything back


async def test_nbdinfo_over_tcp(tmp_path: Path) -> None:
    image = tmp_path / "tcp.raw"
    image.write_bytes(bytes(1 << 20))
    with FileBlockDevice(image) as device:
        async with NbdServer({"disk0": device}, tcp=("127.0.0.1", 0)) as server:
            uri = server.uri("disk0")
            assert uri.startswith("nbd://127.0.0.1:")
            info = json.loads(await run("nbdinfo", "--json", uri))
            assert info["exports"][0]["export-size"] == 1 << 20
            output = await run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 4096 64k")
            assert "wrote 65536/65536 bytes at offset 4096" in output
    assert image.read_bytes()[4096 : 4096 + 65536] == b"\x5a" * 65536
