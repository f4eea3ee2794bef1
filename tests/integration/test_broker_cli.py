"""`vmreplica broker` as a user runs it: up, seen by an independent client, status, down.

These start their own brokers (separate from the session broker) on their own ports, under a
private ``VMREPLICA_HOME``, and prove that ``down`` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmreplica.devtools.cluster import NODE_MARKER
from vmreplica.devtools.ports import free_base_port
from vmreplica.journal.kafka import JournalPublisher, KafkaConnection, TopicAdmin
from vmreplica.journal.topics import journal_spec

pytestmark = pytest.mark.integration


def vmreplica(home: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMREPLICA_HOME": str(home)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def our_jvms(home: Path) -> list[int]:
    """Pids of broker JVMs started under ``home``, from /proc (no truncated ``ps`` columns)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if NODE_MARKER.encode() in cmdline and str(home).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_broker_up_is_listed_by_kcat_and_down_leaves_nothing(tmp_path: Path) -> None:
    port = free_base_port()
    bootstrap = f"127.0.0.1:{port}"
    up = vmreplica(tmp_path, "broker", "up", "--port", str(port))
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == bootstrap
    try:
        status = json.loads(vmreplica(tmp_path, "broker", "status", "--json").stdout)
        assert status["running"] is True
        assert status["bootstrap_servers"] == bootstrap
        listing = subprocess.run(
            ["kcat", "-L", "-b", bootstrap], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "1 brokers:" in listing
        assert f"broker 1 at {bootstrap}" in listing
        assert len(our_jvms(tmp_path)) == 1
    finally:
        down = vmreplica(tmp_path, "broker", "down")
    assert down.returncode == 0
    assert down.stdout.strip() == "stopped 1 Kafka node(s)"
    assert our_jvms(tmp_path) == []
    status = json.loads(vmreplica(tmp_path, "broker", "status", "--json").stdout)
    assert status == {"running": False, "bootstrap_servers": None, "nodes": []}
    assert vmreplica(tmp_path, "broker", "down").stdout.strip() == "no local Kafka was running"


def test_broker_up_without_java_names_what_is_missing(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    result = vmreplica(tmp_path, "broker", "up", "--port", str(free_base_port()), path=str(bare))
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "java is not on PATH" in message
    assert "VMREPLICA_BOOTSTRAP_SERVERS" in message
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java to start three brokers")
async def test_three_broker_cluster_serves_replication_factor_three(tmp_path: Path) -> None:
    port = free_base_port(3)
    up = vmreplica(tmp_path, "broker", "up", "--brokers", "3", "--port", str(port))
    assert up.returncode == 0, up.stderr
    try:
        bootstrap = up.stdout.strip()
        assert bootstrap.split(",") == [f"127.0.0.1:{port + 10 * i}" for i in range(3)]
        connection = KafkaConnection(bootstrap)
        spec = journal_spec("vmreplica.rf3.vm.journal", replication_factor=3)
        async with TopicAdmin(connection) as admin:
            assert await admin.ensure_topic(spec)
            configs = await admin.topic_configs(spec.name)
        assert configs["min.insync.replicas"] == "2"
        async with JournalPublisher(connection, "rf3-vm") as publisher:
            offsets = await publisher.publish(spec.name, b"vm", [b"a", b"b"])
        assert offsets == [0, 1]
        assert len(our_jvms(tmp_path)) == 3
    finally:
        vmreplica(tmp_path, "broker", "down")
    assert our_jvms(tmp_path) == []
