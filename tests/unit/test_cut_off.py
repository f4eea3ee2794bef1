"""A site cut off from Kafka: what its health says, and what it keeps until a broker answers.

- health: "Kafka unreachable" with since when and the partner's last word, a warning first and
  critical after three heartbeat intervals — never a bare "state is error";
- the catalog keeps a takeover's EpochStart as pending in the role-change transaction, drops
  it with the next role change (a cancelled failover publishes nothing), and forgets it with
  the position of its offset in one transaction once it is published;
- the mailbox keeps since when the running agent cannot reach Kafka, for `status`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmreplica.domain.model import DiskRecord, Position, VmSettings
from vmreplica.domain.states import (
    CutOff,
    Health,
    KafkaOutage,
    ReplicationState,
    WindowStats,
    assess,
    cut_off,
)
from vmreplica.errors import PositionRegressedError
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.mailbox import Mailbox

FINE = WindowStats(12, 12, 1.0, 0.5)
NOW = 1_000_000_000


def test_a_short_outage_is_a_warning_naming_kafka_and_the_partner() -> None:
    cut = cut_off(KafkaOutage(NOW - 5_000, "cannot reach Kafka"), NOW, 30.0, "site-a", NOW - 7_000)
    assert cut == CutOff(
        "Kafka unreachable for 5 s, and with it partner site site-a (last heard 7 s ago): "
        "cannot reach Kafka",
        critical=False,
    )
    report = assess(ReplicationState.REPLICATING, FINE, cut=cut)
    assert (report.health, report.reasons) == (Health.WARNING, (cut.reason,))


def test_an_outage_of_three_heartbeat_intervals_is_critical() -> None:
    outage = KafkaOutage(NOW - 90_000, "down")
    assert not cut_off(outage, NOW - 1, 30.0, "site-b", None).critical
    cut = cut_off(outage, NOW, 30.0, "site-b", None)
    assert cut.critical
    assert cut.reason == "Kafka unreachable for 90 s, and with it partner site site-b: down"
    report = assess(ReplicationState.FAILED_OVER, FINE, cut=cut)
    assert report.health is Health.CRITICAL
    assert report.reasons == (cut.reason, "state is failed over")


def test_a_critical_state_keeps_its_reason_after_the_outage() -> None:
    cut = cut_off(KafkaOutage(NOW, "down"), NOW, 30.0, "site-a", None)
    report = assess(ReplicationState.RESYNCHRONIZATION_REQUIRED, FINE, cut=cut)
    assert report == (
        report.__class__(Health.CRITICAL, (cut.reason, "state is resynchronization required"))
    )


async def _replica(catalog: Catalog) -> None:
    await catalog.add_vm(
        "web",
        "replica",
        "tg",
        "site-a",
        VmSettings(),
        [DiskRecord("disk0", "/nowhere/web.img", 4096)],
        ReplicationState.REPLICATING,
    )
    await catalog.advance_position("web", Position(1, 9, b"h", 90, 1))


async def _take_over(catalog: Catalog, event: bytes) -> None:
    await catalog.change_role(
        "web",
        "primary",
        "site-a",
        2,
        ReplicationState.FAILED_OVER_WAITING_COMPLETION,
        "unplanned failover to cycle 9",
        position=Position(2, 9, b"h", 90, 2),
        failover_point=9,
        pending_epoch=event,
    )


async def test_a_takeover_keeps_its_epoch_pending_until_published(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _replica(catalog)
        assert await catalog.pending_epoch("web") is None
        await _take_over(catalog, b"epoch 2")
        assert (await catalog.vm("web")).role == "primary"
        assert await catalog.pending_epoch("web") == b"epoch 2"

        with pytest.raises(PositionRegressedError):  # neither lands
            await catalog.epoch_published("web", Position(2, 9, b"h", 80, 3))
        assert await catalog.pending_epoch("web") == b"epoch 2"

        await catalog.epoch_published("web", Position(2, 9, b"h", 131, 3))
        assert await catalog.pending_epoch("web") is None
        assert await catalog.position("web") == Position(2, 9, b"h", 131, 3)


async def test_a_role_change_drops_an_epoch_still_pending(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        await _replica(catalog)
        await _take_over(catalog, b"epoch 2")
        await catalog.change_role(  # the failover is cancelled before it was published
            "web", "replica", "site-a", 1, ReplicationState.REPLICATING, "failover cancelled"
        )
        assert await catalog.pending_epoch("web") is None


async def test_the_mailbox_keeps_when_the_running_agent_lost_kafka(tmp_path: Path) -> None:
    async with Mailbox(tmp_path / "catalog.sqlite") as mailbox:
        await mailbox.kafka_unreachable("site-b", "first")
        assert await mailbox.kafka_outage("site-b") is None  # no agent runs: nobody knows
        await mailbox.agent_alive("site-b", os.getpid())
        first = await mailbox.kafka_outage("site-b")
        assert first is not None
        assert first.message == "first"
        await mailbox.kafka_unreachable("site-b", "second")
        assert await mailbox.kafka_outage("site-b") == KafkaOutage(first.since_ms, "second")
        await mailbox.kafka_reachable("site-b")
        assert await mailbox.kafka_outage("site-b") is None
        await mailbox.kafka_unreachable("site-b", "again")
        await mailbox.agent_gone("site-b")
        await mailbox.agent_alive("site-b", os.getpid())
        assert await mailbox.kafka_outage("site-b") is None  # a stopped agent's outage is gone
