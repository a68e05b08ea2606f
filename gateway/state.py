"""GatewayState: what the handlers share (settings, engine, metrics, response store), the load's outcome and the drain
switch SIGTERM flips.

One instance per app, on `app.state.gateway`; no module-level state.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass, field

from engine import EngineClient, EngineStats, LoraClient
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.response_store import ResponseStore
from gateway.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    engine: EngineClient | None = None  # None until the lifespan has loaded it
    load_error: str | None = None  # why loading the engine failed; the server then exits
    metrics: Metrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    is_draining: bool = False
    num_in_flight: int = 0  # API requests being served (streams count until their last event)
    response_store: ResponseStore | None = None  # the Responses API's store, opened by the lifespan
    background: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # background responses running here, by id

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.settings, self.read_stats)

    def read_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    @property
    def is_loading(self) -> bool:
        return self.engine is None and self.load_error is None

    def begin_drain(self) -> None:
        """Stop taking new requests; the ones in flight go on."""
        self.is_draining = True

    def stop_engine_in_background(self) -> None:
        """Shut the engine down on a daemon thread: every pending request fails with the engine-dead error at once."""
        if self.engine is not None:
            threading.Thread(target=self.engine.shutdown, name="sirocco-engine-stop", daemon=True).start()

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters the engine serves (none while loading, or when the engine serves none)."""
        return list(self.engine.lora_names) if isinstance(self.engine, LoraClient) else []

    def system_fingerprint(self, engine: EngineClient) -> str:
        """OpenAI's `system_fingerprint`: `fp_` + a short hash of the served name and the engine's own fingerprint."""
        digest = hashlib.sha256(f"{self.settings.model_name}\0{engine.fingerprint}".encode()).hexdigest()
        return f"fp_{digest[:10]}"

    def require_engine(self) -> EngineClient:
        """The engine, or 503 while it is not loaded, has died, or the server is draining."""
        if self.is_draining:
            raise APIError(503, "The server is shutting down.", code="draining")
        if self.is_loading:
            raise loading_error()
        if self.engine is None or not self.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")
        return self.engine

    def require_store(self) -> ResponseStore:
        """The response store, or 503 outside the lifespan."""
        if self.response_store is None:
            raise APIError(503, "The response store is not open.", code="store_unavailable")
        return self.response_store


def loading_error() -> APIError:
    return APIError(503, "The model is still loading; retry once GET /health answers 200.", code="loading")
