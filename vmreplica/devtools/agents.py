"""Two sites' agents as processes, and an NBD client that writes like a hypervisor: what the
benchmarks that run real agents (``benchmarks/scale.py``, ``benchmarks/rpo.py``) share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vmreplica.config import SiteConfig
from vmreplica.nbd import protocol as wire

AGENT_STOP_SECONDS: Final = 90.0


class BenchmarkError(RuntimeError):
    """The benchmark could not run (as opposed to a missed target)."""


# --- an NBD writer: the hypervisor of every VM, in this event loop -------------------------------


class NbdWriter:
    """One NBD connection to one export: WRITE and FLUSH, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._cookie = 0

    @classmethod
    async def open(cls, socket_path: Path, export: str) -> NbdWriter:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        await reader.readexactly(18)  # greeting: NBDMAGIC, IHAVEOPT, handshake flags
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        writer.write(
            struct.pack(">I", wire.KNOWN_CLIENT_FLAGS)
            + wire.OPTION_HEADER.pack(wire.IHAVEOPT, wire.NBD_OPT_GO, len(data))
            + data
        )
        while True:
            _, _, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
            body = await reader.readexactly(length)
            if reply == wire.NBD_REP_ACK:
                return cls(reader, writer)
            if reply & (1 << 31):
                writer.close()
                raise BenchmarkError(f"{socket_path}: NBD_OPT_GO refused: {body!r}")

    async def _request(self, command: int, offset: int = 0, data: bytes = b"") -> None:
        self._cookie += 1
        length = len(data)
        self._writer.write(
            wire.REQUEST_HEADER.pack(
                wire.NBD_REQUEST_MAGIC, 0, command, self._cookie, offset, length
            )
            + data
        )
        _, error, cookie = wire.SIMPLE_REPLY.unpack(
            await self._reader.readexactly(wire.SIMPLE_REPLY.size)
        )
        if error or cookie != self._cookie:
            raise BenchmarkError(f"NBD command {command} at {offset} failed: error {error}")

    async def write(self, offset: int, data: bytes) -> None:
        await self._request(wire.NBD_CMD_WRITE, offset, data)

    async def flush(self) -> None:
        await self._request(wire.NBD_CMD_FLUSH)

    async def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self._writer.write(wire.REQUEST_HEADER.pack(wire.NBD_REQUEST_MAGIC, 0, 2, 0, 0, 0))
            self._writer.close()
            await self._writer.wait_closed()


# --- sites and agents ----------------------------------------------------------------------------


@dataclass
class Sites:
    """Sites A and B of one round: their configuration files and settings."""

    folder: Path
    bootstrap: str
    group: str = field(default_factory=lambda: f"scale{uuid.uuid4().hex[:8]}")
    ports: dict[str, int] = field(default_factory=dict)

    def config(self, site: str) -> SiteConfig:
        return SiteConfig(
            site=site,
            root=self.folder / site,
            bootstrap_servers=self.bootstrap,
            trust_group=self.group,
            nbd_socket_dir=self.folder / f"s{site[-1]}",
            metrics_port=self.ports[site],
        )

    def config_file(self, site: str) -> Path:
        config = self.config(site)
        settings = {
            "site": config.site,
            "root": str(config.root),
            "bootstrap_servers": config.bootstrap_servers,
            "trust_group": config.trust_group,
            "nbd_socket_dir": str(config.nbd_socket_dir),
            "metrics_port": config.metrics_port,
        }
        path = self.folder / f"{site}.toml"
        # A JSON string or number is a valid TOML value.
        path.write_text("".join(f"{key} = {json.dumps(v)}\n" for key, v in settings.items()))
        return path


class AgentProcess:
    """``vmreplica agent --config <site>.toml`` as a process, its log in ``<site>.log``."""

    def __init__(self, sites: Sites, site: str) -> None:
        self.site = site
        self.log = sites.folder / f"{site}.log"
        profile = os.environ.get("VMREPLICA_BENCH_PROFILE")
        profiler = ["-m", "cProfile", "-o", f"{profile}/{site}-{sites.group}.prof"]
        self.command = [
            sys.executable,
            *(profiler if profile else []),
            "-m",
            "vmreplica.cli",
            "agent",
            "--config",
            str(sites.config_file(site)),
        ]
        self.metrics_url = f"http://127.0.0.1:{sites.ports[site]}/metrics"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        if self.process is None or self.process.poll() is not None:
            raise BenchmarkError(
                f"the agent of {self.site} is not running; its log:\n{self.tail()}"
            )
        return self.process.pid

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-20:])

    def problems(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join([line for line in lines if "WARNING" in line or "ERROR" in line][-15:])

    def metric_sum(self, name: str, exclude_vm: str | None = None) -> float:
        """The sum of a metric's samples over every VM (but ``exclude_vm``)."""
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (exclude_vm is None or f'vm="{exclude_vm}"' not in line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(AGENT_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def catalog_rows(config: SiteConfig, sql: str) -> list[tuple[object, ...]]:
    """Rows of a query on a site's catalog, read while its agent runs (SQLite allows it)."""
    with contextlib.closing(sqlite3.connect(config.catalog_path, timeout=30)) as db:
        return list(db.execute(sql).fetchall())


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
