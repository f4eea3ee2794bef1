"""The agents' /metrics: real cycles counted once, valid for Prometheus's own promtool.

A primary and a replica agent run in this process against the session's broker, each serving
metrics on a port of its own; a VM replicates continuously (a cycle every second) while a
program writes to it. Scrapes over HTTP must show the cycles shipped and applied, their bytes
and latencies, the RPO and the state by name, pass ``promtool check metrics``, and the counters
must equal the cycles the catalogs recorded — the durable record they are derived from.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.metrics import CycleStat

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")]
REPO_ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def wait_for(url: str, ready: Callable[[Samples], bool], what: str,
                   timeout_seconds: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_seconds
    while True:
        text = await asyncio.to_thread(scrape, url)
        if ready(samples(text)):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape:\n{text}")
        await asyncio.sleep(0.5)


async def test_a_replicating_pair_counts_real_cycles_and_passes_promtool(
        sites: SiteFactory, vm: VmFactory) -> None:
    site_a = await sites.start("site-a", metrics_port=0, heartbeat_seconds=1.0)
    site_b = await sites.start("site-b", metrics_port=0, metrics_address="0.0.0.0",
                               heartbeat_seconds=1.0)
    name = (await vm(site_a, {"disk0": 1024 * KiB}, VmSettings(frequency_seconds=0))).name
    agent_a, agent_b = Agent(site_a), Agent(site_b)
    running = [asyncio.create_task(agent.run()) for agent in (agent_a, agent_b)]
    a = {"site": "site-a", "vm": name}
    b = {"site": "site-b", "vm": name}
    try:
        primary = await agent_a.primary(name, 60)
        await primary.capture.write("disk0", 0, b"\x5a" * (64 * KiB))
        await primary.capture.flush()
        # both listen before anything else: the primary above is open, so both agents run
        assert agent_a.metrics_url is not None
        assert agent_b.metrics_url is not None
        assert agent_b.metrics_url.startswith("http://0.0.0.0:")
        url_b = agent_b.metrics_url.replace("0.0.0.0", "127.0.0.1")
        text_a = await wait_for(agent_a.metrics_url, lambda found: (
            (value(found, "vmreplica_cycles_shipped_total", **a) or 0) >= 3
            and (value(found, "vmreplica_written_bytes_total", **a) or 0) >= 64 * KiB),
            "site A to ship three cycles")
        text_b = await wait_for(url_b, lambda found: (
            (value(found, "vmreplica_cycles_applied_total", **b) or 0) >= 3
            and value(found, "vmreplica_rpo_seconds", **b, role="replica") is not None),
            "site B to apply three cycles")
    finally:
        for agent in (agent_a, agent_b):
            agent.stop()
        await asyncio.gather(*running)

    found_a, found_b = samples(text_a), samples(text_b)
    primary_labels = {**a, "role": "primary"}
    assert value(found_a, "vmreplica_vm_state", **primary_labels, state="replicating") == 1
    assert value(found_a, "vmreplica_vm_state", **primary_labels, state="error") == 0
    assert value(found_a, "vmreplica_vm_health", **primary_labels, health="normal") == 1
    assert value(found_b, "vmreplica_vm_state", **b, role="replica", state="replicating") == 1
    shipped = value(found_a, "vmreplica_cycles_shipped_total", **a)
    assert value(found_a, "vmreplica_cycle_ship_latency_seconds_count", **a) == shipped
    assert (value(found_a, "vmreplica_sent_bytes_total", **a) or 0) > 0
    applied = value(found_b, "vmreplica_cycles_applied_total", **b)
    assert value(found_b, "vmreplica_cycle_apply_latency_seconds_count", **b) == applied
    assert (value(found_b, "vmreplica_cycle_apply_duration_seconds_count", **b) or 0) >= 1
    assert (value(found_b, "vmreplica_applied_bytes_total", **b) or 0) > 0
    for found, labels in ((found_a, primary_labels), (found_b, {**b, "role": "replica"})):
        rpo = value(found, "vmreplica_rpo_seconds", **labels)
        assert rpo is not None
        assert 0 <= rpo < 30, rpo  # a cycle a second: the newest write is seconds old
        assert value(found, "vmreplica_cycle_interval_seconds", **labels) == 1
        assert value(found, "vmreplica_cycles_failed_total", site=labels["site"],
                     vm=name, reason="network") == 0
    assert value(found_a, "vmreplica_agent_info", site="site-a",
                 version=_version()) == 1

    # Every counted cycle is a row of the catalog's statistics, and every row up to the last
    # refresh is counted: the counters count real, durable events, each once.
    for agent, counter, size in ((agent_a, "vmreplica_cycles_shipped_total",
                                  "vmreplica_sent_bytes_total"),
                                 (agent_b, "vmreplica_cycles_applied_total",
                                  "vmreplica_applied_bytes_total")):
        metrics = agent.metrics
        rows = [CycleStat(*row) for row in
                await agent.site.catalog.cycle_stats(name, metrics.started_ms)]
        counted = [row for row in rows if row.done_at_ms <= metrics.since_ms(name)]
        labels = {"site": agent.site.config.site, "vm": name}
        assert len(counted) >= 3
        assert metrics.registry.get_sample_value(counter, labels) == len(counted)
        assert metrics.registry.get_sample_value(size, labels) == sum(
            row.size_bytes for row in counted)

    check_with_promtool(text_a)
    check_with_promtool(text_b)


def _version() -> str:
    import importlib.metadata  # noqa: PLC0415

    return importlib.metadata.version("vmreplica")


def check_with_promtool(text: str) -> None:
    """Prometheus's own linter finds nothing in a real scrape."""
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                             capture_output=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""
