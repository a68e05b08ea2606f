"""values.yaml maps one-to-one onto Settings with its defaults, every value is documented, the schema rejects bad values."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import CHART_DIR, SCENARIOS, Rendered, env_by_name, helm_template

VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
# Settings fields that reach the pod from Secrets (secrets.*), not from the sirocco values block.
SECRET_FIELDS = {"hf_token", "api_keys", "responses_store"}
# Where the chart deliberately differs from Settings' defaults.
CHART_DEFAULTS = {"model": "mistralai/Mistral-7B-Instruct-v0.3", "host": "0.0.0.0"}


def test_sirocco_values_are_exactly_the_settings_fields(settings: dict[str, Any]) -> None:
    fields = set(settings["fields"]) - SECRET_FIELDS
    assert set(VALUES["sirocco"]) == fields
    assert set(SCHEMA["properties"]["sirocco"]["properties"]) == fields


def test_sirocco_values_default_to_settings_defaults(settings: dict[str, Any]) -> None:
    for name, value in VALUES["sirocco"].items():
        expected = CHART_DEFAULTS.get(name, settings["fields"][name]["default"])
        assert value == expected, f"sirocco.{name}: chart {value!r}, Settings {expected!r}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_sirocco_env_name_is_a_settings_field(
    settings: dict[str, Any], rendered: dict[str, Rendered], scenario: str
) -> None:
    names = [name for name in env_by_name(rendered[scenario]) if name.startswith("SIROCCO_")]
    unknown = [name for name in names if name.removeprefix("SIROCCO_").lower() not in settings["fields"]]
    assert not unknown
    assert all(name == name.upper() for name in names)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_settings_parse_the_rendered_env(settings: dict[str, Any], rendered: dict[str, Rendered], scenario: str) -> None:
    """Settings() and its EngineConfig accept each scenario's environment, and read back the values given."""
    parsed = settings["parsed"][scenario]
    assert parsed["ok"], parsed.get("error")
    values = yaml.safe_load(yaml.safe_dump(VALUES["sirocco"]))
    scenario_file = SCENARIOS[scenario]
    if scenario_file is not None:
        values.update(yaml.safe_load((CHART_DIR / "ci" / scenario_file).read_text()).get("sirocco", {}))
    for name, value in values.items():
        got = parsed["values"][name]
        if value is None:
            assert got == settings["fields"][name]["default"], name
        elif isinstance(value, float) or isinstance(got, float):
            assert math.isclose(got, value), name
        else:
            assert got == value, name


def _leaf_keys_without_comment(text: str) -> list[str]:
    """Paths of values.yaml keys that hold a value (not a nested map) with no comment right above them or above a parent.

    A comment on a parent documents a Kubernetes object passed through as a whole (resources, securityContext).
    """
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key or "-" for a list item, documented)
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- "):
            stack.append((indent, "-", True))
            continue
        match = re.match(r"([\w.-]+):(.*)$", stripped)
        assert match, f"values.yaml line {number + 1} is not a key: {line!r}"
        key, rest = match.groups()
        documented = number > 0 and lines[number - 1].strip().startswith("#")
        documented = documented or any(is_documented for _, _, is_documented in stack)
        stack.append((indent, key, documented))
        following = [ln for ln in lines[number + 1 :] if ln.strip() and not ln.strip().startswith("#")]
        is_map = not rest.strip() and bool(following) and not following[0].strip().startswith("- ")
        is_map = is_map and len(following[0]) - len(following[0].lstrip()) > indent
        if not is_map and not documented:
            undocumented.append(".".join(k for _, k, _ in stack))
    return undocumented


def test_every_value_is_documented() -> None:
    assert _leaf_keys_without_comment((CHART_DIR / "values.yaml").read_text()) == []


