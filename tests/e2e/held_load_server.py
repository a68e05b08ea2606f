"""`sirocco serve` whose model load stays at one moment until the process ends, for the signal-while-loading tests.

HOLD_LOAD_AT=weights repeats the weights load, HOLD_LOAD_AT=kv_cache the KV-cache allocation, after logging
"test: holding the load at <moment>". The held step is the real one run again and again, so the loading thread stays
inside torch (with the GIL released), as in the long load of a large model, whenever the signal comes. In engine-process
mode the spawned engine-core child re-imports this file as __mp_main__, so the hold is installed there too. Only tests
start this launcher; nothing in engine/ or gateway/ knows about it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from collections.abc import Callable
from typing import Any

from engine import kv_cache, loader  # imports the engine package, and with it every module that calls these
from gateway.__main__ import main

HELD: dict[str, tuple[Any, str]] = {"weights": (loader, "load_model"), "kv_cache": (kv_cache, "allocate_kv_cache")}


def _install_hold(moment: str) -> None:
    """Replace the step's function wherever the engine's modules hold it (they import it by name)."""
    module, name = HELD[moment]
    original: Callable[..., Any] = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        logging.getLogger("sirocco").info("test: holding the load at %s", moment)
        while True:
            original(*args, **kwargs)

    holders = [m for m in list(sys.modules.values()) if m.__name__.startswith("engine") and getattr(m, name, None) is original]
    assert len(holders) >= 2, f"no engine module calls {module.__name__}.{name}: the hold would never be reached"
    for holder in holders:
        setattr(holder, name, held)


if __name__ in ("__main__", "__mp_main__"):
    _install_hold(os.environ["HOLD_LOAD_AT"])
if __name__ == "__main__":
    main(sys.argv[1:])
