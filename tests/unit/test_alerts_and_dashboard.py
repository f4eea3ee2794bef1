"""The alert rules and the Grafana dashboard in ``deploy/``, checked with Prometheus's promtool.

No Grafana server can run here, so the dashboard is checked the way Prometheus would see it:
every panel's query runs through ``promtool test rules`` (``promql_expr_test``) against series
named exactly as the agent exports them — taken from the exposition of real
:class:`SiteMetrics` objects fed a small fleet — and must find something. A metric name the
agent does not export (a typo, or a metric renamed without its dashboard) finds nothing and
fails, as the last test shows by breaking one on purpose. The alert rules get their own
``promtool test rules`` unit tests (``deploy/prometheus/tests/``), and every name they and
their input series use must also be one the agent exports.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vmreplica.domain.model import DiskRecord, Position, Role, VmRecord, VmSettings
from vmreplica.domain.states import Health, HealthReport, ReplicationState
from vmreplica.runtime.metrics import CycleStat, SiteMetrics
from vmreplica.runtime.status import CaptureStatus, PrimaryProgress, ReplicaProgress, VmStatus

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
RULES: Final = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS: Final = sorted((REPO_ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD: Final = REPO_ROOT / "deploy" / "grafana" / "vmreplica.json"
GRAFANA_VARIABLES: Final = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$__interval": "1m",
    "${site}": ".*",
    "$site": ".*",
    "${vm}": ".*",
    "$vm": ".*",
}
"""What Grafana would put in a query, with "All" chosen for the site and VM variables."""
NOT_THE_AGENTS: Final = frozenset({"up"})
"""Series Prometheus itself makes, which the dashboard and the rules also use."""
NAME: Final = re.compile(r"\b(vmreplica_[a-z0-9_]+|up)\b")
NOW_MS: Final = 1_800_000_000_000
SERIES_MINUTES: Final = 70
EVAL_TIME: Final = "60m"


# A small fleet, as two agents export it ---------------------------------------------------------


def _status(
    name: str, role: Role, state: ReplicationState, health: Health, epoch: int, cycle: int
) -> VmStatus:
    record = VmRecord(
        name,
        role,
        "tg",
        "site-b" if role == "primary" else "site-a",
        VmSettings(frequency_seconds=30),
        epoch,
        state,
        "",
        NOW_MS - 3_600_000,
        (DiskRecord("disk0", f"/images/{name}.img", 1 << 30),),
    )
    progress: PrimaryProgress | ReplicaProgress = (
        PrimaryProgress(cycle, 65536, None, None)
        if role == "primary"
        else ReplicaProgress(cycle, 24)
    )
    return VmStatus(
        record,
        CaptureStatus("nbd"),
        HealthReport(health, ()),
        12.0,
        110,
        progress,
        synced_at_ms=NOW_MS - 12_000,
    )


def _cycles(count: int, latency_ms: int) -> list[CycleStat]:
    return [
        CycleStat(
            cycle,
            NOW_MS - (count - cycle) * 30_000 - latency_ms,
            NOW_MS - (count - cycle) * 30_000,
            4096 * cycle,
        )
        for cycle in range(1, count + 1)
    ]


def fleet() -> dict[str, SiteMetrics]:
    """Site A is web01's primary; site B its replica, and db01's new primary after an
    unplanned failover (failed over, health warning)."""
    clock = lambda: NOW_MS / 1000  # noqa: E731
    site_a, site_b = SiteMetrics("site-a", clock), SiteMetrics("site-b", clock)
    site_a.started_ms = site_b.started_ms = NOW_MS - 3_600_000
    shipped = _cycles(12, 700)
    site_a.update(
        _status("web01", "primary", ReplicationState.REPLICATING, Health.NORMAL, 1, 12),
        shipped,
        Position(1, 12, bytes(32), 99, NOW_MS),
    )
    site_a.written("web01", 1 << 20)
    site_a.failed("web01", "network")
    site_b.update(
        _status("web01", "replica", ReplicationState.REPLICATING, Health.NORMAL, 1, 11),
        _cycles(11, 2_500),
        Position(1, 11, bytes(32), 90, NOW_MS),
    )
    site_b.applied("web01", 0.04, 11)
    site_b.update(
        _status("db01", "primary", ReplicationState.FAILED_OVER, Health.WARNING, 2, 7),
        _cycles(7, 900),
        Position(2, 7, bytes(32), 70, NOW_MS),
    )
    site_b.failover("db01", "unplanned")
    return {"site-a:9102": site_a, "site-b:9102": site_b}


def exported_samples() -> Iterator[tuple[str, str, dict[str, str], float]]:
    """(instance, sample name, labels, value) of every sample the fleet's agents serve."""
    for instance, metrics in fleet().items():
        text = generate_latest(metrics.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                yield instance, sample.name, dict(sample.labels), float(sample.value)


def exported_names() -> set[str]:
    return {name for _, name, _, _ in exported_samples()}


def input_series() -> list[dict[str, str]]:
    """The fleet's samples as promtool input series, with Prometheus's ``instance`` and ``job``:
    counters and histograms grow by their value each minute, gauges hold it; plus ``up``."""
    counters = {
        f.name
        for m in fleet().values()
        for f in m.registry.collect()
        if f.type in ("counter", "histogram")
    }
    series = []
    for instance, name, labels, value in exported_samples():
        scraped = {"instance": instance, "job": "vmreplica", **labels}
        selector = ",".join(f'{key}="{text}"' for key, text in sorted(scraped.items()))
        grows = any(name.startswith(counter) for counter in counters)
        values = f"0+{value:g}x{SERIES_MINUTES}" if grows else f"{value:g}x{SERIES_MINUTES}"
        series.append({"series": f"{name}{{{selector}}}", "values": values})
    for instance in fleet():
        series.append(
            {
                "series": f'up{{instance="{instance}",job="vmreplica"}}',
                "values": f"1x{SERIES_MINUTES}",
            }
        )
    return series


# The dashboard's queries -------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # the panels of a collapsed row


def queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """``{"<panel title> [<refId>]": PromQL}`` with Grafana's variables filled in."""
    found = {}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found[f"{panel['title']} [{target['refId']}]"] = expr
    return found


def failing_queries(dashboard: dict[str, Any], folder: Path) -> dict[str, str]:
    """Each query that does not run or finds nothing, with what promtool said."""
    series = input_series()
    failures = {}
    for title, expr in queries(dashboard).items():
        test = {
            "rule_files": [],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": series,
                    "promql_expr_test": [
                        {
                            # 1 when the query returns at least one sample, 0 when it returns none
                            "expr": f"(count({expr}) > bool 0) or vector(0)",
                            "eval_time": EVAL_TIME,
                            "exp_samples": [{"labels": "{}", "value": 1}],
                        }
                    ],
                }
            ],
        }
        path = folder / "query_test.yml"
        path.write_text(json.dumps(test))  # JSON is YAML
        run = subprocess.run(
            ["promtool", "test", "rules", str(path)], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            failures[title] = run.stdout + run.stderr
    return failures


# Tests -------------------------------------------------------------------------------------------


def test_the_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert RULE_TESTS
    tested = subprocess.run(
        ["promtool", "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_alerts_cover_what_an_operator_needs() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    assert alerts == {
        "VmReplicationRpoExceeded",
        "VmReplicationMissedCycles",
        "VmReplicationResyncRequired",
        "VmReplicationAgentDown",
        "VmReplicationFailuresIncreasing",
        "VmReplicationCritical",
        "VmReplicationWarning",
    }
    tested = {
        name for path in RULE_TESTS for name in re.findall(r"alertname: (\w+)", path.read_text())
    }
    assert tested == alerts


def test_the_rules_and_their_tests_name_only_series_the_agent_exports() -> None:
    exported = exported_names() | NOT_THE_AGENTS
    for path in (RULES, *RULE_TESTS):
        used = set(NAME.findall(path.read_text()))
        assert used - exported == set(), path.name


def test_the_dashboard_names_only_series_the_agent_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set(NAME.findall(json.dumps(dashboard["templating"])))
    for expr in queries(dashboard).values():
        used |= set(NAME.findall(expr))
    assert used - (exported_names() | NOT_THE_AGENTS) == set()


def test_the_dashboard_has_the_sections_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Fleet overview", "RPO and lag", "Throughput", "Health", "Failover history"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert len(queries(dashboard)) >= 30


def test_every_dashboard_query_runs_and_finds_the_agents_series(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert failing_queries(dashboard, tmp_path) == {}


def test_a_misspelt_metric_name_in_a_panel_fails(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    broken = copy.deepcopy(dashboard)
    for panel in panels(broken):
        if panel["title"] == "RPO per VM":
            target = panel["targets"][0]
            target["expr"] = target["expr"].replace("vmreplica_rpo_seconds", "vmreplica_rpo_second")
    failures = failing_queries(broken, tmp_path)
    assert list(failures) == ["RPO per VM [A]"]
    assert "exp: {} 1E+00" in failures["RPO per VM [A]"]
    assert "got: {} 0E+00" in failures["RPO per VM [A]"]
