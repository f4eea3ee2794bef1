"""User mistakes at the command line: one clear message, exit code 2, never a traceback."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from vmreplica.cli.main import main

Invoke = Callable[..., tuple[int, str]]


@pytest.fixture
def run(tmp_path: Path) -> Invoke:
    config = tmp_path / "site.toml"
    config.write_text(
        f'site = "site-a"\nroot = "{tmp_path / "root"}"\nbootstrap_servers = "127.0.0.1:1"\n'
    )
    disk = tmp_path / "disk0.img"
    disk.write_bytes(bytes(4096))

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert "Traceback" not in result.output
        return result.exit_code, " ".join(result.output.split())

    return invoke


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["enable", "../etc", "--disk", "d=/x", "--replica-site", "b"],
            "VM name '../etc' is not allowed",
        ),
        (
            ["enable", "vm", "--disk", "d0", "--replica-site", "b"],
            "--disk 'd0': expected NAME=PATH",
        ),
        (
            ["enable", "vm", "--disk", "d0=/nonexistent.img", "--replica-site", "b"],
            "/nonexistent.img is not a file",
        ),
        (
            ["enable", "vm", "--disk", "a/b=/x.img", "--replica-site", "b"],
            "disk name 'a/b' is not allowed",
        ),
        (
            ["enable", "vm", "--disk", "d0=/x.img", "--replica-site", "site-a"],
            "cannot replicate to its own site",
        ),
        (
            ["enable", "vm", "--disk", "d0=/x.img", "--replica-site", "b", "--frequency", "60"],
            "--frequency must be 30, 300, 900 or continuous",
        ),
        (
            [
                "enable",
                "vm",
                "--disk",
                "d0=/x.img",
                "--replica-site",
                "b",
                "--recovery-history",
                "4",
                "--app-consistent-hours",
                "6",
            ],
            "application-consistent points every 6 hours would fall outside "
            "a recovery history of 4 hours",
        ),
        (
            ["enable", "vm", "--disk", "d0=/x.img", "--replica-site", "b", "--exclude-disk", "d9"],
            "--exclude-disk 'd9' names no --disk",
        ),
        (
            [
                "enable",
                "vm",
                "--disk",
                "d0=/x.img",
                "--replica-site",
                "b",
                "--hypervisor",
                "qemu:relative.qmp",
            ],
            "--hypervisor 'qemu:relative.qmp': the QMP socket must be an absolute path",
        ),
        (
            [
                "enable",
                "vm",
                "--disk",
                "d0=/x.img",
                "--replica-site",
                "b",
                "--hypervisor",
                "xen:dom",
            ],
            "--hypervisor 'xen:dom': expected qemu:",
        ),
        (
            [
                "enable",
                "vm",
                "--disk",
                "d0=/x.img",
                "--replica-site",
                "b",
                "--post-cut-hook",
                "true",
            ],
            "--post-cut-hook undoes what --pre-cut-hook did; give --pre-cut-hook too",
        ),
        (["points", "list", "ghost"], "VM 'ghost' is not replicated at this site"),
        (["failover", "complete", "ghost"], "VM 'ghost' is not replicated at this site"),
    ],
)
def test_mistakes_get_one_clear_message(run: Invoke, args: list[str], message: str) -> None:
    code, output = run(*args)
    assert code == 2
    assert output.startswith("error:")
    assert message in output


def test_bad_configuration_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('site = "has space"\n')
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 2
    assert "invalid site configuration in" in result.output
    assert "site or trust group name 'has space' is not allowed" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "site-a,site-b,site-c"], "each of the 3 nodes"),
        (["--brokers", "3", "--sites", "site-a,site-b"], "got 2 for 3 nodes"),
        (["--brokers", "3", "--sites", "a,a,b"], "names a site twice"),
    ],
)
def test_broker_up_refuses_sites_a_stretched_cluster_cannot_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setenv("VMREPLICA_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["broker", "up", *args])
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "broker").exists()  # refused before anything was started


def test_long_work_says_how_far_it_got_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a terminal: no bar, a plain line at most every LOG_PROGRESS_SECONDS."""
    from vmreplica.cli import support  # noqa: PLC0415

    log = io.StringIO()
    monkeypatch.setattr(support, "errors", Console(file=log, force_terminal=False, width=200))
    monkeypatch.setattr(support, "LOG_PROGRESS_SECONDS", 0.0)
    with support.progress("resync of web01") as advance:
        advance(3 << 29, 4 << 30, "sending")
    monkeypatch.setattr(support, "LOG_PROGRESS_SECONDS", 3600.0)
    with support.progress("resync of web02") as advance:
        advance(1, 2)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("resync of web01: sending, 1.5 GiB of 4.0 GiB, ")
