"""`vmreplica key` and `vmreplica authorization`: the commands an operator runs to trust a primary.

Each prints JSON with ``--json``; each mistake is one paragraph and exit 2, and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmreplica.cli.main import main


class Cli:
    def __init__(self, folder: Path, site: str) -> None:
        self.config = folder / f"{site}.toml"
        self.root = folder / site
        self.config.write_text(
            f'site = "{site}"\nroot = "{self.root}"\nbootstrap_servers = "127.0.0.1:1"\n'
        )

    def __call__(self, *args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, [*args, "--config", str(self.config)])
        assert "Traceback" not in result.output
        assert result.exit_code == code, result.output
        return result.output


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Cli, Cli]:
    return Cli(tmp_path, "site-a"), Cli(tmp_path, "site-b")


def test_an_operator_trusts_changes_and_removes_a_primary(
    sites: tuple[Cli, Cli], tmp_path: Path
) -> None:
    site_a, site_b = sites
    key = site_a("key", "show").strip()
    assert json.loads(site_a("key", "show", "--json"))["public_key"] == key
    storage = tmp_path / "replicas"
    added = json.loads(
        site_b(
            "authorization",
            "add",
            "--primary",
            "site-*",
            "--storage",
            str(storage),
            "--key",
            key,
            "--json",
        )
    )
    assert added == [
        {"primary": "site-*", "trust_group": "default", "storage": str(storage), "keys": [key]}
    ]
    assert json.loads(site_b("authorization", "list", "--json")) == added

    rotated = json.loads(site_a("key", "rotate", "--json"))
    assert rotated["previous_key"] == key
    assert site_a("key", "show").strip() == rotated["public_key"]
    changed = json.loads(
        site_b(
            "authorization",
            "set",
            "--primary",
            "site-*",
            "--add-key",
            rotated["public_key"],
            "--remove-key",
            key,
            "--json",
        )
    )
    assert changed[0]["keys"] == [rotated["public_key"]]
    out = site_b("authorization", "remove", "--primary", "site-*")
    assert "removed the entry for 'site-*'" in out
    assert json.loads(site_b("authorization", "list", "--json")) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--primary", "a/b", "--storage", "/x", "--key", "KEY"], "is not a site name or pattern"),
        (["--primary", "site-a", "--storage", "rel", "--key", "KEY"], "is not an absolute path"),
        (["--primary", "site-a", "--storage", "/x", "--key", "ed25519:AAAA"], "not a site public"),
        (
            ["--primary", "site-a", "--storage", "/x", "--trust-group", "../g", "--key", "KEY"],
            "trust group name '../g' is not allowed",
        ),
    ],
)
def test_a_bad_entry_is_one_message_and_exit_2(
    sites: tuple[Cli, Cli], args: list[str], message: str
) -> None:
    site_a, site_b = sites
    key = site_a("key", "show").strip()
    argv = [key if arg == "KEY" else arg for arg in args]
    out = site_b("authorization", "add", *argv, code=2)
    assert message in " ".join(out.split())
    assert not (site_b.root / "authorization.json").exists()


def test_changing_an_entry_that_does_not_exist_is_exit_2(sites: tuple[Cli, Cli]) -> None:
    _, site_b = sites
    out = site_b("authorization", "remove", "--primary", "site-z", code=2)
    assert "there is no authorization entry for 'site-z'" in out
    out = site_b("authorization", "set", "--primary", "site-z", "--storage", "/y", code=2)
    assert "authorization list" in out
