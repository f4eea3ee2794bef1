"""`vmreplica server show|set` (Get-/Set-VMReplicationServer) without a broker: the file is
changed in place, comments kept, checked before it is replaced, and the settings mean what
they say (a replica storage for adopted VMs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main
from vmreplica.cli.server import with_keys
from vmreplica.config import load_config
from vmreplica.errors import ConfigurationError
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import DiskSize, VmConfig


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        "# site B, the replica\n"
        'site = "site-b"\n'
        f'root = "{tmp_path / "root"}"  # catalog and images\n'
        'bootstrap_servers = "127.0.0.1:1"\n'
    )
    return path


def run(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["server", *args, "--config", str(config)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


def test_with_keys_replaces_in_place_appends_and_removes() -> None:
    text = '# c\na = 1  # one\nb = "x"\n'
    assert with_keys(text, {"a": 2, "c": ["p", "q"], "b": None}) == '# c\na = 2\nc = ["p", "q"]\n'
    with pytest.raises(ConfigurationError, match="spans several lines"):
        with_keys('a = [\n "x",\n]\n', {"a": ["y"]})


def test_show_and_set(config: Path, tmp_path: Path) -> None:
    code, out = run(config, "show", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert (shown["site"], shown["replica_enabled"], shown["allowed_primaries"]) == (
        "site-b",
        True,
        ["*"],
    )
    assert shown["default_storage"] == str(tmp_path / "root" / "vms")
    assert "sasl_password" not in shown
    code, out = run(
        config,
        "set",
        "--no-replica",
        "--default-storage",
        str(tmp_path / "replicas"),
        "--allowed-primary",
        "site-a",
        "--json",
    )
    assert code == 0, out
    changed = json.loads(out)["changed"]
    assert changed["replica_enabled"] == {"before": True, "after": False}
    assert changed["allowed_primaries"] == {"before": ["*"], "after": ["site-a"]}
    text = config.read_text()
    assert text.startswith("# site B, the replica\n")
    assert "# catalog and images" in text
    loaded = load_config(config)
    assert (loaded.replica_enabled, loaded.replica_storage, loaded.allowed_primaries) == (
        False,
        tmp_path / "replicas",
        ("site-a",),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "was given nothing to change"),
        (["--metrics-address", "nope"], "'nope' is not an IP address"),
        (["--security-protocol", "SASL_SSL"], "needs sasl_username; nothing was changed"),
        (["--default-storage", "relative"], "is not an absolute path"),
        (["--allowed-primary", "../x"], "site name '../x' is not allowed"),
    ],
)
def test_set_mistakes_leave_the_file(config: Path, args: list[str], message: str) -> None:
    before = config.read_text()
    code, out = run(config, "set", *args)
    assert code == 2
    assert message in " ".join(out.split())
    assert config.read_text() == before
    assert [p.name for p in config.parent.iterdir() if p.name.startswith(".")] == []


def test_set_needs_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMREPLICA_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["server", "set", "--no-replica"])
    assert result.exit_code == 2
    assert "no site configuration file to change" in result.output


def test_adopted_replicas_go_to_the_default_storage(config: Path, tmp_path: Path) -> None:
    run(config, "set", "--default-storage", str(tmp_path / "replicas"))

    async def adopt() -> str:
        async with Site(load_config(config)) as site:
            record = await site.adopt(
                VmConfig("web", 1, (DiskSize("d0", 4096),), 30, 0, None, "site-a", 0)
            )
            return record.disks[0].path

    assert asyncio.run(adopt()) == str(tmp_path / "replicas" / "web" / "disks" / "d0.img")
