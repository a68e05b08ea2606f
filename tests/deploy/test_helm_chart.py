"""The chart lints and renders in every CI scenario, its manifests are valid Kubernetes objects, the Deployment is right."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import CRD_SCHEMAS
from helm_chart import CHART_DIR, KUBE_VERSION, SCENARIOS, Rendered, container, env_by_name, helm_lint, values_args

SECRET_ENV_NAMES = ("HF_TOKEN", "SIROCCO_HF_TOKEN", "SIROCCO_API_KEYS", "SIROCCO_RESPONSES_STORE")
OPTIONAL_KINDS = ("ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "ScaledObject", "ConfigMap", "Secret")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: Path, scenario: str) -> None:
    result = helm_lint(helm, values_args(scenario))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate_against_kubernetes_schemas(rendered: dict[str, Rendered], scenario: str) -> None:
    """Built-in kinds by kubernetes-validate --strict (unknown fields rejected); CRDs by crd_schemas."""
    for manifest in rendered[scenario].manifests:
        crd_schema = CRD_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
        if crd_schema is not None:
            jsonschema.validate(manifest, crd_schema)
        else:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def test_default_render_has_only_the_core_objects(rendered: dict[str, Rendered]) -> None:
    kinds = sorted(m["kind"] for m in rendered["default"].manifests)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "ServiceAccount"]


@pytest.mark.parametrize(
    ("scenario", "kinds"),
    [
        ("monitoring", {"ServiceMonitor", "PrometheusRule", "ConfigMap"}),
        ("hpa", {"HorizontalPodAutoscaler", "ServiceMonitor"}),
        ("keda", {"ScaledObject"}),
        ("secrets", {"Secret"}),
    ],
)
def test_each_optional_feature_renders_its_objects(rendered: dict[str, Rendered], scenario: str, kinds: set[str]) -> None:
    present = {m["kind"] for m in rendered[scenario].manifests} & set(OPTIONAL_KINDS)
    assert present == kinds


def test_default_model_and_gpu(rendered: dict[str, Rendered]) -> None:
    env = env_by_name(rendered["default"])
    assert env["SIROCCO_MODEL"]["value"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert env["SIROCCO_HOST"]["value"] == "0.0.0.0"
    resources = container(rendered["default"])["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    tolerations = rendered["default"].one("Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_cpu_scenario_requests_no_gpu_and_serves_the_embedded_model(rendered: dict[str, Rendered]) -> None:
    resources = container(rendered["cpu"])["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "SIROCCO_MODEL" not in env_by_name(rendered["cpu"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_hit_health_on_the_served_port(rendered: dict[str, Rendered], scenario: str) -> None:
    spec = container(rendered[scenario])
    [port] = spec["ports"]
    assert port["name"] == "http"
    assert str(port["containerPort"]) == env_by_name(rendered[scenario])["SIROCCO_PORT"]["value"]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe_name]["httpGet"] == {"path": "/health", "port": "http"}, probe_name
    startup = spec["startupProbe"]
    # Downloading and loading a 7B model takes minutes (/health says 503 "loading" meanwhile): the startup probe must
    # allow at least ten, and it is what holds liveness back, so a loading pod is never restarted.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert "initialDelaySeconds" not in spec["livenessProbe"]  # the startup probe, not a guessed delay, gates it


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grace_period_covers_prestop_and_drain(rendered: dict[str, Rendered], scenario: str) -> None:
    pod = rendered[scenario].one("Deployment")["spec"]["template"]["spec"]
    command = container(rendered[scenario])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    drain_s = float(env_by_name(rendered[scenario])["SIROCCO_DRAIN_TIMEOUT_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > math.ceil(drain_s) + pre_stop_s


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_runs_non_root_with_a_read_only_root(rendered: dict[str, Rendered], scenario: str) -> None:
    pod = rendered[scenario].one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    spec = container(rendered[scenario])
    security = spec["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert mounts["/data"] == "model-cache"
    assert env_by_name(rendered[scenario])["HF_HOME"]["value"] == "/data/huggingface"


@pytest.mark.parametrize(
    ("scenario", "volume"),
    [
        ("default", {"persistentVolumeClaim": {"claimName": "sirocco-ci"}}),
        ("existing-secrets", {"persistentVolumeClaim": {"claimName": "models-rwx"}}),
        ("keda", {"emptyDir": {"sizeLimit": "60Gi"}}),
    ],
)
def test_model_cache_volume(rendered: dict[str, Rendered], scenario: str, volume: dict[str, Any]) -> None:
    pod = rendered[scenario].one("Deployment")["spec"]["template"]["spec"]
    [cache] = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    assert cache == {"name": "model-cache", **volume}
    claims = rendered[scenario].of_kind("PersistentVolumeClaim")
    assert [c["metadata"]["name"] for c in claims] == (["sirocco-ci"] if scenario == "default" else [])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_secrets_reach_the_pod_only_by_reference(rendered: dict[str, Rendered], scenario: str) -> None:
    env = env_by_name(rendered[scenario])
    for name in SECRET_ENV_NAMES:
        if name in env:
            assert "value" not in env[name], f"{name} is inlined"
            assert set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
    assert "envFrom" not in container(rendered[scenario])


def test_chart_created_secret_holds_the_values_and_the_deployment_does_not(rendered: dict[str, Rendered]) -> None:
    values = yaml.safe_load((CHART_DIR / "ci" / "secrets-values.yaml").read_text())["secrets"]
    plain = [values["hfToken"]["value"], *values["apiKeys"]["values"], values["responsesStore"]["url"]]
    deployment = yaml.safe_dump(rendered["secrets"].one("Deployment"))
    assert not [value for value in plain if value in deployment]
    secret = rendered["secrets"].one("Secret")
    env = env_by_name(rendered["secrets"])
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in ("HF_TOKEN", "SIROCCO_API_KEYS", "SIROCCO_RESPONSES_STORE")}
    assert {ref["name"] for ref in refs.values()} == {secret["metadata"]["name"]}
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded[refs["HF_TOKEN"]["key"]] == values["hfToken"]["value"]
    assert decoded[refs["SIROCCO_API_KEYS"]["key"]] == ",".join(values["apiKeys"]["values"])
    assert decoded[refs["SIROCCO_RESPONSES_STORE"]["key"]] == values["responsesStore"]["url"]
    annotations = rendered["secrets"].one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in annotations  # pods roll when the Secret changes


def test_existing_secrets_are_referenced_by_name_and_key(rendered: dict[str, Rendered]) -> None:
    env = env_by_name(rendered["existing-secrets"])
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["SIROCCO_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "sirocco-api-keys", "key": "keys"}
    assert env["SIROCCO_RESPONSES_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "sirocco-redis", "key": "url"}
    assert not rendered["existing-secrets"].of_kind("Secret")


def test_no_secret_env_without_secrets(rendered: dict[str, Rendered]) -> None:
    assert not set(env_by_name(rendered["default"])) & set(SECRET_ENV_NAMES)


@pytest.mark.parametrize("scenario", ["hpa", "keda"])
def test_autoscaled_deployment_leaves_replicas_to_the_autoscaler(rendered: dict[str, Rendered], scenario: str) -> None:
    assert "replicas" not in rendered[scenario].one("Deployment")["spec"]


def test_disruption_budget_and_service_select_the_pods(rendered: dict[str, Rendered]) -> None:
    result = rendered["default"]
    pod_labels = result.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [result.one("Service")["spec"]["selector"], result.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    assert result.one("Service")["spec"]["ports"][0]["targetPort"] == "http"
