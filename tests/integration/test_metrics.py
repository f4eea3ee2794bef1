"""The agents' /metrics: real cycles counted once, valid for Prometheus's own tools.

A primary and a replica agent run in this process against the session's broker, each serving
metrics on a port of its own; a VM replicates continuously (a cycle every second that something
was written) while a program writes to it. Scrapes over HTTP must show the cycles shipped and
applied, their bytes and latencies, the RPO and the state by name, pass ``promtool check
metrics``, and the counters must equal the cycles the catalogs recorded — the durable record
they are derived from. Then a real Prometheus server (Debian's) scrapes the pair with the alert
rules of ``deploy/`` loaded: what it stores agrees with ``vmreplica status --json`` and the
catalog, and stopping the primary's agent makes ``VmReplicationAgentDown`` pending.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import synced_at_ms
from vmreplica.runtime.agent import Agent
from vmreplica.runtime.metrics import CycleStat

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("promtool") is None or shutil.which("prometheus") is None,
        reason="needs Prometheus (promtool and the server)",
    ),
]
REPO_ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def wait_for(
    url: str, ready: Callable[[Samples], bool], what: str, timeout_seconds: float = 60.0
) -> str:
    deadline = time.monotonic() + timeout_seconds
    while True:
        text = await asyncio.to_thread(scrape, url)
        if ready(samples(text)):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape:\n{text}")
        await asyncio.sleep(0.5)


@dataclass
class Pair:
    """A primary (A) and a replica (B) agent running in this process, one VM replicating."""

    agent_a: Agent
    agent_b: Agent
    vm: str
    tasks: list[asyncio.Task[None]]
    writer: asyncio.Task[None] | None = None
    """Writes to the VM now and then: an idle VM ships no cycle."""

    @property
    def url_a(self) -> str:
        assert self.agent_a.metrics_url is not None
        return self.agent_a.metrics_url

    @property
    def url_b(self) -> str:  # B listens on every address; scraped on loopback
        assert self.agent_b.metrics_url is not None
        return self.agent_b.metrics_url.replace("0.0.0.0", "127.0.0.1")

    async def stop(self, agent: Agent) -> None:
        if agent is self.agent_a and self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
        agent.stop()
        await self.tasks[0 if agent is self.agent_a else 1]


async def keep_writing(agent: Agent, vm: str) -> None:
    """A program writing to the VM twice a second, so that cycles keep coming."""
    primary = await agent.primary(vm, 60)
    for turn in range(10**6):
        await primary.capture.write("disk0", (turn % 16) * 64 * KiB, bytes([turn % 251]) * 4096)
        await primary.capture.flush()
        await asyncio.sleep(0.5)


@pytest.fixture
async def pair(sites: SiteFactory, vm: VmFactory) -> AsyncIterator[Pair]:
    site_a = await sites.start("site-a", metrics_port=0, heartbeat_seconds=1.0)
    site_b = await sites.start(
        "site-b", metrics_port=0, metrics_address="0.0.0.0", heartbeat_seconds=1.0
    )
    name = (await vm(site_a, {"disk0": 1024 * KiB}, VmSettings(frequency_seconds=0))).name
    agent_a, agent_b = Agent(site_a), Agent(site_b)
    running = Pair(
        agent_a, agent_b, name, [asyncio.create_task(agent.run()) for agent in (agent_a, agent_b)]
    )
    try:
        primary = await agent_a.primary(name, 60)
        await primary.capture.write("disk0", 0, b"\x5a" * (64 * KiB))
        await primary.capture.flush()
        running.writer = asyncio.create_task(keep_writing(agent_a, name))
        # both listen before anything else: the primary above is open, so both agents run
        assert agent_a.metrics_url is not None
        assert agent_b.metrics_url is not None
        assert agent_b.metrics_url.startswith("http://0.0.0.0:")
        yield running
    finally:
        if running.writer is not None:
            running.writer.cancel()
        for agent in (agent_a, agent_b):
            agent.stop()
        await asyncio.gather(
            *running.tasks, *[running.writer] if running.writer else [], return_exceptions=True
        )


async def test_a_replicating_pair_counts_real_cycles_and_passes_promtool(pair: Pair) -> None:
    name = pair.vm
    agent_a, agent_b = pair.agent_a, pair.agent_b
    a = {"site": "site-a", "vm": name}
    b = {"site": "site-b", "vm": name}
    text_a = await wait_for(
        pair.url_a,
        lambda found: (
            (value(found, "vmreplica_cycles_shipped_total", **a) or 0) >= 3
            and (value(found, "vmreplica_written_bytes_total", **a) or 0) >= 64 * KiB
        ),
        "site A to ship three cycles",
    )
    text_b = await wait_for(
        pair.url_b,
        lambda found: (
            (value(found, "vmreplica_cycles_applied_total", **b) or 0) >= 3
            and value(found, "vmreplica_rpo_seconds", **b, role="replica") is not None
        ),
        "site B to apply three cycles",
    )
    for agent in (agent_a, agent_b):
        await pair.stop(agent)

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
        assert (
            value(
                found,
                "vmreplica_cycles_failed_total",
                site=labels["site"],
                vm=name,
                reason="network",
            )
            == 0
        )
    assert (
        value(
            found_a,
            "vmreplica_agent_info",
            site="site-a",
            version=importlib.metadata.version("vmreplica"),
        )
        == 1
    )

    # Every counted cycle is a row of the catalog's statistics, and every row up to the last
    # refresh is counted: the counters count real, durable events, each once.
    for agent, counter, size in (
        (agent_a, "vmreplica_cycles_shipped_total", "vmreplica_sent_bytes_total"),
        (agent_b, "vmreplica_cycles_applied_total", "vmreplica_applied_bytes_total"),
    ):
        metrics = agent.metrics
        rows = [
            CycleStat(*row)
            for row in await agent.site.catalog.cycle_stats(name, metrics.started_ms)
        ]
        counted = [row for row in rows if row.done_at_ms <= metrics.since_ms(name)]
        labels = {"site": agent.site.config.site, "vm": name}
        assert len(counted) >= 3
        assert metrics.registry.get_sample_value(counter, labels) == len(counted)
        assert metrics.registry.get_sample_value(size, labels) == sum(
            row.size_bytes for row in counted
        )

    check_with_promtool(text_a)
    check_with_promtool(text_b)


def check_with_promtool(text: str) -> None:
    """Prometheus's own linter finds nothing in a real scrape."""
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, text=True, capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


