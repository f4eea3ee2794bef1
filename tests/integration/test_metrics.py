"""The agent's /metrics: valid for Prometheus's own promtool, states and health by name."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.devtools.ports import free_base_port
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")]
REPO_ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_agent_metrics_pass_promtool_and_name_the_state(
        sites: SiteFactory, vm: VmFactory) -> None:
    port = free_base_port() + 5
    async with sites.site("site-a", metrics_port=port) as site:
        vm_name = (await vm(site, {"disk0": 1024 * 1024}, VmSettings(frequency_seconds=30))).name
        agent = Agent(site)
        running = asyncio.create_task(agent.run())
        text = ""
        for _ in range(50):
            await asyncio.sleep(0.2)
            try:
                text = await asyncio.to_thread(scrape, port)
            except OSError:
                continue
            if f'vm="{vm_name}"' in text and 'state="replicating"} 1.0' in text:
                break
        agent.stop()
        await running
    assert (f'vmreplica_vm_state{{role="primary",site="site-a",state="replicating",'
            f'vm="{vm_name}"}} 1.0') in text
    assert (f'vmreplica_vm_health{{health="normal",role="primary",site="site-a",'
            f'vm="{vm_name}"}}') in text
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
