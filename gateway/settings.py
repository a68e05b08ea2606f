"""Settings: the only code that reads the environment (prefix SIROCCO_). Builds the engine's EngineConfig.

Helm values map one-to-one onto these fields (SIROCCO_<FIELD NAME IN UPPER CASE>).
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine import EngineConfig

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIROCCO_", extra="ignore", populate_by_name=True)

    # Model and engine (passed to EngineConfig)
    model: str | None = Field(
        None, description="Local directory, .gguf file or Hugging Face repo id; unset: the embedded SmolLM2-135M-Instruct"
    )
    gguf_file: str | None = Field(
        None, description="GGUF file to serve from the model's folder or Hub repo; unset: its only one, if it has no safetensors"
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send and /v1/models lists; unset: the model argument"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model")
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("SIROCCO_HF_TOKEN", "HF_TOKEN", "hf_token"),
        description="Hugging Face token for gated or private repos (also read from HF_TOKEN)",
    )
    download_dir: str | None = Field(
        None, description="Hugging Face cache directory for downloads; unset: huggingface_hub's default (HF_HOME)"
    )
    cache_dir: str | None = Field(
        None, description="Sirocco's cache (GGUF model directories, built kernels); unset: ~/.cache/sirocco"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: str | None = Field(None, description="cuda, cuda:N or cpu; unset: cuda when available")
    max_model_len: int | None = Field(None, ge=1, description="Context length (prompt + output); unset: the model's")
    block_size: int = Field(16, description="Tokens per KV-cache block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; unset: sized from memory")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV-cache size in GiB; unset: 1 on CPU, gpu_memory_utilization on CUDA"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory for weights, activations and KV cache"
    )
    max_num_seqs: int = Field(128, ge=1, description="Most sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one engine step")
    max_waiting_requests: int = Field(1024, ge=1, description="Waiting-queue bound; beyond it requests get 429")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs")
    seed: int = Field(0, description="Seed for requests that do not give one")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads on CPU; unset: usable CPUs (affinity, cgroup limit) less one, at least 1",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Processes (GPUs on CUDA) the model is split over by tensor parallelism"
    )
    engine_process: bool = Field(
        False, description="Run the engine's step loop in its own process, away from the HTTP side's GIL"
    )
    quantization: Literal["int8", "int4"] | None = Field(
        None, description="Quantize a safetensors model's linear layers and lm_head at load (int8 or int4); unset: float"
    )
    quantization_group_size: int = Field(32, ge=32, multiple_of=32, description="Weights sharing one quantization scale")

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

    # Limits on user input
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body; beyond it 413")
    max_n: int = Field(16, ge=1, le=128, description="Largest n (choices per request)")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask; unset: the context length"
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries per request")
    max_logprobs: int = Field(20, ge=0, le=20, description="Largest logprobs / top_logprobs")

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
        return EngineConfig(
            model=self.model,
            gguf_file=self.gguf_file,
            revision=self.revision,
            hf_token=self.hf_token.get_secret_value() if self.hf_token else None,
            download_dir=self.download_dir,
            cache_dir=self.cache_dir,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_gib=self.kv_cache_gib,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting_requests=self.max_waiting_requests,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            num_threads=self.num_threads,
            tensor_parallel_size=self.tensor_parallel_size,
            engine_process=self.engine_process,
            quantization=self.quantization,
            quantization_group_size=self.quantization_group_size,
        )


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    return f"SIROCCO_{field.upper()}"


def unknown_environment_names() -> list[tuple[str, str | None]]:
    """SIROCCO_* variables that no setting reads (a typo is otherwise silently ignored), each with the closest real name."""
    known = [env_name(field) for field in Settings.model_fields]
    unknown = sorted(name for name in os.environ if name.startswith("SIROCCO_") and name not in known)
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)) for name in unknown]
