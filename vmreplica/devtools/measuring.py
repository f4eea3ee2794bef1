"""What the benchmarks measure against and with: a Kafka broker, and a process's CPU and memory.

Shared by ``benchmarks/throughput.py`` and ``benchmarks/scale.py`` so that both start their
broker the same way and count CPU seconds the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vmreplica.devtools.cluster import ClusterState, LocalCluster
from vmreplica.devtools.ports import free_base_port
from vmreplica.errors import BrokerError

BROKER_START_ATTEMPTS: Final = 3


@dataclass(frozen=True)
class Broker:
    bootstrap_servers: str
    description: str
    pids: tuple[int, ...]
    """Broker JVMs on this machine, for CPU accounting (none for a configured cluster)."""
    state: ClusterState | None = None
    """The local cluster started (its admin connection and, secured, its CA); None for a
    configured cluster."""

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the broker JVMs so far (0 for a configured cluster)."""
        return sum(cpu_seconds(pid) for pid in self.pids)


@contextlib.contextmanager
def broker(
    workdir: Path, purpose: str = "this benchmark", *, secure: bool = False
) -> Iterator[Broker]:
    """Yield the configured cluster (``VMREPLICA_BOOTSTRAP_SERVERS``) or a fresh local
    single-node one on a free port, stopped afterwards; ``secure``: always a fresh local one,
    secured as by ``broker up --secure`` (TLS, SCRAM, ACLs)."""
    configured = None if secure else os.environ.get("VMREPLICA_BOOTSTRAP_SERVERS")
    if configured:
        yield Broker(configured, f"{configured} (VMREPLICA_BOOTSTRAP_SERVERS)", ())
        return
    for attempt in range(BROKER_START_ATTEMPTS):
        home = workdir / ("kafka-home-secured" if secure else "kafka-home")
        cluster = LocalCluster(home=home, base_port=free_base_port())
        try:
            state = cluster.up(1, secure=secure)
            break
        except BrokerError:
            # A random KRaft cluster id that starts with "-" makes kafka-storage fail; so does a
            # port taken between probing and binding. Another id and port will do.
            if attempt + 1 == BROKER_START_ATTEMPTS:
                raise
    try:
        yield Broker(
            state.bootstrap_servers,
            f"{state.bootstrap_servers} (local single-node Kafka{' secured' if secure else ''} "
            f"started by {purpose})",
            tuple(n.pid for n in state.nodes),
            state,
        )
    finally:
        cluster.down()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, or of process ``pid`` (from /proc)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` now (``VmRSS`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
