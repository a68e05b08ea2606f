"""The Prometheus metric names the server exports on /metrics: the one list the chart's alerts, its dashboard
and the tests check against. Names are as scraped (counters carry their `_total` suffix; histograms also
export `<name>_bucket`, `<name>_sum` and `<name>_count`).
"""

HISTOGRAMS = (
    "sirocco_time_to_first_token_seconds",
    "sirocco_inter_token_latency_seconds",
    "sirocco_e2e_request_latency_seconds",
    "sirocco_request_queue_time_seconds",
)
COUNTERS = (
    "sirocco_prompt_tokens_total",
    "sirocco_generation_tokens_total",
    "sirocco_requests_finished_total",  # label finish_reason, one of FINISH_REASONS
    "sirocco_requests_received_total",  # label endpoint: completions, chat_completions or responses
    "sirocco_preemptions_total",
    "sirocco_prefix_cache_queries_total",
    "sirocco_prefix_cache_hits_total",
    "sirocco_lora_requests_total",  # label lora_name: requests received per LoRA adapter
)
GAUGES = (
    "sirocco_requests_running",
    "sirocco_requests_waiting",
    "sirocco_kv_cache_usage_ratio",
    "sirocco_cache_config_info",  # always 1; labels block_size and num_kv_blocks (read by an inference gateway's picker)
    # With LoRA only; labels max_lora, running_lora_adapters, waiting_lora_adapters; value: the snapshot's time. Also
    # exported as vllm:lora_requests_info, the model-server protocol's name.
    "sirocco_lora_requests_info",
)
METRIC_NAMES = HISTOGRAMS + COUNTERS + GAUGES

FINISH_REASONS = ("stop", "length", "abort", "error")

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def base_metric_name(series: str) -> str | None:
    """The exported metric a series name belongs to (a histogram's _bucket/_sum/_count included); None if unknown."""
    if series in METRIC_NAMES:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return None
