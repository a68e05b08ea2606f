"""Prometheus metrics: one registry per app, request timing histograms, and a collector reading engine.stats() at scrape time.

Engine-side counters and gauges are never copied by a background thread: the collector asks the engine when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from engine import EngineStats, RequestOutput
from gateway.settings import Settings

FINISH_REASONS = ("stop", "length", "abort", "error")
ENDPOINTS = ("completions", "chat_completions", "responses")  # label values of sirocco_requests_received


class EngineStatsCollector(Collector):
    """Exposes one EngineStats snapshot per scrape; nothing while no engine is loaded."""

    def __init__(self, read_stats: Callable[[], EngineStats | None], block_size: int) -> None:
        self._read_stats = read_stats
        self._block_size = block_size

    def describe(self) -> list[Metric]:
        return []  # names are only known from collect(); skip the registration-time collect

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        if stats is None:
            return
        counters = (
            ("sirocco_prompt_tokens", "Prompt tokens processed", stats.num_prompt_tokens),
            ("sirocco_generation_tokens", "Tokens generated", stats.num_generation_tokens),
            ("sirocco_preemptions", "Sequences preempted for lack of KV blocks", stats.num_preemptions),
            ("sirocco_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
            ("sirocco_prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        gauges = (
            ("sirocco_requests_running", "Sequences running in the engine", stats.num_running),
            ("sirocco_requests_waiting", "Sequences waiting for admission", stats.num_waiting),
            ("sirocco_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)", stats.kv_cache_usage),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        # An info metric (always 1, facts in labels) like vLLM's cache_config_info: an inference gateway's endpoint
        # picker reads the KV-cache shape from it to model each pod's prefix cache.
        cache_config = GaugeMetricFamily(
            "sirocco_cache_config_info", "KV-cache shape: tokens per block and blocks", labels=["block_size", "num_kv_blocks"]
        )
        cache_config.add_metric([str(self._block_size), str(stats.num_kv_blocks)], 1)
        yield cache_config
        if stats.max_loras:
            yield from _lora_info(stats)


def _lora_info(stats: EngineStats) -> Iterator[Metric]:
    """The adapters running and waiting, as the Gateway API Inference Extension's model-server protocol reads them:
    `vllm:lora_requests_info` (prometheus_client takes the colon) with comma-separated names in labels and the
    snapshot's time as its value (the picker reads the newest series), and a `sirocco_` twin."""
    labels = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
    values = [str(stats.max_loras), ",".join(stats.running_lora_adapters), ",".join(stats.waiting_lora_adapters)]
    for name in ("vllm:lora_requests_info", "sirocco_lora_requests_info"):
        info = GaugeMetricFamily(
            name, "LoRA adapters of running and waiting requests; value: the snapshot's Unix time", labels=labels
        )
        info.add_metric(values, time.time())
        yield info


class Metrics:
    """The app's own registry and the gateway-side request metrics."""

    def __init__(self, settings: Settings, read_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "sirocco_time_to_first_token_seconds", "Time to first token", buckets=settings.ttft_buckets_s, registry=self.registry
        )
        self.itl = Histogram(
            "sirocco_inter_token_latency_seconds",
            "Time between output deltas",
            buckets=settings.itl_buckets_s,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "sirocco_e2e_request_latency_seconds",
            "Request latency, arrival to finish",
            buckets=settings.e2e_buckets_s,
            registry=self.registry,
        )
        self.queue = Histogram(
            "sirocco_request_queue_time_seconds",
            "Time waiting before first scheduled",
            buckets=settings.queue_buckets_s,
            registry=self.registry,
        )
        self.finished = Counter(
            "sirocco_requests_finished", "Engine requests finished, by finish reason", ["finish_reason"], registry=self.registry
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.received = Counter(
            "sirocco_requests_received", "Generation requests received, by endpoint", ["endpoint"], registry=self.registry
        )
        for endpoint in ENDPOINTS:
            self.received.labels(endpoint)
        self.lora_requests = Counter(
            "sirocco_lora_requests", "Requests received for each LoRA adapter", ["lora_name"], registry=self.registry
        )
        self.registry.register(EngineStatsCollector(read_stats, settings.block_size))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one engine request from arrival: TTFT, inter-token latency, end-to-end and queue time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start_s = time.perf_counter()
        self._last_token_s: float | None = None
        self._finish_reasons: list[str] = []
        self._is_done = False

    def observe(self, output: RequestOutput) -> None:
        """Runs for every streamed delta: plain loops, no generators (this was a tenth of the server's CPU per token)."""
        now_s = time.perf_counter()
        has_tokens = False
        for choice in output.outputs:
            has_tokens = has_tokens or bool(choice.token_ids)
            if choice.finish_reason:
                self._finish_reasons.append(choice.finish_reason)
        if has_tokens:
            if self._last_token_s is None:
                self._metrics.ttft.observe(now_s - self._start_s)
            else:
                self._metrics.itl.observe(now_s - self._last_token_s)
            self._last_token_s = now_s
        if output.finished:
            self._metrics.e2e.observe(now_s - self._start_s)
            if output.queue_s is not None:
                self._metrics.queue.observe(output.queue_s)
            self.finish(next((r for r in ("abort", "length") if r in self._finish_reasons), "stop"))

    def finish(self, reason: str) -> None:
        """Count the request once: stop, length, abort (client gone) or error."""
        if not self._is_done:
            self._is_done = True
            self._metrics.finished.labels(reason).inc()


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.gateway.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
