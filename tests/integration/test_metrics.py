"""The agent's /metrics: valid for Prometheus's own promtool, states and health by name."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.site import Site

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")]
REPO_ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_agent_metrics_pass_promtool_and_name_the_state(
        tmp_path: Path, bootstrap_servers: str, unique: Callable[[str], str]) -> None:
    port = free_base_port() + 5
    vm = unique("vm")
    disk = tmp_path / "disk0.img"
    with disk.open("wb") as file:
        file.truncate(1024 * 1024)
    config = SiteConfig(site="site-a", root=tmp_path / "a", bootstrap_servers=bootstrap_servers,
                        trust_group=unique("tg"), metrics_port=port)
    async with Site(config) as site:
        await site.enable(vm, {"disk0": disk}, "site-b", VmSettings(frequency_seconds=30))
        agent = Agent(site)
        running = asyncio.create_task(agent.run())
        text = ""
        for _ in range(50):
            await asyncio.sleep(0.2)
            try:
                text = await asyncio.to_thread(scrape, port)
            except OSError:
                continue
            if f'vm="{vm}"' in text and 'state="replicating"} 1.0' in text:
                break
        agent.stop()
        await running
    assert f'vmreplica_vm_state{{role="primary",site="site-a",state="replicating",vm="{vm}"}} 1.0' \
        in text
    assert f'vmreplica_vm_health{{health="normal",role="primary",site="site-a",vm="{vm}"}}' in text
    check_with_promtool(text)


def check_with_promtool(text: str) -> None:
    """Prometheus's own checker accepts the exposition and the alert rules."""
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                             capture_output=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = subprocess.run(["promtool", "check", "rules",
                            str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
