"""`vmreplica set` (Set-VMReplication) and `vmreplica remove` (Remove-VMReplication) without a
broker: the rules of what may change when, the catalog rows they write, the replica's side of a
changed VmConfig, and each mistake or refusal as one paragraph with its exit code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.consumers.configured import replica_settings
from vmreplica.domain.events import EventId
from vmreplica.domain.model import DiskRecord, Position, VmSettings
from vmreplica.domain.settings_change import SettingsChange, changed_settings, differences
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError
from vmreplica.schemas.events import DiskSize, VmConfig
from vmreplica.storage import history
from vmreplica.storage.catalog import Catalog

Invoke = Callable[..., tuple[int, str]]
DISKS = ("d0", "d1")


def test_nothing_to_change_is_a_mistake() -> None:
    with pytest.raises(ConfigurationError, match="was given nothing to change"):
        changed_settings("web", VmSettings(), SettingsChange(), DISKS, seeded=False)


def test_settings_change_validated_like_enable() -> None:
    current = VmSettings(recovery_history=4, app_consistent_hours=2)
    after = changed_settings(
        "web", current, SettingsChange(frequency_seconds=30, compression=False), DISKS, seeded=True
    )
    assert (after.frequency_seconds, after.compression, after.recovery_history) == (30, False, 4)
    with pytest.raises(ConfigurationError, match="fall outside a recovery history of 1 hours"):
        changed_settings("web", current, SettingsChange(recovery_history=1), DISKS, seeded=True)
    with pytest.raises(ConfigurationError, match="must be 30, 300, 900 seconds or continuous"):
        changed_settings("web", current, SettingsChange(frequency_seconds=60), DISKS, seeded=True)
    with pytest.raises(ConfigurationError, match="recovery history must be 0-24 hours"):
        changed_settings("web", current, SettingsChange(recovery_history=25), DISKS, seeded=True)
    off = changed_settings(
        "web", current, SettingsChange(app_consistent_hours=None), DISKS, seeded=True
    )
    assert off.app_consistent_hours is None
    assert differences(current, off) == {"app_consistent_hours": (2, None)}


def test_disks_and_replica_site_change_only_before_the_seed() -> None:
    before_seed = changed_settings(
        "web", VmSettings(), SettingsChange(exclude_disks=("d1",)), DISKS, seeded=False
    )
    assert before_seed.excluded_disks == ("d1",)
    again = changed_settings(
        "web", before_seed, SettingsChange(include_disks=("d1",)), ("d0",), seeded=False
    )
    assert again.excluded_disks == ()
    with pytest.raises(ReplicationError, match="would stay at an older instant than the others"):
        changed_settings(
            "web", VmSettings(), SettingsChange(exclude_disks=("d1",)), DISKS, seeded=True
        )
    with pytest.raises(ReplicationError, match="'site-c' holds nothing of it"):
        changed_settings(
            "web", VmSettings(), SettingsChange(replica_site="site-c"), DISKS, seeded=True
        )
    with pytest.raises(ConfigurationError, match="no disk left to replicate"):
        changed_settings(
            "web", VmSettings(), SettingsChange(exclude_disks=DISKS), DISKS, seeded=False
        )
    with pytest.raises(ConfigurationError, match="replicates no disk of that name"):
        changed_settings(
            "web", VmSettings(), SettingsChange(exclude_disks=("d9",)), DISKS, seeded=False
        )


def test_replica_takes_published_settings_and_keeps_its_own() -> None:
    mine = VmSettings(hypervisor="libvirt:web", pre_cut_hook="sync")
    config = VmConfig(
        "web", 1, (DiskSize("d0", 4096),), 30, 6, 3, "site-a", 0, ("site-b", "site-c"), None
    )
    settings = replica_settings(config, "site-b", mine)
    assert (settings.frequency_seconds, settings.recovery_history) == (30, 6)
    assert settings.app_consistent_hours == 3
    assert settings.also_replicate_to == ("site-c",)
    assert (settings.hypervisor, settings.pre_cut_hook) == ("libvirt:web", "sync")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f'site = "site-a"\nroot = "{tmp_path / "root"}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )
    for disk in DISKS:
        (tmp_path / f"{disk}.img").write_bytes(bytes(4096))
    return path


@pytest.fixture
def run(config: Path) -> Invoke:
    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        return result.exit_code, " ".join(result.output.split())

    return invoke


def _catalog(config: Path) -> Catalog:
    return Catalog(config.parent / "root" / "catalog.sqlite")


def _add(
    config: Path,
    role: str = "primary",
    state: ReplicationState = ReplicationState.READY_FOR_INITIAL_REPLICATION,
) -> None:
    async def add() -> None:
        async with _catalog(config) as catalog:
            await catalog.add_vm(
                "web",
                role,  # type: ignore[arg-type]
                "default",
                "site-b",
                VmSettings(),
                [DiskRecord(d, str(config.parent / f"{d}.img"), 4096) for d in DISKS],
                state,
            )

    (config.parent / "root").mkdir(exist_ok=True)
    asyncio.run(add())


def test_set_writes_settings_generation_and_pending_config(config: Path, run: Invoke) -> None:
    _add(config)
    code, out = run("set", "web", "--frequency", "30", "--recovery-history", "4", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["changed"]["frequency_seconds"] == {"before": 300, "after": 30}
    assert shown["changed"]["recovery_history"] == {"before": 0, "after": 4}

    async def check() -> None:
        async with _catalog(config) as catalog:
            record = await catalog.vm("web")
            assert (record.settings.frequency_seconds, record.settings.recovery_history) == (30, 4)
            assert await catalog.generation("web") == 1
            assert await catalog.config_pending("web")
            events = await history.events(catalog, "web")
            assert events[-1].event_id == EventId.SETTINGS_CHANGED
            assert "frequency_seconds 300 -> 30" in events[-1].message

    asyncio.run(check())
    assert run("set", "web", "--frequency", "30") == (
        0,
        "VM web: those are its settings already; nothing changed",
    )
    code, out = run("set", "web", "--bandwidth", "10M", "--json")
    assert json.loads(out)["changed"] == {
        "bandwidth_bytes_per_second": {"before": None, "after": 10 << 20}
    }
    code, out = run("set", "web", "--bandwidth", "off", "--json")
    assert json.loads(out)["settings"]["bandwidth_bytes_per_second"] is None


def test_set_before_the_seed_changes_disks_and_replica_site(config: Path, run: Invoke) -> None:
    _add(config)
    code, out = run("set", "web", "--exclude-disk", "d1", "--replica-site", "site-c", "--json")
    assert code == 0, out

    async def check() -> None:
        async with _catalog(config) as catalog:
            record = await catalog.vm("web")
            assert [d.name for d in record.disks] == ["d0"]
            assert record.partner_site == "site-c"
            assert record.settings.excluded_disks == ("d1",)

    asyncio.run(check())
    code, out = run("set", "web", "--include-disk", f"d1={config.parent / 'nope.img'}")
    assert (code, out.split(":")[0]) == (2, "error")
    assert "nope.img is not a file" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["set", "web"], 2, "was given nothing to change"),
        (["set", "web", "--frequency", "45"], 2, "--frequency must be 30, 300, 900 or continuous"),
        (["set", "web", "--app-consistent-hours", "13"], 2, "must be 1-12 or off"),
        (["set", "web", "--recovery-history", "30"], 2, "Invalid value for '--recovery-history'"),
        (["set", "nope", "--frequency", "30"], 2, "VM 'nope' is not replicated at this site"),
        (["set", "web", "--exclude-disk", "d1"], 1, "cannot change once its initial replication"),
        (["set", "web", "--replica-site", "site-c"], 1, "holds nothing of it"),
        (["set", "web", "--encrypt"], 2, "no authorization entry for replica site 'site-b'"),
        (["set", "web", "--bandwidth", "1K"], 2, "below the least allowed, 65536"),
        (["set", "web", "--bandwidth", "fast"], 2, "--bandwidth 'fast': expected a size"),
    ],
)
def test_set_mistakes_and_refusals(
    config: Path, run: Invoke, args: list[str], code: int, message: str
) -> None:
    _add(config, state=ReplicationState.REPLICATING)
    got, out = run(*args)
    assert got == code, out
    assert message in out


def test_set_on_a_replica_or_during_a_failover(config: Path, run: Invoke) -> None:
    _add(config, role="replica", state=ReplicationState.REPLICATING)
    code, out = run("set", "web", "--frequency", "30")
    assert code == 2
    assert "is a replica at site site-a: its settings are its primary's" in out

    async def prepare() -> None:
        async with _catalog(config) as catalog:
            await catalog.remove_vm("web")

    asyncio.run(prepare())
    _add(config, state=ReplicationState.PREPARED_FOR_PLANNED_FAILOVER)
    code, out = run("set", "web", "--frequency", "30")
    assert code == 1
    assert "cannot change while its role does" in out


def test_remove_keeps_images_and_is_idempotent(config: Path, run: Invoke) -> None:
    _add(config, role="replica", state=ReplicationState.REPLICATING)
    folder = config.parent / "root" / "vms" / "web"
    (folder / "undo").mkdir(parents=True)

    async def test_failover(on: bool) -> None:
        async with _catalog(config) as catalog:
            await catalog.advance_position("web", Position(1, 3, b"", 10, 0))
            if on:
                await catalog.set_test_failover("web", 3, "serving")
            else:
                await catalog.clear_test_failover("web")

    asyncio.run(test_failover(True))
    code, out = run("remove", "web")
    assert code == 1
    assert "failover stop-test web" in out
    asyncio.run(test_failover(False))
    code, out = run("remove", "web")
    assert code == 0, out
    assert "replication of VM web removed at site site-a (it was replica here)" in out
    assert f"d0: {config.parent / 'd0.img'}" in out
    assert not folder.exists()
    (moved,) = (config.parent / "root" / "removed").iterdir()
    assert (moved / "undo").is_dir()
    assert run("remove", "web") == (
        0,
        "VM web was already removed at this site; nothing more to do",
    )

    async def check() -> None:
        async with _catalog(config) as catalog:
            assert await catalog.find_vm("web") is None
            assert await catalog.removed_vms() == {"web"}
            assert (await history.events(catalog, "web"))[-1].event_id == (
                EventId.REPLICATION_REMOVED
            )

    asyncio.run(check())
    code, out = run("remove", "nope")
    assert code == 2
    assert "VM 'nope' is not replicated at this site" in out


def test_remove_refused_while_a_failover_waits_completion(config: Path, run: Invoke) -> None:
    _add(config, role="replica", state=ReplicationState.FAILED_OVER_WAITING_COMPLETION)
    code, out = run("remove", "web")
    assert code == 1
    assert "failover complete web" in out


def test_initial_stop_holds_the_seed_and_start_releases_it(config: Path, run: Invoke) -> None:
    _add(config, state=ReplicationState.INITIAL_REPLICATION_IN_PROGRESS)
    code, out = run("initial", "stop", "web")
    assert code == 0, out
    assert "stopped with 0 of 8192 bytes examined" in out
    assert run("initial", "stop", "web")[1] == (
        "the initial replication of VM web is already stopped; nothing to do"
    )

    async def held() -> tuple[ReplicationState, bool, int]:
        async with _catalog(config) as catalog:
            record = await catalog.vm("web")
            return record.state, await catalog.seed_held("web"), await catalog.generation("web")

    assert asyncio.run(held()) == (ReplicationState.READY_FOR_INITIAL_REPLICATION, True, 1)
    code, out = run("initial", "start", "web")
    assert (code, "goes on where it stopped" in out) == (0, True)
    assert asyncio.run(held())[1] is False
    assert "is not stopped" in run("initial", "start", "web")[1]


@pytest.mark.parametrize(
    ("role", "state", "code", "message"),
    [
        ("replica", ReplicationState.INITIAL_REPLICATION_IN_PROGRESS, 2, "on its primary"),
        ("primary", ReplicationState.REPLICATING, 1, "its initial replication is over"),
    ],
)
def test_initial_stop_mistakes_and_refusals(
    config: Path, run: Invoke, role: str, state: ReplicationState, code: int, message: str
) -> None:
    _add(config, role=role, state=state)
    got, out = run("initial", "stop", "web")
    assert (got, message in out) == (code, True), out
