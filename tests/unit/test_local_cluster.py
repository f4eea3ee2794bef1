"""The local cluster's port choice, without starting Kafka."""

from __future__ import annotations

import socket

import pytest

from vmreplica.devtools import ports
from vmreplica.devtools.ports import PORT_STRIDE_PER_NODE, free_base_port, port_free


def test_free_base_port_stays_out_of_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_port_range", lambda: (20000, 60999))
    for _ in range(20):
        base = free_base_port(3)
        assert base >= 61000
        assert base + 3 * PORT_STRIDE_PER_NODE <= 65536


def test_a_port_held_without_listening_is_not_free() -> None:
    """The local end of an outgoing connection accepts nothing; a connect probe misses it."""
    base = free_base_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 1))
        assert not port_free(base + 1)
        assert free_base_port(preferred=base) != base
    assert free_base_port(preferred=base) == base
