"""Asks gateway.settings.Settings, in a subprocess, for its fields and defaults, and how it parses given environments.

A subprocess keeps the test process's environment clean: Settings reads os.environ, and the tests
feed it each rendered Deployment's environment in turn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import json, os, sys
root = sys.argv[1]
sys.path.insert(0, root)
from gateway.settings import Settings

fields = {}
for name, field in Settings.model_fields.items():
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    fields[name] = {"default": default, "required": field.is_required()}

parsed = []
for env in json.load(sys.stdin):
    for key in [k for k in os.environ if k.startswith("SIROCCO_") or k == "HF_TOKEN"]:
        del os.environ[key]
    os.environ.update(env)
    try:
        settings = Settings()
        settings.engine_config()
        parsed.append({"ok": True, "values": settings.model_dump(mode="json")})
    except Exception as exc:  # reported to the test, which fails with the message
        parsed.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
print(json.dumps({"fields": fields, "parsed": parsed}, default=str))
"""


def settings_report(envs: list[dict[str, str]]) -> dict[str, Any]:
    """{"fields": {name: {"default", "required"}}, "parsed": [one result per env]}."""
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(REPO_ROOT)],
        input=json.dumps(envs),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not load gateway.settings.Settings:\n{result.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report