class PrometheusServer:
    """Debian's Prometheus server scraping the agents every second, with ``deploy/``'s rules."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": "vmreplica", "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            self.log.flush()
            raise AssertionError(
                f"prometheus exited with {self.process.returncode}; see {self.log.name}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]

    def query(self, promql: str) -> list[tuple[dict[str, str], float, float]]:
        """(labels, evaluation time, value) of each sample of an instant query."""
        return [
            (r["metric"], float(r["value"][0]), float(r["value"][1]))
            for r in self.api("query", query=promql)["result"]
        ]

    def one(self, promql: str) -> float | None:
        found = self.query(promql)
        assert len(found) <= 1, found
        return found[0][2] if found else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


async def until(check: Callable[[], bool], what: str, timeout_seconds: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def test_a_prometheus_server_scrapes_the_pair_and_evaluates_the_rules(
    pair: Pair, sites: SiteFactory, tmp_path: Path
) -> None:
    name = pair.vm
    target_a = pair.url_a.removeprefix("http://").removesuffix("/metrics")
    target_b = pair.url_b.removeprefix("http://").removesuffix("/metrics")
    prometheus = PrometheusServer(tmp_path, [target_a, target_b])
    b = f'site="site-b", vm="{name}"'
    try:
        await until(prometheus.ready, "Prometheus to start")
        await until(
            lambda: (prometheus.one(f"vmreplica_cycles_applied_total{{{b}}}") or 0) >= 3,
            "Prometheus to see three cycles applied",
        )
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == {
            "VmReplicationRpoExceeded",
            "VmReplicationMissedCycles",
            "VmReplicationResyncRequired",
            "VmReplicationAgentDown",
            "VmReplicationFailuresIncreasing",
            "VmReplicationCritical",
            "VmReplicationWarning",
        }
        assert {rule["health"] for rule in rules} == {"ok"}, rules

        # The primary's agent stops: nothing more ships, the replica applies the rest, and what
        # Prometheus stores settles where the catalog and `vmreplica status --json` stand.
        await pair.stop(pair.agent_a)
        catalog_b = pair.agent_b.site.catalog
        shipped = await pair.agent_a.site.catalog.position(name)
        assert shipped is not None
        metrics_b = pair.agent_b.metrics

        def settled() -> bool:
            applied = prometheus.one(f"vmreplica_cycles_applied_total{{{b}}}")
            counted = metrics_b.registry.get_sample_value(
                "vmreplica_cycles_applied_total", {"site": "site-b", "vm": name}
            )
            return (
                prometheus.one(f'vmreplica_last_cycle{{{b}, role="replica"}}') == shipped.cycle
                and applied is not None
                and applied == counted
            )

        await until(settled, f"the replica to apply through cycle {shipped.cycle}")
        rows = [CycleStat(*row) for row in await catalog_b.cycle_stats(name, metrics_b.started_ms)]
        assert prometheus.one(f"vmreplica_cycles_applied_total{{{b}}}") == len(rows)
        assert prometheus.one(f"vmreplica_applied_bytes_total{{{b}}}") == sum(
            row.size_bytes for row in rows
        )
        status = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "vmreplica.cli",
                "status",
                name,
                "--json",
                "--config",
                str(
                    sites.config_file(
                        "site-b", metrics_port=0, metrics_address="0.0.0.0", heartbeat_seconds=1.0
                    )
                ),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        [replica] = json.loads(status.stdout)
        assert replica["last_applied_cycle"] == shipped.cycle
        assert (
            prometheus.one(f'vmreplica_last_cycle{{{b}, role="replica"}}')
            == (replica["last_applied_cycle"])
        )
        assert prometheus.one(f'vmreplica_vm_state{{{b}, state="{replica["state"]}"}}') == 1
        assert prometheus.one(f'vmreplica_vm_health{{{b}, health="{replica["health"]}"}}') == 1
        assert prometheus.one(f"vmreplica_recovery_points{{{b}}}") == replica["recovery_points"]
        # ... and where `vmreplica measure --json` stands: one computation behind all three.
        measure = await asyncio.to_thread(
            subprocess.run,
            [*status.args[:3], "measure", *status.args[4:]],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        [measured] = json.loads(measure.stdout)
        assert measured["successful_cycles"] == replica["cycles_in_window"]
        assert prometheus.one(f"vmreplica_cycles_in_window{{{b}}}") == measured["successful_cycles"]
        assert (
            prometheus.one(f"vmreplica_last_successful_cycle_timestamp_seconds{{{b}}}")
            == measured["last_replication_ms"] / 1000
        )
        assert measured["health"] == replica["health"]
        assert measured["failed_cycles"] == {
            "network": 0,
            "replication": 0,
            "application_consistent": 0,
        }

        # The RPO Prometheus stored is the time since the replica was last in sync when it
        # scraped (at most a scrape interval and a little before the query): the last applied
        # cycle's cut, or a later heartbeat of the primary saying nothing waited.
        last = max(rows, key=lambda row: row.cycle)
        assert last.cycle == shipped.cycle
        synced = synced_at_ms(last.cut_at_ms, await catalog_b.last_heartbeat(name))
        assert synced is not None
        [(_, at, rpo)] = prometheus.query(f'vmreplica_rpo_seconds{{{b}, role="replica"}}')
        assert 0 <= (at - synced / 1000) - rpo < 3, (at, synced, rpo)

        # Prometheus can no longer scrape site A: the agent-down alert is pending (for 2m).
        await until(
            lambda: (
                prometheus.one(
                    f'ALERTS{{alertname="VmReplicationAgentDown", instance="{target_a}"}}'
                )
                == 1
            ),
            "VmReplicationAgentDown to be pending",
        )
        [(labels, _, _)] = prometheus.query('ALERTS{alertname="VmReplicationAgentDown"}')
        assert labels["alertstate"] == "pending"
        assert prometheus.one(f'up{{instance="{target_b}"}}') == 1
    finally:
        prometheus.stop()
