"""Settings: the only code that reads the environment (prefix SIROCCO_). Builds the engine's EngineConfig.

The engine's settings are EngineConfig's fields, derived here (one place to add one); the gateway's are declared below.
Flags (gateway/startup.py), the docs table (settings_doc.py) and Helm values map one-to-one onto Settings' fields
(SIROCCO_<FIELD NAME IN UPPER CASE>).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, create_model, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine import EngineConfig

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIROCCO_", extra="ignore", populate_by_name=True)


def _engine_fields() -> dict[str, Any]:
    """One setting per EngineConfig field, with its type, default, description and bounds (engine.config.setting)."""
    hints = typing.get_type_hints(EngineConfig)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(EngineConfig):
        if "description" not in field.metadata:
            raise TypeError(f"EngineConfig.{field.name} has no description: declare it with engine.config.setting()")
        fields[field.name] = (hints[field.name], Field(field.default, **field.metadata))
    return fields


# The engine's part of Settings: written once, in EngineConfig. Settings adds the gateway's fields below.
EngineSettings = create_model("EngineSettings", __base__=_Base, **_engine_fields())


class Settings(EngineSettings):  # type: ignore[valid-type,misc]
    # Model and engine: EngineSettings' fields, the token kept secret and also read from HF_TOKEN
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("SIROCCO_HF_TOKEN", "HF_TOKEN", "hf_token"),
        description="Hugging Face token for gated or private repos (also read from HF_TOKEN)",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send and /v1/models lists; unset: the model argument"
    )

    # HTTP server
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated Bearer keys; empty: no authentication"
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated CORS origins; empty: CORS off"
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, seconds in-flight requests get to finish")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level (any case); debug also prints tracebacks of startup errors"
    )
    log_json: bool = Field(False, description="Write logs as JSON lines")
    log_requests: bool = Field(False, description="Log request bodies and prompts (off: never logged)")
    tool_call_parser: Literal["auto", "mistral", "hermes"] = Field(
        "auto", description="Tool-call format; auto: mistral if the tokenizer has [TOOL_CALLS], else hermes"
    )
    responses_hosted_tools: Literal["ignore", "reject"] = Field(
        "ignore",
        description="Hosted tools in /v1/responses (web_search, ...): ignore leaves them out with a warning, reject is a 400",
    )

    # Limits on user input
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; beyond it 413")
    max_n: int = Field(16, ge=1, le=128, description="Largest n (choices per request)")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask; unset: the context length"
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries per request")
    max_logprobs: int = Field(20, ge=0, le=20, description="Largest logprobs / top_logprobs")

    # The Responses API's store (gateway/response_store.py)
    responses_store: str = Field(
        "sqlite",
        description="Where stored responses live: sqlite (a file, see responses_store_path), or a redis://, rediss:// or "
        "unix:// URL of a Redis that replicas share (needs the redis extra)",
    )
    responses_store_path: str | None = Field(
        None, description="SQLite file of the response store; unset: responses.sqlite3 in cache_dir"
    )
    responses_store_max_age_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="Seconds a stored response is kept (SQLite: then deleted; Redis: its TTL)"
    )
    responses_store_max_bytes: int = Field(
        1024**3,
        ge=1024,
        description="SQLite: the store's total size, oldest responses evicted beyond it; both: the largest one response",
    )

    # Prometheus histogram buckets (seconds)
    ttft_buckets_s: Annotated[list[float], NoDecode] = Field(
        list(_TTFT_BUCKETS), description="Time-to-first-token histogram buckets"
    )
    itl_buckets_s: Annotated[list[float], NoDecode] = Field(
        list(_ITL_BUCKETS), description="Inter-token latency histogram buckets"
    )
    e2e_buckets_s: Annotated[list[float], NoDecode] = Field(
        list(_E2E_BUCKETS), description="End-to-end latency histogram buckets"
    )
    queue_buckets_s: Annotated[list[float], NoDecode] = Field(list(_E2E_BUCKETS), description="Queue time histogram buckets")

    _split = field_validator(
        "api_keys", "cors_allow_origins", "ttft_buckets_s", "itl_buckets_s", "e2e_buckets_s", "queue_buckets_s", mode="before"
    )(_split_commas)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def model_name(self) -> str:
        """The name clients use for the model."""
        return self.served_model_name or self.model or "SmolLM2-135M-Instruct"

    def engine_config(self) -> EngineConfig:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(EngineConfig)}
        values["hf_token"] = self.hf_token.get_secret_value() if self.hf_token else None
        return EngineConfig(**values)


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    return f"SIROCCO_{field.upper()}"


def unknown_environment_names() -> list[tuple[str, str | None]]:
    """SIROCCO_* variables that no setting reads (a typo is otherwise silently ignored), each with the closest real name."""
    known = [env_name(field) for field in Settings.model_fields]
    unknown = sorted(name for name in os.environ if name.startswith("SIROCCO_") and name not in known)
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)) for name in unknown]
