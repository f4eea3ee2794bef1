"""Replication through a secured broker, with the agents as processes and the CLI as an
operator types it: each site logs in as its own Kafka user (SCRAM over TLS) holding only its
trust group's ACLs, and a site whose secret is wrong or missing refuses to start, in one line.

The session's secured broker serves the module (``broker_security`` = ``secured``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.clients import cli, wait_until
from tests.fixtures import SiteFactory
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@pytest.fixture
def broker_security() -> str:
    return "secured"


def refused(config: Path, *command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command that is expected to refuse to work: its exit code and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {})},
    )
    assert "Traceback" not in done.stderr + done.stdout
    return done.returncode, done.stderr


async def test_a_wrong_or_missing_secret_stops_the_agent_in_one_line(
    sites: SiteFactory, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    code, stderr = refused(sites.config_file("site-a", sasl_password_file=wrong), "agent")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "refused the login of user 'site-a-" in stderr
    assert "not-the-password" not in stderr

    missing = tmp_path / "absent.password"
    code, stderr = refused(sites.config_file("site-a", sasl_password_file=missing), "agent")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert f"cannot read sasl_password_file {missing}" in stderr

    # The password from the environment instead of the file: the wrong one is refused too.
    settings = sites.settings("site-a")
    del settings["sasl_password_file"]
    config = tmp_path / "env.toml"
    config.write_text("".join(f'{key} = "{value}"\n' for key, value in settings.items()))
    code, stderr = refused(config, "agent", env={"VMREPLICA_SASL_PASSWORD": "not-the-password"})
    assert code == 2
    assert "refused the login" in stderr
    assert "not-the-password" not in stderr

    # Any other command that needs Kafka says the same, not "cannot reach Kafka".
    disk = tmp_path / "disk0.img"
    disk.write_bytes(bytes(MiB))
    code, stderr = refused(
        sites.config_file("site-a", sasl_password_file=wrong),
        "enable", "vm1", f"--disk=disk0={disk}", "--replica-site=site-b",
    )  # fmt: skip
    assert code == 2, stderr
    assert "refused the login of user 'site-a-" in stderr, stderr
    assert "cannot reach Kafka" not in stderr


async def test_agents_replicate_through_the_secured_broker(
    sites: SiteFactory, tmp_path: Path
) -> None:
    """enable (CLI), both agents as processes, cycles ship, the replica applies, digests equal;
    no log line of either agent holds its password."""
    config_a = sites.config_file("site-a", heartbeat_seconds=1.0)
    config_b = sites.config_file("site-b", heartbeat_seconds=1.0)
    image = tmp_path / "disk0.img"
    with image.open("wb") as file:
        file.truncate(8 * MiB)
        file.write(os.urandom(MiB))
    vm_name = f"web-{sites.trust_group}"
    await cli(
        config_a,
        "enable",
        vm_name,
        "--disk",
        f"disk0={image}",
        "--replica-site",
        "site-b",
        "--capture",
        "scan",
        "--frequency",
        "30",
    )
    logs = {name: tmp_path / f"agent-{name}.log" for name in ("a", "b")}
    agents = []
    for name, config in (("a", config_a), ("b", config_b)):
        with logs[name].open("wb") as log:
            agents.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "vmreplica.cli",
                    "agent",
                    "--config",
                    str(config),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        expected = sha256_of(image)

        async def replica_disk() -> Path | None:
            async with sites.site("site-b") as site_b:
                record = await site_b.catalog.find_vm(vm_name)
                return None if record is None else Path(record.disks[0].path)

        async def replica_equal() -> bool:
            disk = await replica_disk()
            return disk is not None and disk.is_file() and sha256_of(disk) == expected

        await wait_until(replica_equal, "the replica to equal the primary after the seed", 180)
        # A further write ships in the next cycle (the scan finds it) and is applied.
        with image.open("r+b") as disk:
            disk.seek(5 * MiB)
            disk.write(os.urandom(256 * 1024))
        expected = sha256_of(image)
        await wait_until(replica_equal, "the replica to apply the next cycle", 180)
        status = json.loads(await cli(config_b, "status", vm_name, "--json"))
        assert status[0]["role"] == "replica"
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            await asyncio.wait_for(agent.wait(), 60)
    for name, path in (("a", "site-a"), ("b", "site-b")):
        password = sites.access[path].password_file.read_text().strip()
        assert password not in logs[name].read_text()
