"""Sirocco's own cache folder, and directories built in it once: written aside, then renamed into place (atomic).

Reads no environment: the folder comes from EngineConfig.cache_dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/sirocco"


def cache_root(cache_dir: str | None) -> pathlib.Path:
    """Sirocco's own cache folder: cache_dir, or ~/.cache/sirocco."""
    return pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()


def build_once(
    target: pathlib.Path, is_complete: Callable[[pathlib.Path], bool], build: Callable[[pathlib.Path], None]
) -> pathlib.Path:
    """`target`, built by `build(tmp_dir)` beside it and renamed into place unless `is_complete(target)` already.

    Several processes may race: the first rename wins, the others discard their copy. An incomplete `target` (left by an
    older layout or damaged by hand) is moved aside first; a failed build leaves nothing behind.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning("discarding incomplete cache directory %s", target)
        stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared (e.g. a volume read by another user)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # another process finished first, or the rename failed for real
                raise
            logger.info("another process built %s first; discarding this copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
