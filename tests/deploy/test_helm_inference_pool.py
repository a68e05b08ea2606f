"""The InferencePool selects exactly the release's pods on the served port, and the endpoint picker's configuration reads
the server's own metric names for the model-server protocol's queue, running-requests and KV-cache metrics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from crd_schemas import INFERENCE_POOL
from helm_chart import SCENARIOS, Rendered, container, env_by_name, helm_template, render
from metric_names import GAUGES, METRIC_NAMES

SCENARIO = "inference-pool"
EPP_CONFIG_KEY = "sirocco-epp.yaml"


def epp_config_map(rendered: Rendered) -> dict[str, Any]:
    [config_map] = [m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-epp-config")]
    return config_map


def epp_config(rendered: Rendered) -> dict[str, Any]:
    document = yaml.safe_load(epp_config_map(rendered)["data"][EPP_CONFIG_KEY])
    assert isinstance(document, dict)
    return document


def plugin(config: dict[str, Any], plugin_type: str) -> dict[str, Any]:
    [found] = [p for p in config["plugins"] if p["type"] == plugin_type]
    return found


def test_scenario_renders_the_pool_and_the_picker_config(rendered: dict[str, Rendered]) -> None:
    result = rendered[SCENARIO]
    pool = result.one("InferencePool")
    assert pool["metadata"]["labels"]["gateway"] == "inference"
    assert epp_config_map(result)["metadata"]["name"] == f"{pool['metadata']['name']}-epp-config"


@pytest.mark.parametrize("scenario", [name for name in SCENARIOS if name != SCENARIO])
def test_absent_when_disabled(rendered: dict[str, Rendered], scenario: str) -> None:
    assert not rendered[scenario].of_kind("InferencePool")
    assert not [m for m in rendered[scenario].of_kind("ConfigMap") if m["metadata"]["name"].endswith("-epp-config")]


def test_pool_validates_against_the_crd_schema(rendered: dict[str, Rendered]) -> None:
    jsonschema.validate(rendered[SCENARIO].one("InferencePool"), INFERENCE_POOL)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "targetPorts"), []),
        (("spec", "targetPorts"), [{"number": 8000}, {"number": 8000}]),
        (("spec", "targetPorts", 0, "number"), 0),
        (("spec", "selector", "matchLabels"), {}),
        (("spec", "selector", "matchLabels", "app"), "-bad-"),
        (("spec", "endpointPickerRef", "failureMode"), "Open"),
        (("spec", "endpointPickerRef", "port"), None),
        (("spec", "endpointPicker"), {"name": "typo"}),
        (("spec", "appProtocol"), "grpc"),
    ],
)
def test_crd_schema_rejects_malformed_pools(rendered: dict[str, Rendered], path: tuple[Any, ...], value: Any) -> None:
    """The schema is not vacuous: each of these breaks a rule of the upstream CRD."""
    pool = copy.deepcopy(rendered[SCENARIO].one("InferencePool"))
    parent = pool
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, INFERENCE_POOL)


def test_pool_selects_exactly_the_deployments_pods(rendered: dict[str, Rendered]) -> None:
    result = rendered[SCENARIO]
    deployment = result.one("Deployment")["spec"]
    selector = result.one("InferencePool")["spec"]["selector"]["matchLabels"]
    # The same labels the Deployment owns its pods by (immutable, release-specific), so no other release's pods.
    assert selector == deployment["selector"]["matchLabels"]
    assert selector.items() <= deployment["template"]["metadata"]["labels"].items()
    assert selector == result.one("Service")["spec"]["selector"]
    assert selector["app.kubernetes.io/instance"] == "sirocco-ci"


def test_pool_targets_the_served_port(rendered: dict[str, Rendered]) -> None:
    result = rendered[SCENARIO]
    [port] = container(result)["ports"]
    assert port["containerPort"] == 8080  # the scenario moves the server off its default port
    assert env_by_name(result)["SIROCCO_PORT"]["value"] == "8080"
    assert result.one("InferencePool")["spec"]["targetPorts"] == [{"number": port["containerPort"]}]


def test_pool_references_the_endpoint_picker(rendered: dict[str, Rendered]) -> None:
    ref = rendered[SCENARIO].one("InferencePool")["spec"]["endpointPickerRef"]
    assert ref == {"name": "sirocco-picker-epp", "port": {"number": 9002}, "failureMode": "FailClose"}


def test_picker_defaults(helm: Path) -> None:
    result = render(helm, ["--set", "inferencePool.enabled=true"])
    spec = result.one("InferencePool")["spec"]
    # The Service the llm-d-router chart names <release>-epp, for the release docs/deploy.md installs.
    assert spec["endpointPickerRef"] == {"name": "sirocco-ci-router-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}
    assert spec["targetPorts"] == [{"number": 8000}]
    assert epp_config(result)["apiVersion"] == "llm-d.ai/v1alpha1"


def test_picker_reads_the_servers_metric_names(rendered: dict[str, Rendered]) -> None:
    config = epp_config(rendered[SCENARIO])
    assert config["kind"] == "EndpointPickerConfig"
    assert plugin(config, "metrics-data-source")["parameters"] == {"scheme": "http", "path": "/metrics"}
    extractor = plugin(config, "core-metrics-extractor")["parameters"]
    [engine] = extractor["engineConfigs"]
    # Pods carry no engine-type label: the default engine must be ours, not the picker's vllm.
    assert extractor["defaultEngine"] == engine["name"] == "sirocco"
    assert engine["queuedRequestsSpec"] == "sirocco_requests_waiting"
    assert engine["runningRequestsSpec"] == "sirocco_requests_running"
    assert engine["kvUsageSpec"] == "sirocco_kv_cache_usage_ratio"
    assert engine["loraSpec"] == ""  # no LoRA adapters: an empty spec turns the LoRA scrape off
    assert engine["cacheInfoSpec"] == "sirocco_cache_config_info"
    assert {engine["cacheBlockSizeLabelName"], engine["cacheNumBlocksLabelName"]} == {"block_size", "num_kv_blocks"}
    specs = [value for key, value in engine.items() if key.endswith("Spec") and value]
    assert set(specs) <= set(GAUGES) and set(specs) <= set(METRIC_NAMES)


def test_lora_adapters_turn_on_the_lora_affinity_scorer(helm: Path) -> None:
    result = render(helm, ["--set", "inferencePool.enabled=true", "--set", "sirocco.lora_modules=support=/adapters/support"])
    config = epp_config(result)
    [engine] = plugin(config, "core-metrics-extractor")["parameters"]["engineConfigs"]
    assert engine["loraSpec"] == "sirocco_lora_requests_info" and engine["loraSpec"] in GAUGES
    plugin(config, "lora-affinity-scorer")
    [profile] = config["schedulingProfiles"]
    assert {"pluginRef": "lora-affinity-scorer", "weight": 2} in profile["plugins"]
    env = env_by_name(result)
    assert env["SIROCCO_LORA_MODULES"]["value"] == "support=/adapters/support"


def test_every_scheduling_plugin_is_declared(rendered: dict[str, Rendered]) -> None:
    config = epp_config(rendered[SCENARIO])
    declared = [p["type"] for p in config["plugins"]]
    assert len(declared) == len(set(declared))
    referenced = [ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]]
    assert set(referenced) <= set(declared)
    assert {"queue-scorer", "kv-cache-utilization-scorer"} <= set(referenced)


BAD_VALUES = [
    pytest.param({"endpointPicker": {"failureMode": "Open"}}, "/inferencePool/endpointPicker/failureMode", id="failure-mode"),
    pytest.param({"endpointPicker": {"port": 0}}, "/inferencePool/endpointPicker/port", id="port-zero"),
    pytest.param({"endpointPicker": {"name": "EPP_Service"}}, "/inferencePool/endpointPicker/name", id="service-name"),
    pytest.param({"endpointPicker": {"configApiVersion": "v1"}}, "/inferencePool/endpointPicker/configApiVersion", id="api"),
    pytest.param({"selector": {"app": "x"}}, "'selector' not allowed", id="unknown-key"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_values_schema_rejects_bad_pool_values(helm: Path, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({"inferencePool": {"enabled": True, **values}}))
    result = helm_template(helm, ["--values", str(values_file)])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
