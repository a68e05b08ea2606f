"""Test helper for Triton kernels on CPU: run a test module under TRITON_INTERPRET=1 in a subprocess, read its report.

The interpreter is chosen when a kernel is defined, so it must be set before triton is imported: the module runs as
`python -m <module>` with it set, and its `__main__` block prints one JSON line of errors per case.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def interpreted_report(module: str) -> Any:
    """The last stdout line of `python -m module` under TRITON_INTERPRET=1, parsed as JSON; skips without triton."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", module], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
