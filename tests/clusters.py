"""Kafka clusters a test process starts for itself: on free ports, under a private home, stopped
and removed at the end — or, should the test process die first, by the next one's orphan check.

The session's broker (``tests/conftest.py``) is one; tests that kill, stop or restart brokers,
or need three of them, start their own, so the session's broker stays whole for every other test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vmreplica.devtools.cluster import ClusterState, LocalCluster
from vmreplica.devtools.ports import free_base_port


def stop_orphaned_test_brokers() -> None:
    """Stop brokers of test sessions that were killed before their teardown ran."""
    for home in Path(tempfile.gettempdir()).glob("vmreplica-test-kafka-*"):
        owner = home / "owner.pid"
        try:
            alive = Path(f"/proc/{int(owner.read_text())}").exists()
        except (OSError, ValueError):
            alive = False
        if not alive:
            LocalCluster(home=home).down()
            shutil.rmtree(home, ignore_errors=True)


@contextmanager
def own_cluster(
    brokers: int = 1,
    *,
    secure: bool = False,
    routed: bool = False,
    sites: Sequence[str] | None = None,
) -> Iterator[LocalCluster]:
    """A cluster of this test process (``LocalCluster.up`` with these arguments)."""
    stop_orphaned_test_brokers()
    port = free_base_port(brokers)
    home = Path(tempfile.gettempdir()) / f"vmreplica-test-kafka-{port}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "owner.pid").write_text(str(os.getpid()))
    cluster = LocalCluster(home=home, base_port=port)
    try:
        cluster.up(brokers, secure=secure, routed=routed, sites=sites)
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home, ignore_errors=True)


def state_of(cluster: LocalCluster) -> ClusterState:
    """What the running ``cluster`` was started as (its nodes, bootstrap servers, security)."""
    state = cluster.state()
    assert state is not None, f"no cluster runs under {cluster.root}"
    return state
