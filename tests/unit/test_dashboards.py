"""The Grafana dashboard and the Prometheus alert rules reference only metrics the worker exports.

Names are taken from every PromQL expression (``guardstream_\\w+``) and resolved against the live
registry after importing ``workers.observability.metrics`` and ``workers.observability.build_info``:
a counter ``x`` is exposed as
``x_total``, a histogram ``x`` as ``x_bucket``/``x_sum``/``x_count``, a gauge as ``x``. Label matchers
(``name{label=...}``) and grouping labels (``by (label)``) must be labels of the metric they apply to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

import workers.observability.build_info as build_info
import workers.observability.metrics  # noqa: F401  (registers the worker's metrics)
from infra.stack import free_port
from workers.observability.metrics import start_metrics_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra/grafana/guardstream.json"
RULES = ROOT / "infra/prometheus/alerts.yml"
NAME = re.compile(r"\bguardstream_\w+")
SELECTOR = re.compile(r"\b(guardstream_\w+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposed() -> dict[str, set[str]]:
    """Every series name the registry exposes (even before a labelled metric has a child), with the
    metric's label names (``le`` for histogram buckets)."""
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # the families, including label-only ones
        describe = getattr(collector, "describe", None)
        families = describe() if describe is not None else []
        if not families:
            families = list(collector.collect())
        for fam in families:
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in SUFFIXES.get(fam.type, ("",)):
                out[fam.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            yield f"dashboard panel {panel['title']!r}", t["expr"]


def rule_exprs() -> Iterator[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule['alert']}", rule["expr"]


def problems(where: str, expr: str, series: dict[str, set[str]]) -> list[str]:
    out = [f"{where}: {n} is not exported" for n in NAME.findall(expr) if n not in series]
    for name, body in SELECTOR.findall(expr):
        for label in MATCHER.findall(body):
            if name in series and label not in series[name]:
                out.append(f"{where}: {name} has no label {label!r}")
    for labels, inner in GROUPING.findall(expr):
        names = [n for n in NAME.findall(inner) if n in series]
        for label in filter(None, (x.strip() for x in labels.split(","))):
            if names and not any(label in series[n] for n in names):
                out.append(f"{where}: grouping label {label!r} is on none of {names}")
    return out


def test_every_metric_the_dashboard_and_rules_use_is_exported() -> None:
    series = exposed()
    exprs = [*dashboard_exprs(), *rule_exprs()]
    assert len(exprs) >= 20
    found = [p for where, e in exprs for p in problems(where, e, series)]
    assert not found, "\n".join(found)
    used = {n for _, e in exprs for n in NAME.findall(e)}
    # the panels are all there
    for needed in (
        "guardstream_consumed_total",
        "guardstream_moderated_total",
        "guardstream_dead_letters_total",
        "guardstream_cache_hits_total",
        "guardstream_engine_latency_seconds_bucket",
        "guardstream_in_flight",
        "guardstream_e2e_latency_seconds_bucket",
        "guardstream_consumer_lag",
        "guardstream_ready",
        "guardstream_build_info",
    ):
        assert needed in used, needed


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("sum(rate(guardstream_consumed[5m]))", "guardstream_consumed is not exported"),  # counter w/o _total
        ("rate(guardstream_engine_latency_seconds[5m])", "is not exported"),  # histogram w/o suffix
        ("guardstream_in_flight_total", "is not exported"),  # gauge with a counter suffix
        ('guardstream_dead_letters_total{code="x"}', "has no label 'code'"),
        ("sum by (reason) (guardstream_moderated_total)", "grouping label 'reason'"),
    ],
)
def test_the_checker_catches_wrong_references(expr: str, complaint: str) -> None:
    assert any(complaint in p for p in problems("t", expr, exposed()))


def test_suffixes_resolve_per_type() -> None:
    series = exposed()
    assert "guardstream_consumed_total" in series and "guardstream_consumed" not in series
    assert {"guardstream_e2e_latency_seconds_bucket", "guardstream_e2e_latency_seconds_count"} <= set(series)
    assert "le" in series["guardstream_e2e_latency_seconds_bucket"]
    assert series["guardstream_dead_letters_total"] == {"error_code"}


def test_rules_are_well_formed() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "GuardstreamLagGrowing",
        "GuardstreamDeadLetterRateHigh",
        "GuardstreamEngineErrors",
        "GuardstreamWorkerNotReady",
    } <= names
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
    prom = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "./infra/prometheus:/etc/prometheus:ro" in compose["prometheus"]["volumes"]
    mounted = {v.split(":")[0] for v in compose["grafana"]["volumes"]}
    assert {"./infra/grafana/provisioning", "./infra/grafana/guardstream.json"} <= mounted
    assert all((ROOT / m).exists() for m in mounted)


def test_dashboard_is_importable_grafana_json() -> None:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "guardstream" and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert all(t["refId"] and t["expr"].strip() for t in p["targets"])
    variables = {v["name"] for v in doc["templating"]["list"]}
    used = {m for _, e in dashboard_exprs() for m in re.findall(r"\$(\w+)", e)}
    assert used <= variables


def test_build_info_is_served_on_metrics() -> None:
    build_info.record_build_info("vllm-server")
    port = free_port()
    server = start_metrics_server(port, host="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
    lines = [line for line in text.splitlines() if line.startswith("guardstream_build_info{")]
    assert len(lines) == 1, lines  # replaced, not one series per engine ever recorded
    assert 'engine="vllm-server"' in lines[0] and f'version="{build_info.package_version()}"' in lines[0]
    assert lines[0].endswith(" 1.0")
    assert re.search(r"^guardstream_ready [01]\.0$", text, re.MULTILINE)


def test_k8s_prometheus_rule_carries_the_same_rules() -> None:
    rule = yaml.safe_load((ROOT / "infra/k8s/prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