def _open_objects(schema: Any, path: str = "$") -> list[str]:
    """Paths of object schemas that accept unknown keys (no additionalProperties: false or value schema)."""
    found: list[str] = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" or (isinstance(schema.get("type"), list) and "object" in schema["type"]):
            extra = schema.get("additionalProperties")
            if not (extra is False or isinstance(extra, dict)):
                found.append(path)
        for key, sub in schema.items():
            found += _open_objects(sub, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, sub in enumerate(schema):
            found += _open_objects(sub, f"{path}[{index}]")
    return found


def test_schema_closes_every_object() -> None:
    assert _open_objects(SCHEMA) == []


def test_values_yaml_satisfies_its_schema() -> None:
    import jsonschema

    jsonschema.validate(VALUES, SCHEMA)


def _template_with(helm: Path, tmp_path: Path, values: dict[str, Any]) -> tuple[int, str]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm_template(helm, ["--values", str(values_file)])
    return result.returncode, result.stderr


BAD_VALUES = [
    pytest.param({"replicaCount": -1}, "/replicaCount", id="negative-replicas"),
    pytest.param({"replicaCount": "2"}, "/replicaCount", id="replicas-as-string"),
    pytest.param({"replicas": 2}, "'replicas' not allowed", id="unknown-top-level-key"),
    pytest.param({"sirocco": {"max_batch_size": 8}}, "'max_batch_size' not allowed", id="unknown-settings-field"),
    pytest.param({"sirocco": {"port": "8000"}}, "/sirocco/port", id="port-as-string"),
    pytest.param({"sirocco": {"port": 70000}}, "/sirocco/port", id="port-out-of-range"),
    pytest.param({"sirocco": {"dtype": "int8"}}, "/sirocco/dtype", id="unknown-dtype"),
    pytest.param({"sirocco": {"block_size": 12}}, "/sirocco/block_size", id="block-size-not-a-power-of-two"),
    pytest.param({"sirocco": {"gpu_memory_utilization": 1.5}}, "/sirocco/gpu_memory_utilization", id="gpu-fraction-above-one"),
    pytest.param({"sirocco": {"enable_prefix_caching": "yes"}}, "/sirocco/enable_prefix_caching", id="bool-as-string"),
    pytest.param({"sirocco": {"drain_timeout_s": -1}}, "/sirocco/drain_timeout_s", id="negative-drain-timeout"),
    pytest.param({"sirocco": {"ttft_buckets_s": "0.1,1"}}, "/sirocco/ttft_buckets_s", id="buckets-as-string"),
    pytest.param({"image": {"tag": 1.0}}, "/image/tag", id="numeric-image-tag"),
    pytest.param({"gpus": -1}, "/gpus", id="negative-gpus"),
    pytest.param({"sirocco": {"tensor_parallel_size": 3}}, "/sirocco/tensor_parallel_size", id="tp-not-a-power-of-two"),
    pytest.param({"modelCache": {"type": "nfs"}}, "/modelCache/type", id="unknown-cache-type"),
    pytest.param({"probes": {"startup": {"failureThreshold": 0}}}, "/probes/startup/failureThreshold", id="zero-threshold"),
    pytest.param({"secrets": {"hfToken": {"token": "x"}}}, "'token' not allowed", id="unknown-secret-key"),
    pytest.param({"secrets": {"apiKeys": {"values": "k1,k2"}}}, "/secrets/apiKeys/values", id="api-keys-as-string"),
    pytest.param({"secrets": {"responsesStore": {"url": "redis:6379"}}}, "/secrets/responsesStore/url", id="store-url-no-scheme"),
    pytest.param({"sirocco": {"responses_store_max_age_s": 0}}, "/sirocco/responses_store_max_age_s", id="zero-store-age"),
    pytest.param({"autoscaling": {"maxReplicas": 0}}, "/autoscaling/maxReplicas", id="zero-max-replicas"),
    pytest.param({"serviceMonitor": {"interval": "15"}}, "/serviceMonitor/interval", id="interval-without-unit"),
    pytest.param({"nodeSelector": {"gpu": True}}, "/nodeSelector/gpu", id="non-string-node-selector"),
    pytest.param({"resources": {"requests": {"memory": "lots"}}}, "/resources/requests/memory", id="bad-quantity"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_schema_rejects_bad_values(helm: Path, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    returncode, stderr = _template_with(helm, tmp_path, values)
    assert returncode != 0
    assert "values don't meet the specifications of the schema" in stderr or "at '" in stderr, stderr
    assert message in stderr, stderr


BAD_COMBINATIONS = [
    pytest.param({"gpus": 2, "sirocco": {"tensor_parallel_size": 4}}, "exceeds the GPUs requested", id="tp-above-gpus"),
    pytest.param({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "are both true", id="hpa-and-keda"),
    pytest.param({"modelCache": {"type": "existingClaim"}}, "modelCache.existingClaim", id="existing-claim-without-name"),
    pytest.param({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "greater than", id="hpa-min-above-max"),
    pytest.param(
        {"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}}, "greater than", id="keda-min-above-max"
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_COMBINATIONS)
def test_template_fails_on_bad_combinations(helm: Path, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    returncode, stderr = _template_with(helm, tmp_path, values)
    assert returncode != 0
    assert message in stderr, stderr


@pytest.mark.parametrize(("values", "expected_gpus"), [({}, 1), ({"sirocco": {"tensor_parallel_size": 4}}, 4), ({"gpus": 8}, 8)])
def test_gpus_follow_the_tensor_parallel_size_unless_given(
    helm: Path, tmp_path: Path, values: dict[str, Any], expected_gpus: int
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm_template(helm, ["--values", str(values_file)])
    assert result.returncode == 0, result.stderr
    (deployment,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == expected_gpus
    shm = next(volume for volume in pod["volumes"] if volume["name"] == "dshm")  # NCCL's shared memory
    assert shm["emptyDir"]["medium"] == "Memory"
    env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
    assert env.get("SIROCCO_TENSOR_PARALLEL_SIZE", "1") == str(values.get("sirocco", {}).get("tensor_parallel_size", 1))
