"""The agent's NBD TCP listener with TLS required, driven by real clients nobody here wrote.

``vmreplica nbd-certificates`` makes the credentials; site A's agent serves a ``--capture nbd``
VM on TCP with ``nbd_tls_dir`` set. Then:

* ``qemu-img`` and ``nbdinfo`` without TLS are refused (NBD_REP_ERR_TLS_REQD: QEMU prints the
  server's reason), and ``nbdinfo`` with TLS but no client certificate fails its handshake;
* ``qemu-io`` with a ``tls-creds-x509`` object writes and reads back through TLS, and
  ``nbdcopy`` copies a file in and the disk out through ``nbds://`` URIs;
* what went in through TLS is journaled: site B's replica ends identical (``qemu-img compare``);
* the VM's Unix socket stays plain.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.clients import CLIENT_TIMEOUT_SECONDS, cli, require, run, wait_until
from tests.fixtures import SiteFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.producers.changelog import HEADER_BYTES
from vmreplica.runtime.agent import Agent

pytestmark = pytest.mark.e2e
MiB: Final = 1024 * 1024
DISK_BYTES: Final = 16 * MiB


@pytest.fixture
def site_folder(short_dir: Path) -> Path:
    return short_dir


async def refused(*argv: str) -> str:
    """Run a client that must fail; its output."""
    process = await asyncio.create_subprocess_exec(
        require(argv[0]),
        *argv[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT_SECONDS)
    assert process.returncode != 0, output.decode()
    return output.decode()


async def test_tls_required_on_tcp_with_qemu_and_libnbd_clients(
    short_dir: Path, sites: SiteFactory
) -> None:
    certificates = short_dir / "nbd-tls"
    await cli(sites.config_file("site-a"), "nbd-certificates", str(certificates))
    client_dir = short_dir / "client-tls"  # what the hypervisor host gets: no server key
    client_dir.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy2(certificates / name, client_dir / name)
    no_certificate = short_dir / "ca-only"
    no_certificate.mkdir()
    shutil.copy2(certificates / "ca-cert.pem", no_certificate / "ca-cert.pem")

    disk = short_dir / "disk0.img"
    with disk.open("wb") as image:
        image.truncate(DISK_BYTES)
        image.seek(8 * MiB)
        image.write(os.urandom(MiB))
    site_a = await sites.start("site-a", nbd_tcp_port=0, nbd_tls_dir=certificates)
    site_b = await sites.start("site-b")
    vm = "tlsvm"
    await site_a.enable(
        vm, {"disk0": disk}, "site-b", VmSettings(frequency_seconds=0, capture="nbd")
    )
    agent_a, agent_b = Agent(site_a), Agent(site_b)
    tasks = [asyncio.create_task(agent.run()) for agent in (agent_a, agent_b)]
    try:

        async def replicating() -> bool:
            record = await site_a.catalog.vm(vm)
            return vm in agent_a.fronts and record.state is ReplicationState.REPLICATING

        await wait_until(replicating, "the primary to finish its initial replication")
        assert agent_a.exports.tcp is not None
        address = agent_a.exports.tcp.tcp_address
        assert address is not None
        port = address[1]
        plain = f"nbd://127.0.0.1:{port}/{vm}.disk0"
        secure = f"nbds://127.0.0.1:{port}/{vm}.disk0?tls-certificates={client_dir}"

        said = await refused("qemu-img", "info", plain)
        assert "TLS negotiation required" in said
        assert "this server requires TLS: send NBD_OPT_STARTTLS first" in said
        await refused("nbdinfo", plain)
        await refused(
            "nbdinfo", f"nbds://127.0.0.1:{port}/{vm}.disk0?tls-certificates={no_certificate}"
        )

        tls_object = f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}"
        image_opts = f"driver=nbd,host=127.0.0.1,port={port},export={vm}.disk0,tls-creds=tls0"
        output = await run(
            "qemu-io", "--object", tls_object, "--image-opts", image_opts,
            "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M",
        )  # fmt: skip
        assert "Pattern verification failed" not in output
        source = short_dir / "source.raw"
        source.write_bytes(os.urandom(4 * MiB))
        await run("nbdcopy", str(source), secure)
        copied = short_dir / "copied.raw"
        await run("nbdcopy", secure, str(copied))
        assert copied.read_bytes()[: 4 * MiB] == source.read_bytes()
        assert copied.read_bytes() == disk.read_bytes()

        exports = agent_a.fronts[vm].exports
        assert exports is not None
        unix_uri = exports.uri("disk0")  # the Unix socket stays plain
        await run("qemu-io", "-f", "raw", unix_uri, "-c", "write -P 0x33 12M 64k")

        log = agent_a.primaries[vm].capture.log
        target = log.cycle - (0 if log.segment_bytes > HEADER_BYTES else 1)

        async def applied() -> bool:
            shipped = await site_a.catalog.position(vm)
            if shipped is None or await site_b.catalog.find_vm(vm) is None:
                return False
            held = await site_b.catalog.position(vm)
            return held is not None and min(shipped.cycle, held.cycle) >= target

        await wait_until(applied, "the writes made through TLS to be applied at site B")
        replica = (await site_b.catalog.vm(vm)).disks[0].path
        compared = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), replica)
        assert "Images are identical" in compared
    finally:
        for agent in (agent_a, agent_b):
            agent.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
