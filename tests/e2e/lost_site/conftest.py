"""Each test of a lost site runs its own broker, which it kills and restarts (the session's
broker is shared by every other test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clusters import own_cluster, state_of
from vmreplica.devtools.cluster import LocalCluster


@pytest.fixture
def broker() -> Iterator[LocalCluster]:
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture
def bootstrap_servers(broker: LocalCluster) -> str:
    return state_of(broker).bootstrap_servers
