"""The end of ``make demo``: both sites' agents run with Prometheus metrics for a moment, the
demo prints where they serve them and a few of their figures, then `vmreplica measure`'s
statistics table of the VM at each site.

The metrics listen on any free port (``metrics_port = 0``); each agent says which in its log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from vmreplica.cli.operations import statistics_table

STARTUP_SECONDS: Final = 60.0
"""How long an agent may take to start and publish its first gauges."""
_URL: Final = re.compile(r"metrics on (http://\S+/metrics)")
_SHOWN: Final = ("vmreplica_vm_health", "vmreplica_rpo_seconds", "vmreplica_last_cycle")


def _vmreplica(config: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "vmreplica.cli", *args, "--config", str(config)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _metrics_url(log: Path, agent: subprocess.Popen[bytes]) -> str:
    """The URL the agent logs once it serves its metrics; then wait for its first gauges."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and agent.poll() is None:
        found = _URL.search(log.read_text(errors="replace"))
        if found:
            url = found.group(1)
            while time.monotonic() < deadline:
                if "vmreplica_vm_state{" in _scrape(url):
                    return url
                time.sleep(0.5)
        time.sleep(0.2)
    raise RuntimeError(f"the agent did not serve its metrics; see {log}")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _figures(text: str) -> list[str]:
    """The health that holds (value 1), the RPO and the last cycle, as exposed."""
    return [
        line for line in text.splitlines() if line.startswith(_SHOWN) and not line.endswith(" 0.0")
    ]


def closing(work: Path, configs: Sequence[Path], console: Console) -> None:
    """Run the agent of each site (``configs``) with metrics, print their URLs and figures,
    stop them, then print `vmreplica measure` of every site."""
    agents: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for config in configs:
            log = work / f"{config.stem}-metrics-agent.log"
            env = {**os.environ, "VMREPLICA_CONFIG": str(config), "VMREPLICA_METRICS_PORT": "0"}
            with log.open("wb") as output:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "vmreplica.cli", "agent"],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            agents.append((agent, log))
        for config, (agent, log) in zip(configs, agents, strict=True):
            url = _metrics_url(log, agent)
            console.print(f"[bold]{config.stem}[/]: Prometheus metrics at {url}")
            for line in _figures(_scrape(url)):
                console.print(f"  {line}", highlight=False, soft_wrap=True)
    finally:
        for agent, _ in agents:
            agent.terminate()
        for agent, _ in agents:
            agent.wait(timeout=30)
    rows: list[dict[str, Any]] = []
    for config in configs:
        for row in json.loads(_vmreplica(config, "measure", "--json")):
            rows.append(row | {"vm": f"{row['vm']} @ {config.stem} ({row['role']})"})
    console.print(statistics_table(rows))
    console.print("(`vmreplica measure VM --json` on either site; `vmreplica events` for history)")
