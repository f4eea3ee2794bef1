"""The pure parts of fault handling: back-off, health reasons, what a full disk looks like, and
the space reserve (the end-to-end behaviour is in tests/e2e/test_kafka_faults.py and
tests/e2e/test_disk_full.py)."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from vmreplica.domain.states import Health, ReplicationState, WindowStats, assess, silence
from vmreplica.errors import StorageFullError
from vmreplica.runtime.outage import Backoff
from vmreplica.storage.reserve import SpaceReserve
from vmreplica.storage.safefile import no_space

QUIET = WindowStats(10, 10, 1.0, 0.5)


def test_backoff_doubles_up_to_its_cap_and_starts_afresh() -> None:
    backoff = Backoff(first=1.0, longest=30.0)
    assert [backoff.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_a_critical_state_gives_its_message_as_reason() -> None:
    report = assess(ReplicationState.ERROR, QUIET, "no space left on /x; free space")
    assert report.health is Health.CRITICAL
    assert report.reasons == ("state is error: no space left on /x; free space",)
    assert assess(ReplicationState.ERROR, QUIET).reasons == ("state is error",)


def test_a_silent_primary_is_a_warning_that_says_who_is_silent() -> None:
    now = 1_000_000
    assert silence("replica", "site-a", None, now, 1.0) is None  # never heard: nothing expected
    assert silence("replica", "site-a", now - 2_000, now, 1.0) is None  # live
    replica = silence("replica", "site-a", now - 12_000, now, 1.0)
    assert replica == (
        "no heartbeat from primary site site-a for 12 s: the primary, its link to Kafka, or "
        "Kafka itself is down"
    )
    primary = silence("primary", "site-b", now - 12_000, now, 1.0)
    assert primary is not None
    assert primary.startswith("no heartbeat acknowledged by Kafka for 12 s")
    report = assess(ReplicationState.REPLICATING, WindowStats(10, 10, 1.0, 0.5, silence=replica))
    assert report.health is Health.WARNING
    assert report.reasons == (replica,)


def test_no_space_recognises_enospc_quotas_sqlite_and_causes() -> None:
    assert no_space(OSError(errno.ENOSPC, "x")) == os.strerror(errno.ENOSPC)
    assert no_space(OSError(errno.EDQUOT, "x")) == os.strerror(errno.EDQUOT)
    assert no_space(OSError(errno.EIO, "x")) is None
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert no_space(full) == "database or disk is full"
    assert no_space(sqlite3.OperationalError("locked")) is None
    wrapped = StorageFullError("vm", "/x", "applying cycle 3", "No space left on device")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert no_space(wrapped) == os.strerror(errno.ENOSPC)
    assert wrapped.retriable


def test_space_reserve_is_taken_once_and_given_back(tmp_path: Path) -> None:
    reserve = SpaceReserve(tmp_path, size=64 * 1024)
    assert reserve.take()
    assert reserve.path.stat().st_blocks * 512 >= 64 * 1024  # allocated, not sparse
    assert reserve.take()
    assert reserve.release()
    assert not reserve.path.exists()
    assert not reserve.release()
