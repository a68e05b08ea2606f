"""Fixtures of the deployment checks: the helm binary, each CI scenario rendered once, Settings' view of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helm_binary import helm_binary
from helm_chart import SCENARIOS, Rendered, env_by_name, render, values_args
from settings_report import settings_report


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()  # raises (the tests error, never skip) when helm cannot be fetched


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, Rendered]:
    """Every scenario's `helm template` output, rendered once per test session."""
    return {name: render(helm, values_args(name)) for name in SCENARIOS}


@pytest.fixture(scope="session")
def settings(rendered: dict[str, Rendered]) -> dict[str, Any]:
    """Settings' fields and defaults, and how Settings parses each scenario's plain env values."""
    envs = []
    for result in rendered.values():
        plain = {name: e["value"] for name, e in env_by_name(result).items() if "value" in e}
        # Secrets are referenced, not inlined: give them stand-in values so Settings sees them set.
        plain.update({name: "stand-in" for name, e in env_by_name(result).items() if "valueFrom" in e})
        envs.append(plain)
    report = settings_report(envs)
    report["parsed"] = dict(zip(rendered, report["parsed"], strict=True))
    return report
