"""Resynchronization without a broker: the job file, the checks on a replica's digests, every
bad request with its exit code and message, the progress `status` shows, `--at`, and a
replica that restarts in the middle of being resynchronized.

Everything here is decided before anything reaches Kafka (the bootstrap server is a closed
port), which is the point: a refused resync sends nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.cli.replication import status_json
from vmreplica.cli.support import parse_at
from vmreplica.config import SiteConfig
from vmreplica.consumers.materializer import Materializer
from vmreplica.consumers.retention import RetentionPolicy
from vmreplica.domain.model import Consistency, DiskRecord, Position, RecoveryPoint, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ResyncRefused
from vmreplica.failover.divergence import check_digest_map
from vmreplica.failover.requests import Resynchronize, post_request
from vmreplica.failover.resync import accept_resync, cancel_resync
from vmreplica.failover.resync_job import ResyncJob, load_job, running, save_job
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.schemas.events import DigestMap
from vmreplica.storage.image import DiskImage
from vmreplica.storage.mailbox import Mailbox

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """Site A with VMs in every state a resync request meets, and no broker."""
    config = SiteConfig(site="site-a", root=tmp_path / "root", bootstrap_servers="127.0.0.1:1")
    async with Site(config) as site:
        disks = [
            DiskRecord("disk0", str(tmp_path / "d0.img"), 8 * MiB),
            DiskRecord("disk1", str(tmp_path / "d1.img"), 3 * MiB + 4 * KiB),
        ]
        catalog = site.catalog
        await catalog.add_vm(
            "web",
            "primary",
            "tg",
            "site-b",
            VmSettings(also_replicate_to=("site-c",)),
            disks,
            ReplicationState.REPLICATING,
        )
        await catalog.add_vm(
            "db", "replica", "tg", "site-b", VmSettings(), disks, ReplicationState.REPLICATING
        )
        await catalog.add_vm(
            "new",
            "primary",
            "tg",
            "site-b",
            VmSettings(),
            disks,
            ReplicationState.READY_FOR_INITIAL_REPLICATION,
        )
        yield site


def job(**changes: object) -> ResyncJob:
    base = ResyncJob(
        "web", "site-b", "requested by the operator", 1_800_000_000_000, 1, 42, total_bytes=11 * MiB
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- the job file ----------------------------------------------------------------------------


def test_a_job_survives_its_file_whole(tmp_path: Path) -> None:
    done = job(
        phase="done",
        digest_cycle=7,
        examined_bytes=11 * MiB,
        differing_bytes=192 * KiB,
        resent_bytes=200 * KiB,
        sent_bytes=150_000,
        epoch=2,
        cycle=9,
        differing={"disk0": [(0, 64 * KiB), (MiB, MiB + 128 * KiB)]},
    )
    save_job(tmp_path, done)
    assert load_job(tmp_path) == done
    assert not done.active
    assert done.figures()["differing_ranges"] == 2
    assert "differing" not in done.figures()
    assert done.summary() == (
        "resync of VM web to site-b done: site-b equals this site at cycle 9; 11534336 bytes "
        "examined, 196608 differed, 204800 resent, 150000 bytes sent"
    )
    assert job(phase="comparing", examined_bytes=MiB).summary() == (
        "resync of VM web to site-b: comparing, 1048576 of 11534336 bytes examined, 0 differ so far"
    )
    assert load_job(tmp_path / "nowhere") is None


def test_an_unreadable_job_file_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "resync.json").write_text('{"vm": "web"}')
    with pytest.raises(ConfigurationError, match=r"remove the VM's resync\.json"):
        load_job(tmp_path)


# --- the replica's digests -------------------------------------------------------------------


DISK = DiskRecord("disk0", "/images/d0.img", 3 * MiB + 4 * KiB)


@pytest.mark.parametrize(
    ("block", "count", "problem"),
    [
        (64 * KiB, 49, None),  # 3 MiB + 4 KiB: 48 full blocks and a short last one
        (128 * KiB, 25, None),
        (
            64 * KiB,
            48,
            "hold 768 bytes (48 digests of 16 bytes) but a disk of 3149824 bytes in "
            "blocks of 65536 needs 49",
        ),
        (64 * KiB, 50, "hold 800 bytes (50 digests of 16 bytes)"),
        (1000, 3150, "use blocks of 1000 bytes, not a multiple of 4096 up to 1073741824"),
        (0, 0, "use blocks of 0 bytes"),
    ],
)
def test_digests_must_fit_the_disk(block: int, count: int, problem: str | None) -> None:
    theirs = DigestMap("web", 1, "site-b", "disk0", 7, block, bytes(16 * count))
    if problem is None:
        check_digest_map("web", DISK, theirs)
        return
    with pytest.raises(ResyncRefused) as refused:
        check_digest_map("web", DISK, theirs)
    assert str(refused.value).startswith(
        f"VM 'web': the block digests of disk 'disk0' from site site-b (cycle 7) {problem}"
    )
    assert "nothing was sent" in str(refused.value)


def test_a_torn_digest_string_is_refused() -> None:
    theirs = DigestMap("web", 1, "site-b", "disk0", 7, 64 * KiB, bytes(16 * 49 - 3))
    with pytest.raises(ResyncRefused, match=r"hold 781 bytes \(48.8125 digests"):
        check_digest_map("web", DISK, theirs)


# --- bad requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vm", "target", "error", "message"),
    [
        (
            "ghost",
            "",
            ConfigurationError,
            "VM 'ghost' is not replicated at this site; `vmreplica status` lists the VMs",
        ),
        (
            "db",
            "",
            ConfigurationError,
            "VM 'db' is a replica at site site-a; a resync starts on its primary: run `vmreplica "
            "resync db` at site-b",
        ),
        (
            "web",
            "site-z",
            ConfigurationError,
            "site 'site-z' keeps no replica of VM 'web'; its replica sites are site-b, site-c",
        ),
        (
            "new",
            "",
            ResyncRefused,
            "VM 'new' is 'ready for initial replication' here; a resync starts on a replicating VM "
            "(let its initial replication finish, or complete its failover and reverse it)",
        ),
    ],
)
async def test_requests_that_cannot_start(
    site: Site, vm: str, target: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        await accept_resync(site, vm, target, status_from=0)
    assert str(caught.value) == message
    assert load_job(site.config.vm_folder(vm)) is None


async def test_one_resync_at_a_time(site: Site) -> None:
    first = await accept_resync(site, "web", "site-c", status_from=5)
    assert (first.target, first.status_from, first.phase) == ("site-c", 5, "requested")
    record = await site.catalog.vm("web")
    assert (record.state, record.state_message) == (
        ReplicationState.RESYNCHRONIZING,
        "resync of VM web to site-c: requested",
    )
    with pytest.raises(ResyncRefused) as refused:
        await accept_resync(site, "web", status_from=9)
    assert str(refused.value) == (
        "a resync of VM 'web' to site-c is already running (requested); one at a time. "
        "`vmreplica status web` shows its progress"
    )
    assert load_job(site.config.vm_folder("web")) == first


async def test_a_resync_is_cancelled_until_it_sends(site: Site) -> None:
    with pytest.raises(ResyncRefused, match="no resync of VM 'web' is running"):
        await cancel_resync(site, "web")
    folder = site.config.vm_folder("web")
    save_job(folder, job(phase="sending"))
    with pytest.raises(ResyncRefused, match="cannot be cancelled now, and ends in a moment"):
        await cancel_resync(site, "web")
    save_job(folder, job(phase="awaiting digests"))
    cancelled = await cancel_resync(site, "web")
    assert (cancelled.phase, cancelled.active) == ("cancelled", False)
    assert (await site.catalog.vm("web")).state is ReplicationState.REPLICATING
    assert (await accept_resync(site, "web", status_from=0)).phase == "requested"


async def test_the_agent_refuses_a_second_resync_and_never_stops_the_vm(site: Site) -> None:
    save_job(site.config.vm_folder("web"), job(phase="comparing"))
    async with Mailbox(site.config.catalog_path) as mailbox:
        second = await post_request(mailbox, Resynchronize("web"))
        replica = await post_request(mailbox, Resynchronize("db"))
        agent = Agent(site)
        await agent.mailbox.start()
        try:
            await agent._carry_out_requests()
        finally:
            await agent.mailbox.stop()
        assert [((r := await mailbox.request(i)).status, r.result) for i in (second, replica)] == [
            (
                "refused",
                "a resync of VM 'web' to site-b is already running (comparing); one at "
                "a time. `vmreplica status web` shows its progress",
            ),
            (
                "failed",
                "VM 'db' is a replica at site site-a; a resync starts on its primary: "
                "run `vmreplica resync db` at site-b",
            ),
        ]


Invoke = Callable[..., tuple[int, str]]


@pytest.fixture
def invoke(site: Site, tmp_path: Path) -> Invoke:
    config = tmp_path / "site.toml"
    config.write_text(
        f'site = "site-a"\nroot = "{site.config.root}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert "Traceback" not in result.output
        return result.exit_code, " ".join(result.output.split())

    return run


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["resync", "ghost"], 2, "error: VM 'ghost' is not replicated at this site"),
        (
            ["resync", "db"],
            2,
            "error: VM 'db' is a replica at site site-a; a resync starts on its "
            "primary: run `vmreplica resync db` at site-b",
        ),
        (["resync", "web", "--site", "site-z"], 2, "error: site 'site-z' keeps no replica"),
        (["resync", "new"], 1, "error: VM 'new' is 'ready for initial replication' here"),
        (
            ["resync", "web", "--at", "yesterday"],
            2,
            "error: --at 'yesterday': expected HH:MM or a date and time such as 2026-12-01T18:30",
        ),
        (
            ["resync", "web", "--at", "2001-01-01T00:00"],
            2,
            "error: --at '2001-01-01T00:00' is in the past",
        ),
        (
            ["resync", "web", "--at", "18:30"],
            2,
            "error: --at leaves the resync to this site's agent, which is not running",
        ),
        (
            ["resync", "web", "--cancel", "--site", "site-c"],
            2,
            "error: --cancel stops the running resync; it takes no --at or --site",
        ),
        (["resync", "web", "--cancel"], 1, "error: no resync of VM 'web' is running"),
    ],
)
def test_bad_requests_at_the_command_line(
    invoke: Invoke, args: list[str], code: int, message: str
) -> None:
    exit_code, output = invoke(*args)
    assert (exit_code, output[: len(message)]) == (code, message)


def test_a_resync_run_by_another_process_is_refused(site: Site, invoke: Invoke) -> None:
    with running(site.config.vm_folder("web")):
        code, output = invoke("resync", "web")
    assert (code, output) == (
        1,
        "error: the resync of VM 'web' is being run by another "
        "process (an agent or another `vmreplica resync`); "
        "`vmreplica status` shows its progress",
    )


# --- progress in `status` ----------------------------------------------------------------------


async def test_status_shows_a_primarys_resync(site: Site) -> None:
    record = await site.catalog.vm("web")
    assert "resync" not in status_json(await vm_status(site, record, with_replica=False))
    save_job(
        site.config.vm_folder("web"),
        job(
            phase="comparing",
            examined_bytes=3 * MiB,
            differing_bytes=128 * KiB,
            differing={"disk0": [(0, 128 * KiB)]},
        ),
    )
    row = status_json(await vm_status(site, record, with_replica=False))
    assert row["resync"] == {
        "vm": "web",
        "target": "site-b",
        "reason": "requested by the operator",
        "started_ms": 1_800_000_000_000,
        "base_epoch": 1,
        "status_from": 42,
        "phase": "comparing",
        "automatic": False,
        "resume_state": "replicating",
        "not_before_ms": 0,
        "asked_ms": 0,
        "digest_epoch": 0,
        "digest_cycle": -1,
        "journal_from": 0,
        "total_bytes": 11 * MiB,
        "examined_bytes": 3 * MiB,
        "differing_bytes": 128 * KiB,
        "resent_bytes": 0,
        "sent_bytes": 0,
        "epoch": None,
        "cycle": None,
        "message": "",
        "finished_ms": None,
        "differing_ranges": 1,
    }
    assert "resync" not in status_json(
        await vm_status(site, await site.catalog.vm("db"), with_replica=False)
    )


# --- --at --------------------------------------------------------------------------------------


def test_at_takes_the_next_time_of_day_or_a_date() -> None:
    now = datetime(2026, 11, 30, 20, 0, tzinfo=timezone(timedelta(hours=1)))
    assert parse_at("21:15", now) == int(now.replace(hour=21, minute=15).timestamp() * 1000)
    assert parse_at("18:30", now) == int(
        (now.replace(hour=18, minute=30) + timedelta(days=1)).timestamp() * 1000
    )
    assert parse_at("2026-12-01T06:00+01:00", now) == int(
        datetime(2026, 12, 1, 6, 0, tzinfo=now.tzinfo).timestamp() * 1000
    )
    with pytest.raises(ConfigurationError, match="is in the past"):
        parse_at("2026-11-30T18:00+01:00", now)


# --- the replica restarting in the middle ------------------------------------------------------


async def _materializer(site: Site, tmp_path: Path) -> Materializer:
    images = {name: DiskImage.create(tmp_path / f"{name}.img", MiB) for name in ("disk0",)}
    return Materializer(
        "db",
        images,
        tmp_path / "undo",
        site.catalog,
        RetentionPolicy("every_cycle", 1, None),
        site="site-a",
    )


async def _points(site: Site, *cycles: int) -> None:
    for cycle in cycles:
        await site.catalog.advance_position(
            "db",
            Position(1, cycle, bytes(32), cycle * 10, 0),
            point=RecoveryPoint(cycle, 1, cycle * 10 - 1, 0, Consistency.CRASH, bytes(32)),
        )


async def test_a_replica_killed_after_adopting_the_epoch_waits_for_it_again(
    site: Site, tmp_path: Path
) -> None:
    await _points(site, 3, 4)
    await site.catalog.set_epoch("db", 2)  # adopted epoch 2, its first cycle not applied
    await site.catalog.set_state("db", ReplicationState.RESYNCHRONIZING)
    cursor = await (await _materializer(site, tmp_path)).recover()
    assert (cursor.awaiting_resync, cursor.epoch, cursor.cycle) == (True, 1, 4)
    assert (await site.catalog.vm("db")).state is ReplicationState.RESYNCHRONIZING


async def test_a_replica_killed_after_recording_the_resync_cycle_finishes_it(
    site: Site, tmp_path: Path
) -> None:
    await _points(site, 3, 4)
    await site.catalog.set_epoch("db", 2)
    await site.catalog.set_state("db", ReplicationState.RESYNCHRONIZING)
    await site.catalog.advance_position(
        "db",
        Position(2, 5, bytes(32), 60, 0),
        point=RecoveryPoint(5, 2, 59, 0, Consistency.CRASH, bytes(32)),
    )
    cursor = await (await _materializer(site, tmp_path)).recover()
    assert (cursor.awaiting_resync, cursor.epoch, cursor.cycle) == (False, 2, 5)
    record = await site.catalog.vm("db")
    assert (record.state, record.state_message) == (
        ReplicationState.REPLICATING,
        "resynchronized at cycle 5",
    )
    assert [p.cycle for p in await site.catalog.points("db")] == [5]


async def test_a_replica_in_resync_required_waits_whatever_put_it_there(
    site: Site, tmp_path: Path
) -> None:
    await _points(site, 3)
    await site.catalog.set_state(
        "db", ReplicationState.RESYNCHRONIZATION_REQUIRED, "a gap in the journal"
    )
    cursor = await (await _materializer(site, tmp_path)).recover()
    assert cursor.awaiting_resync


# --- when the replica is known to need it -------------------------------------------------------


async def test_a_cancelled_resync_leaves_a_needed_one_critical(site: Site) -> None:
    await site.catalog.set_state(
        "web",
        ReplicationState.RESYNCHRONIZATION_REQUIRED,
        "replica site site-b needs a resynchronization",
    )
    accepted = await accept_resync(site, "web", status_from=0)
    assert accepted.resume_state == "resynchronization required"
    await cancel_resync(site, "web")
    record = await site.catalog.vm("web")
    assert (record.state, record.state_message) == (
        ReplicationState.RESYNCHRONIZATION_REQUIRED,
        "resync of VM web to site-b cancelled: cancelled by the operator; site-b still needs a "
        "resynchronization: run `vmreplica resync web` once the cause is fixed",
    )
    automatic = await accept_resync(
        site, "web", "site-c", "automatic", status_from=0, automatic=True
    )
    assert (automatic.automatic, automatic.resume_state) == (True, "resynchronization required")


def test_settings_of_an_earlier_release_resync_automatically() -> None:
    old = VmSettings().to_json().replace(', "auto_resync": true', "")
    assert "auto_resync" not in old
    assert VmSettings.from_json(old).auto_resync
    assert not VmSettings.from_json(VmSettings(auto_resync=False).to_json()).auto_resync
