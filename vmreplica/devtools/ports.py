"""Loopback ports for local Kafka nodes: the layout of a cluster's ports, and a free block for
a throw-away cluster (the tests, the demo, the benchmarks).

A throw-away cluster must not take a port from the kernel's ephemeral range: any outgoing
connection on the machine may be given one of those ports between the check and the broker's
bind, and the node then dies at start-up. Ports are checked by binding them, as Kafka will.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

from vmreplica.errors import BrokerError

PORT_STRIDE_PER_NODE: Final = 10
"""Node i listens on base + 10*i (broker) and base + 10*i + 1 (controller)."""
LOWEST_PICKED_PORT: Final = 20000
"""`free_base_port` stays above the well-known and commonly configured service ports."""
LINUX_EPHEMERAL_RANGE: Final = (32768, 60999)
"""Linux's default outgoing-connection port range, assumed where /proc does not say."""


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (inclusive), from /proc where it can.

    Any connection this machine opens may take one of them at any moment, so a listener that must
    bind a fixed port later (a broker starting a few seconds after its port was checked) avoids
    them.
    """
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return LINUX_EPHEMERAL_RANGE


def port_free(port: int) -> bool:
    """True when a listener can bind ``port`` on 127.0.0.1 now: checked by binding, not connecting.

    A connect probe misses a port held by a socket that does not accept, such as the local end of
    an outgoing connection, which is exactly what makes a broker's later bind fail. The probe
    binds with SO_REUSEADDR as the JVM's server sockets do, so a port left in TIME_WAIT by a
    broker that just stopped still counts as free, as it is for Kafka.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(base_port: int, nodes: int) -> list[int]:
    """The broker and controller port of each node of a cluster at ``base_port``."""
    return [base_port + PORT_STRIDE_PER_NODE * i + j for i in range(nodes) for j in (0, 1)]


def free_base_port(nodes: int = 1, *, preferred: int | None = None, attempts: int = 200) -> int:
    """A base port for a throw-away cluster of ``nodes`` nodes (tests, demo, benchmarks).

    It lies outside the kernel's ephemeral range, so no outgoing connection takes one of its ports
    between this check and the broker's bind, and every port of its block
    (``PORT_STRIDE_PER_NODE`` per node, the broker and controller ports among them) is free now.
    The rest of the block is free for the caller's own listeners (a test's metrics port).
    ``preferred`` is taken when its block is free, so a documented port stays the usual one.

    :raises BrokerError: no such block was found in ``attempts`` random tries.
    """
    span = PORT_STRIDE_PER_NODE * nodes
    low, high = ephemeral_port_range()

    def usable(base: int) -> bool:
        outside = base + span <= low or base > high
        return outside and all(port_free(port) for port in range(base, base + span))

    if preferred is not None and usable(preferred):
        return preferred
    bases = [
        base
        for start, stop in ((LOWEST_PICKED_PORT, low), (high + 1, 65536))
        for base in range(start, stop - span + 1, PORT_STRIDE_PER_NODE)
    ]
    rng = random.Random()
    for _ in range(attempts if bases else 0):
        base = rng.choice(bases)
        if usable(base):
            return base
    raise BrokerError(
        f"no block of {span} free ports on 127.0.0.1 outside the ephemeral range {low}-{high}; "
        "stop stray listeners (`ss -ltnp`) or set VMREPLICA_BOOTSTRAP_SERVERS to a running Kafka"
    )
