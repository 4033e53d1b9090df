"""The Grafana dashboard in docs/ asks only for series stalwart really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "stalwart-dashboard.json"

_SERIES = re.compile(r"\b(stalwart_[a-z0-9_]+)\b")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"(stalwart_[a-z0-9_]+)\{([^}]*)\}")
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def expressions(node: Any) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(expressions(item))
    return found


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name stalwart exports, with its labels: one policy of each kind."""
    registry = CollectorRegistry()
    telemetry = sw.Telemetry(registry=registry, latency=True)
    kept = [
        sw.Retry(telemetry=telemetry),
        sw.Timeout(1.0, telemetry=telemetry),
        sw.Bulkhead(1, telemetry=telemetry),
        sw.CircuitBreaker(telemetry=telemetry),
        sw.Idempotency(key="key", telemetry=telemetry),
        sw.Pipeline(telemetry=telemetry),
    ]
    breaker = kept[3]
    assert isinstance(breaker, sw.CircuitBreaker)
    breaker.force_open()  # transitions are series once one happened
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    assert kept
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    queries = " ".join(expressions(dashboard["panels"]))
    assert "stalwart_calls_total" in queries  # rates by outcome
    assert "stalwart_circuit_state" in queries  # breaker state over time
    assert "stalwart_bulkhead_in_flight" in queries  # bulkhead occupancy
    assert "stalwart_retry_attempts_total" in queries  # retry amplification
    assert "histogram_quantile(0.99" in queries  # p99 by policy
    assert "stalwart_call_duration_seconds_bucket" in queries


def test_every_expression_names_series_stalwart_exports(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    queries = expressions(dashboard)
    assert queries
    for query in queries:
        names = _SERIES.findall(query)
        assert names, query
        for name in names:
            assert name in exported, f"{name} (in {query!r}) is not a series stalwart exports"


def test_every_label_an_expression_uses_exists_on_its_series(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    for query in expressions(dashboard):
        names = _SERIES.findall(query)
        labels = set().union(*(exported[n] for n in names if n in exported))
        for name, matchers in _MATCHERS.findall(query):
            for label in _LABEL.findall(matchers):
                assert label in exported[name], f"{name} has no label {label!r}: {query!r}"
        for grouping in _GROUPING.findall(query):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in labels, f"no series of {query!r} has the label {label!r}"


def test_every_expression_is_balanced(dashboard: dict[str, Any]) -> None:
    for query in expressions(dashboard):
        for opening, closing in ("()", "{}", "[]"):
            assert query.count(opening) == query.count(closing), query


def test_every_panel_has_a_query_and_a_place(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["datasource"]["uid"] == "${datasource}"
