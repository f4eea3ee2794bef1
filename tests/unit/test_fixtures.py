"""The site factory of ``tests/fixtures.py``: a ``site.toml`` it writes is the config it builds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import SiteFactory
from vmreplica.config import load_config


def test_a_written_site_toml_loads_as_the_same_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("VMREPLICA_")]:
        monkeypatch.delenv(name)  # the environment would win over the file
    sites = SiteFactory(tmp_path, "127.0.0.1:1", "tg-fixture")
    settings: dict[str, Any] = {
        "heartbeat_seconds": 1.0,
        "metrics_port": 0,
        "allowed_primaries": ("site-a",),
        "nbd_socket_dir": tmp_path / "sockets",
        "vm_stop_command": 'echo "stop {vm}"',
    }
    path = sites.config_file("site-b", **settings)
    assert path == tmp_path / "site-b.toml"
    loaded = load_config(path)
    assert loaded == sites.config("site-b", **settings)
    assert (loaded.site, loaded.root, loaded.bootstrap_servers, loaded.trust_group) == (
        "site-b",
        tmp_path / "site-b",
        "127.0.0.1:1",
        "tg-fixture",
    )
    assert load_config(sites.config_file("site-c", to=tmp_path / "other" / "site.toml")) == (
        sites.config("site-c")
    )
