"""Alerts, dashboard and autoscalers query only metrics the server exports (metric_names.py), and point at this release."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
from helm_chart import CHART_DIR, KUBE_VERSION, NAMESPACE, RELEASE, Rendered
from metric_names import GAUGES, HISTOGRAMS, METRIC_NAMES, base_metric_name

QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
SERIES = re.compile(r"\bsirocco_[A-Za-z0-9_]+")


def series_in(expr: str) -> set[str]:
    """The sirocco_* series names a PromQL expression reads (label values in quotes are not names)."""
    return set(SERIES.findall(QUOTED.sub('""', expr)))


def assert_well_formed(expr: str) -> None:
    """Balanced brackets, and bucket series only inside histogram_quantile over `le`."""
    unquoted = QUOTED.sub('""', expr)
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in unquoted:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            assert depth[closing[char]] >= 0, f"unbalanced {char!r} in {expr}"
    assert all(count == 0 for count in depth.values()), f"unbalanced brackets in {expr}"
    if "_bucket" in unquoted:
        assert "histogram_quantile(" in unquoted and "by (le" in unquoted, expr


def assert_known_metrics(exprs: list[str]) -> set[str]:
    """Fails on any series that is not an exported metric; returns the base metrics used."""
    used: set[str] = set()
    for expr in exprs:
        assert_well_formed(expr)
        for series in series_in(expr):
            base = base_metric_name(series)
            assert base is not None, f"{series} (in {expr}) is not in metric_names.py"
            used.add(base)
    return used


def test_series_extraction() -> None:
    expr = 'histogram_quantile(0.95, sum by (le) (rate(sirocco_time_to_first_token_seconds_bucket{service="sirocco_x"}[5m])))'
    assert series_in(expr) == {"sirocco_time_to_first_token_seconds_bucket"}
    assert base_metric_name("sirocco_time_to_first_token_seconds_bucket") == "sirocco_time_to_first_token_seconds"
    assert base_metric_name("sirocco_requests_waiting_count") is None  # a gauge has no _count series
    assert base_metric_name("sirocco_requests_total") is None


def test_prometheus_rule_alerts(rendered: dict[str, Rendered]) -> None:
    rule = rendered["monitoring"].one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == {
        "SiroccoTimeToFirstTokenHigh",
        "SiroccoQueueDepthHigh",
        "SiroccoKVCacheSaturated",
        "SiroccoNoReadyReplicas",
    }
    used = assert_known_metrics([r["expr"] for r in rules])
    assert used == {"sirocco_time_to_first_token_seconds", "sirocco_requests_waiting", "sirocco_kv_cache_usage_ratio"}
    assert "> 2.5" in alerts["SiroccoTimeToFirstTokenHigh"]["expr"]  # the scenario's ttftP95Seconds
    for alert in alerts.values():
        assert f'namespace="{NAMESPACE}"' in alert["expr"], alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard(rendered: dict[str, Rendered]) -> None:
    config_map = rendered["monitoring"].one("ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    [document] = config_map["data"].values()
    dashboard = json.loads(document)
    assert dashboard == json.loads((CHART_DIR / "dashboards" / "sirocco.json").read_text())
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used = assert_known_metrics(_dashboard_exprs(dashboard))
    # Every exported metric has a panel: a metric added to metric_names.py needs one too.
    assert used == set(METRIC_NAMES)


def test_hpa_scales_on_waiting_requests(rendered: dict[str, Rendered]) -> None:
    hpa = rendered["hpa"].one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "sirocco_requests_waiting"
    assert "sirocco_requests_waiting" in GAUGES
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] == 8
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 60
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600


def test_keda_scales_on_waiting_requests(rendered: dict[str, Rendered]) -> None:
    scaled = rendered["keda"].one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == RELEASE
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["threshold"] == "2.5"
    assert assert_known_metrics([trigger["metadata"]["query"]]) == {"sirocco_requests_waiting"}
    assert f'service="{RELEASE}"' in trigger["metadata"]["query"]
    # The behavior block is an autoscaling/v2 HPA behavior: validate it as one.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-behavior"},
        "spec": {
            "scaleTargetRef": scaled["scaleTargetRef"],
            "maxReplicas": scaled["maxReplicaCount"],
            "behavior": scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)


def test_service_monitor_scrapes_metrics_of_the_service(rendered: dict[str, Rendered]) -> None:
    result = rendered["monitoring"]
    monitor = result.one("ServiceMonitor")["spec"]
    service = result.one("Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["interval"] == "30s"


def test_histograms_are_in_the_metric_list() -> None:
    assert set(HISTOGRAMS) <= set(METRIC_NAMES)
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES)) == 17
