"""An idle VM ships no cycle; heartbeats carry liveness, and neither site calls it late.

The rules (:mod:`vmreplica.domain.states`) at their edges; then `vmreplica status` and the
metrics over a real catalog with a frozen clock — an idle VM whose primary heartbeats is Normal
and within one interval however old its last cycle, a silent primary falls behind from its last
word, a cycle after an idle stretch is not a missed one; then the primary's own rule: nothing is
cut while nothing waits. No broker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.clock import HOUR_MS
from vmreplica.domain.model import DiskRecord, Position, VmRecord, VmSettings
from vmreplica.domain.states import (
    LIVENESS_HEARTBEATS,
    Health,
    LastHeartbeat,
    ReplicationState,
    primary_live,
    rpo_seconds,
    synced_at_ms,
    waiting_ms,
)
from vmreplica.journal.kafka import KafkaConnection
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.metrics import CycleStat, CycleTally, SiteMetrics
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import VmStatus, vm_status
from vmreplica.storage.catalog import Catalog

NOW_MS: Final = 1_800_000_000_000
SECOND_MS: Final = 1000
MINUTE_MS: Final = 60 * SECOND_MS


# The rules ---------------------------------------------------------------------------------------


def test_a_primary_is_live_until_three_heartbeats_pass_without_one() -> None:
    assert LIVENESS_HEARTBEATS == 3
    assert primary_live(NOW_MS - 89_999, NOW_MS, 30.0)
    assert not primary_live(NOW_MS - 90_000, NOW_MS, 30.0)
    assert not primary_live(None, NOW_MS, 30.0)
    assert primary_live(NOW_MS - 2_000, NOW_MS, 1.0)


def test_in_sync_at_the_last_cut_or_a_later_idle_heartbeat() -> None:
    assert synced_at_ms(None, None) is None
    assert synced_at_ms(5_000, None) == 5_000
    assert synced_at_ms(5_000, LastHeartbeat(9_000, 8_000, True)) == 8_000
    assert synced_at_ms(5_000, LastHeartbeat(9_000, None, False)) == 5_000  # writes wait
    assert synced_at_ms(None, LastHeartbeat(9_000, 8_000, False)) == 8_000


@pytest.mark.parametrize(
    ("behind_ms", "interval", "idle", "rpo"),
    [
        (10_000, 1.0, True, 1.0),  # idle, heartbeating: a write waits one interval at most
        (10_000, 30.0, True, 10.0),  # ... which is further off than the last word
        (10_000, 1.0, False, 10.0),  # writes wait, or the primary fell silent
        (3 * HOUR_MS, 1.0, False, 10_800.0),
        (-500, 1.0, False, 0.0),  # the primary's clock a little ahead
    ],
)
def test_the_rpo(behind_ms: int, interval: float, idle: bool, rpo: float) -> None:
    assert rpo_seconds(NOW_MS, NOW_MS - behind_ms, interval, idle) == rpo
    assert rpo_seconds(NOW_MS, None, interval, idle) is None


def test_idle_time_on_the_primary_does_not_count_as_waiting() -> None:
    # Previous cycle cut at 0 (primary clock), done at 10_400 (replica clock: 400 ms later and
    # 10 s of skew). The primary then found nothing waiting until 100_000; the next cycle is
    # done at 111_500 on the replica's clock: writes waited 1.1 s, not 101 s.
    assert waiting_ms(10_400, 0, 100_000, 111_500) == 1_100
    assert waiting_ms(10_400, 0, None, 111_500) == 101_100  # a cycle that kept no start time
    assert waiting_ms(10_400, 0, 100_000, 111_500, since_ms=111_000) == 500
    assert waiting_ms(10_400, 0, 200_000, 111_500) == 0


# Status and metrics over a catalog ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW_MS / 1000)


async def _replica_site(tmp_path: Path, frequency: int) -> Site:
    site = Site(SiteConfig(site="site-b", root=tmp_path / "root", bootstrap_servers="127.0.0.1:1"))
    await site.start()
    await site.catalog.add_vm(
        "web",
        "replica",
        "tg",
        "site-a",
        VmSettings(frequency_seconds=frequency),
        [DiskRecord("disk0", "/images/web.img", 4096)],
        ReplicationState.REPLICATING,
    )
    await site.catalog.db.execute("UPDATE vm SET state_changed_ms = ?", (NOW_MS - 10 * HOUR_MS,))
    return site


async def _cycle(site: Site, cycle: int, started_ms: int, cut_ms: int, done_ms: int) -> None:
    await site.catalog.advance_position(
        "web",
        Position(1, cycle, bytes(32), cycle, done_ms),
        cut_at_ms=cut_ms,
        size_bytes=4096,
        started_at_ms=started_ms,
    )


async def _status(site: Site) -> VmStatus:
    return await vm_status(site, await site.catalog.vm("web"), with_replica=False)


async def test_an_idle_vm_whose_primary_heartbeats_is_normal_and_up_to_date(tmp_path: Path) -> None:
    site = await _replica_site(tmp_path, frequency=0)
    try:
        three_hours_ago = NOW_MS - 3 * HOUR_MS
        await _cycle(site, 7, three_hours_ago - 1_000, three_hours_ago, three_hours_ago + 300)
        await site.catalog.record_heartbeat(
            "web", NOW_MS - 20_000, NOW_MS - 20_000, from_primary_site=True
        )
        status = await _status(site)
        assert (status.report.health, status.report.reasons) == (Health.NORMAL, ())
        assert (status.seconds_behind, status.idle, status.cycles_in_window) == (1.0, True, 0)

        metrics = SiteMetrics("site-b", lambda: NOW_MS / 1000)
        metrics.started_ms = NOW_MS - 2 * HOUR_MS
        metrics.update(
            status,
            [CycleStat(*row) for row in await site.catalog.cycle_stats("web", 0, previous=True)],
            await site.catalog.position("web"),
            NOW_MS,
        )
        labels = {"site": "site-b", "vm": "web"}
        sample = metrics.registry.get_sample_value
        assert sample("vmreplica_rpo_seconds", {**labels, "role": "replica"}) == 1.0
        assert sample("vmreplica_cycles_missed_total", labels) == 0
        assert sample("vmreplica_vm_health", {**labels, "role": "replica", "health": "normal"}) == 1
    finally:
        await site.stop()


async def test_a_silent_primary_falls_behind_from_its_last_word(tmp_path: Path) -> None:
    site = await _replica_site(tmp_path, frequency=0)
    try:
        three_hours_ago = NOW_MS - 3 * HOUR_MS
        await _cycle(site, 7, three_hours_ago - 1_000, three_hours_ago, three_hours_ago + 300)
        await site.catalog.record_heartbeat(
            "web", NOW_MS - 100_000, NOW_MS - 100_000, from_primary_site=True
        )
        status = await _status(site)  # three 30-second heartbeats missed: not live
        assert (status.seconds_behind, status.idle) == (100.0, False)
        # nothing is known since its last word: every interval since counts as missed
        assert status.report == (await _status(site)).report
        assert status.report.health is Health.WARNING
        assert status.report.reasons == (
            "no heartbeat from primary site site-a for 100 s: the primary, its link to Kafka, "
            "or Kafka itself is down",
            "99 of 99 cycles missed",
        )
    finally:
        await site.stop()


async def test_a_cycle_after_an_idle_stretch_is_not_a_missed_one(tmp_path: Path) -> None:
    site = await _replica_site(tmp_path, frequency=30)
    try:
        fifty_minutes_ago = NOW_MS - 50 * MINUTE_MS
        await _cycle(
            site, 1, fifty_minutes_ago - 30_000, fifty_minutes_ago, fifty_minutes_ago + 500
        )
        # Idle for 48 minutes: the primary's idle checks moved the next cycle's start forward.
        await _cycle(site, 2, NOW_MS - 2 * MINUTE_MS, NOW_MS - 100_000, NOW_MS - 99_500)
        await site.catalog.record_heartbeat(
            "web", NOW_MS - 10_000, NOW_MS - 10_000, from_primary_site=True
        )
        status = await _status(site)
        assert (status.report.health, status.cycles_in_window) == (Health.NORMAL, 2)
        assert status.seconds_behind == 10.0  # within one 30-second interval

        tally = CycleTally.starting(NOW_MS - HOUR_MS)
        rows = [CycleStat(*row) for row in await site.catalog.cycle_stats("web", 0)]
        new = tally.new_cycles(rows)
        assert tally.missed_cycles(new[:1], NOW_MS - 50 * MINUTE_MS, 30.0, True) == 0
        assert tally.missed_cycles([], NOW_MS - 40 * MINUTE_MS, 30.0, True, idle=True) == 0
        assert tally.missed_cycles(new[1:], NOW_MS, 30.0, True, idle=True) == 0
        # The same cycles without their start time (an older primary): 48 min 20 s waited.
        legacy = CycleTally.starting(NOW_MS - HOUR_MS)
        old = [CycleStat(r.cycle, r.cut_at_ms, r.done_at_ms, r.size_bytes) for r in rows]
        assert legacy.missed_cycles(legacy.new_cycles(old), NOW_MS - 99_500, 30.0, True) == 96
    finally:
        await site.stop()


async def test_writes_that_wait_past_their_interval_are_missed_cycles(tmp_path: Path) -> None:
    site = await _replica_site(tmp_path, frequency=30)
    try:
        await _cycle(
            site,
            1,
            NOW_MS - 10 * MINUTE_MS - 30_000,
            NOW_MS - 10 * MINUTE_MS,
            NOW_MS - 10 * MINUTE_MS + 500,
        )
        # The primary said nothing waited five minutes later, then that writes waited.
        await site.catalog.record_heartbeat(
            "web", NOW_MS - 5 * MINUTE_MS, NOW_MS - 5 * MINUTE_MS, from_primary_site=True
        )
        await site.catalog.record_heartbeat("web", NOW_MS - 20_000, None, from_primary_site=True)
        status = await _status(site)  # waiting since five minutes: ten intervals, 9 missed
        assert not status.idle
        assert status.seconds_behind == 300.0
        assert status.report.reasons == (
            "9 of 10 cycles missed",
            "RPO 300 s, above 210 s (three intervals of 30 s and two minutes)",
        )
    finally:
        await site.stop()


# The primary: nothing is cut while nothing waits -------------------------------------------------


def _primary(tmp_path: Path, catalog: Catalog) -> PrimaryVm:
    record = VmRecord(
        "web",
        "primary",
        "tg",
        "site-b",
        VmSettings(frequency_seconds=0),
        1,
        ReplicationState.REPLICATING,
        "",
        NOW_MS,
        (DiskRecord("disk0", str(tmp_path / "web.img"), 64 * 1024),),
    )
    return PrimaryVm(
        record,
        "site-a",
        tmp_path / "vm",
        KafkaConnection("127.0.0.1:1"),
        catalog,
        "journal",
        "transactional-id",
    )


async def test_an_idle_check_cuts_nothing_and_moves_the_cycle_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        primary = _primary(tmp_path, catalog)
        try:
            cycle = primary.capture.log.cycle
            assert not primary.changes_waiting()
            monkeypatch.setattr(time, "time", lambda: (NOW_MS + 5_000) / 1000)
            assert await primary.replicate() == []
            assert (primary.checks, primary.capture.log.cycle) == (1, cycle)  # nothing cut
            assert primary.capture.cycle_started_ms == NOW_MS + 5_000  # idle until then
            assert primary.idle_at_ms() == NOW_MS + 5_000
            assert primary.idle_unannounced  # the replica has not been told yet

            await primary.capture.write("disk0", 0, b"\x01" * 4096)
            assert primary.changes_waiting()
            assert primary.idle_at_ms() is None
            assert not primary.idle_unannounced
        finally:
            primary.capture.close()


async def test_a_log_reopened_after_a_clean_stop_has_nothing_waiting(tmp_path: Path) -> None:
    async with Catalog(tmp_path / "catalog.sqlite") as catalog:
        first = _primary(tmp_path, catalog)
        first.capture.close()  # a clean-close marker in the open segment, and nothing else
        again = _primary(tmp_path, catalog)
        try:
            assert again.capture.log.segment_bytes > 44
            assert not again.changes_waiting()
            await again.capture.write("disk0", 4096, b"\x02" * 512)
            assert again.changes_waiting()
        finally:
            again.capture.close()
