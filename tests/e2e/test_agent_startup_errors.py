"""An agent that cannot start says why in one line and exits 2, without a traceback.

Each case runs ``python -m vmreplica.cli agent --config ...`` as a process, the way an operator
or systemd starts it, with one setting it cannot work with: a metrics or NBD port another process
holds, a storage root or NBD socket folder it cannot use, a metrics address that is no address.
None of them needs a broker: the agent refuses before it connects.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def start_agent(config: Path) -> tuple[int, list[str]]:
    """Run the agent; its exit code and the lines it wrote to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", "agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "80"},
    )
    assert "Traceback" not in done.stderr + done.stdout
    return done.returncode, done.stderr.splitlines()


def site_file(folder: Path, **settings: object) -> Path:
    values = {
        "site": "site-a",
        "root": str(folder / "root"),
        "bootstrap_servers": "127.0.0.1:1",
        **settings,
    }
    path = folder / "site.toml"
    path.write_text(
        "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in values.items())
    )
    return path


@contextlib.contextmanager
def listening() -> Iterator[int]:
    """A loopback port another process (this one) listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_a_taken_metrics_port(tmp_path: Path) -> None:
    with listening() as port:
        code, stderr = start_agent(site_file(tmp_path, metrics_port=port))
    assert code == 2
    assert stderr == [
        f"error: cannot listen on 127.0.0.1 port {port} (`metrics_port`): Address already in "
        f"use. Operator action: stop the process that listens there (`ss -ltnp 'sport = "
        f":{port}'` names it), or set `metrics_port` to a free port (0: any free port)."
    ]


def test_a_taken_nbd_tcp_port(tmp_path: Path) -> None:
    with listening() as port:
        code, stderr = start_agent(site_file(tmp_path, nbd_tcp_port=port))
    assert code == 2
    assert len(stderr) == 1
    assert stderr[0].startswith(
        f"error: cannot listen on 127.0.0.1 port {port} "
        "(`nbd_tcp_port`): Address already in use. Operator action: "
    )


def test_a_metrics_address_of_another_host(tmp_path: Path) -> None:
    code, stderr = start_agent(site_file(tmp_path, metrics_port=0, metrics_address="192.0.2.7"))
    assert code == 2
    assert stderr == [
        "error: cannot listen on 192.0.2.7 port 0 (`metrics_port`): Cannot assign requested "
        "address. Operator action: set `metrics_address` to an address of this machine."
    ]


def test_a_metrics_address_that_is_no_address(tmp_path: Path) -> None:
    config = site_file(tmp_path, metrics_port=0, metrics_address="metrics.example")
    code, stderr = start_agent(config)
    assert code == 2
    assert stderr == [
        f"error: invalid site configuration in {config}: metrics_address: Value error, "
        "'metrics.example' is not an IP address (127.0.0.1, 0.0.0.0, ::1, ::, or one of this "
        "host's addresses)"
    ]


def test_a_storage_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.write_text("not a folder")
    code, stderr = start_agent(site_file(tmp_path))
    assert code == 2
    assert stderr == [
        f"error: `root` {root}: the storage root is a file, not a folder. "
        "Operator action: set `root` to a folder, or move the file away."
    ]


def test_a_storage_root_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "root"
    code, stderr = start_agent(site_file(tmp_path, root=str(root)))
    assert code == 2
    assert len(stderr) == 1
    assert stderr[0].startswith(
        f"error: `root` {root}: cannot create the storage root: Not a "
        "directory. Operator action: create it for this user"
    )


def test_an_nbd_socket_folder_too_long_for_a_socket(tmp_path: Path) -> None:
    folder = tmp_path / ("s" * 110)
    code, stderr = start_agent(site_file(tmp_path, nbd_socket_dir=str(folder)))
    assert code == 2
    assert len(stderr) == 1
    assert stderr[0].startswith(f"error: `nbd_socket_dir` {folder}: too long for a Unix socket (")
    assert stderr[0].endswith(
        "Operator action: set `nbd_socket_dir` to a short folder such as /run/vmreplica."
    )


def test_an_nbd_socket_folder_that_is_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "sockets"
    folder.write_text("")
    code, stderr = start_agent(site_file(tmp_path, nbd_socket_dir=str(folder)))
    assert code == 2
    assert stderr == [
        f"error: `nbd_socket_dir` {folder}: the NBD socket folder is a file, not "
        "a folder. Operator action: set `nbd_socket_dir` to a folder, or move the "
        "file away."
    ]
