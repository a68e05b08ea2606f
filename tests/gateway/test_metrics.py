"""GET /metrics: the exact metric names, engine stats read at scrape time, request histograms and finish reasons."""

from __future__ import annotations

from conftest import MODEL
from starlette.testclient import TestClient

NAMES = [
    "sirocco_time_to_first_token_seconds_bucket",
    "sirocco_inter_token_latency_seconds_bucket",
    "sirocco_e2e_request_latency_seconds_bucket",
    "sirocco_request_queue_time_seconds_bucket",
    "sirocco_prompt_tokens_total",
    "sirocco_generation_tokens_total",
    'sirocco_requests_finished_total{finish_reason="stop"}',
    'sirocco_requests_finished_total{finish_reason="length"}',
    'sirocco_requests_finished_total{finish_reason="abort"}',
    'sirocco_requests_finished_total{finish_reason="error"}',
    'sirocco_requests_received_total{endpoint="completions"}',
    'sirocco_requests_received_total{endpoint="chat_completions"}',
    'sirocco_requests_received_total{endpoint="responses"}',
    "sirocco_preemptions_total",
    "sirocco_prefix_cache_queries_total",
    "sirocco_prefix_cache_hits_total",
    "sirocco_requests_running",
    "sirocco_requests_waiting",
    "sirocco_kv_cache_usage_ratio",
    'sirocco_cache_config_info{block_size="16",num_kv_blocks="100"}',
]


def sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_every_metric_is_exposed_on_a_plain_route(client: TestClient) -> None:
    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in NAMES:
        assert name in response.text, name


def test_requests_are_counted_and_timed(client: TestClient, engine) -> None:
    client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3, "stop": "t1"})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "FAIL_MID", "max_tokens": 3, "stream": True})
    text = client.get("/metrics").text
    assert sample(text, 'sirocco_requests_finished_total{finish_reason="length"}') == 1
    assert sample(text, 'sirocco_requests_finished_total{finish_reason="stop"}') == 1
    assert sample(text, 'sirocco_requests_finished_total{finish_reason="error"}') == 1
    assert sample(text, "sirocco_time_to_first_token_seconds_count") == 3
    assert sample(text, "sirocco_inter_token_latency_seconds_count") == 2  # only deltas that carry tokens
    assert sample(text, "sirocco_e2e_request_latency_seconds_count") == 2
    assert sample(text, "sirocco_request_queue_time_seconds_count") == 2
    assert sample(text, "sirocco_generation_tokens_total") == engine.num_generation_tokens
    assert sample(text, "sirocco_prefix_cache_hits_total") == 2


def test_cache_config_info_carries_the_kv_cache_shape(make_client) -> None:
    """The endpoint picker of an inference gateway reads block size and block count from these labels."""
    text = make_client(block_size=32).get("/metrics").text
    assert "# TYPE sirocco_cache_config_info gauge" in text
    assert sample(text, 'sirocco_cache_config_info{block_size="32",num_kv_blocks="100"}') == 1


def test_buckets_come_from_settings(make_client) -> None:
    text = make_client(ttft_buckets_s="0.5,7").get("/metrics").text
    assert 'sirocco_time_to_first_token_seconds_bucket{le="7.0"}' in text
    assert 'sirocco_time_to_first_token_seconds_bucket{le="0.01"}' not in text


def test_each_app_has_its_own_registry(make_client) -> None:
    first, second = make_client(), make_client()
    first.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert sample(second.get("/metrics").text, 'sirocco_requests_finished_total{finish_reason="length"}') == 0
