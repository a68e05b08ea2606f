"""The chart under test, its CI scenarios, and `helm template` / `helm lint` wrappers that return parsed manifests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "sirocco"
RELEASE = "sirocco-ci"
NAMESPACE = "inference"
# The Kubernetes version manifests are rendered for and validated against (kubernetes-validate ships its schemas).
KUBE_VERSION = "1.33.0"

# Scenario name -> values file under helm/sirocco/ci/ (None: the chart's defaults only).
SCENARIOS: dict[str, str | None] = {
    "default": None,
    **{path.name.removesuffix("-values.yaml"): path.name for path in sorted((CHART_DIR / "ci").glob("*-values.yaml"))},
}


@dataclass(frozen=True)
class Rendered:
    text: str
    manifests: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]


def values_args(scenario: str) -> list[str]:
    values_file = SCENARIOS[scenario]
    return [] if values_file is None else ["--values", str(CHART_DIR / "ci" / values_file)]


def helm_template(helm: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [str(helm), "template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def render(helm: Path, args: list[str]) -> Rendered:
    result = helm_template(helm, args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(result.stdout, manifests)


def helm_lint(helm: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [str(helm), "lint", "--strict", str(CHART_DIR), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def container(rendered: Rendered) -> dict[str, Any]:
    """The server container of the Deployment."""
    containers = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["sirocco"]
    return containers[0]


def env_by_name(rendered: Rendered) -> dict[str, dict[str, Any]]:
    env = container(rendered)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e for e in env}
