"""bench/cpu_peers.py's Sirocco-only path end to end at tiny size: a real server, streamed chat, one JSON line per level.

No peer is installed or started here (that takes minutes); the peers' command lines and variant parsing are checked
without running them.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from bench import cpu_peers
from bench.peer_servers import ServerSpec, parse_sirocco, peer_command

pytestmark = pytest.mark.slow


def test_sirocco_only_run_appends_a_line_per_level(tmp_path: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    out = tmp_path / "cpu-peers.jsonl"
    variant = f"tiny:model={embedded_model_dir},SIROCCO_KV_CACHE_GIB=0.25,SIROCCO_MAX_MODEL_LEN=1024"
    cpu_peers.main([
        "--peers", "none", "--sirocco", variant, "--order", "tiny", "--levels", "1:2,2:2", "--max-tokens", "4",
        "--log-dir", str(tmp_path), "--out", str(out),
    ])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["server"], r["concurrency"], r["requests"]) for r in records] == [("tiny", 1, 2), ("tiny", 2, 2)]
    for record in records:
        assert record["bench"] == "cpu_peers" and record["kind"] == "sirocco"
        assert record["output_tokens"] == 2 * 4 and record["requests_short"] == 0  # EOS ignored: every request ran out
        assert record["tokens_counted_by"] == "usage"
        assert record["output_tok_per_s"] > 0 and record["seconds"] > 0
        assert 0 < record["ttft_p50_s"] <= record["ttft_p99_s"] < record["seconds"]
        assert record["load_avg_1m_before"] >= 0 and record["cpus"] >= 1 and record["startup_s"] > 0
        assert record["env"] == {"SIROCCO_KV_CACHE_GIB": "0.25", "SIROCCO_MAX_MODEL_LEN": "1024"}
        assert record["commit"] and record["versions"]["torch"]


def test_variants_and_peer_command_lines(tmp_path: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    spec = parse_sirocco("gguf-2t:model=gguf,env=SIROCCO_NUM_THREADS=2", cache_dir=str(embedded_model_dir.parent))
    assert spec.model.endswith(".gguf") and pathlib.Path(spec.model).is_file()
    assert spec.env == {"SIROCCO_NUM_THREADS": "2"}
    assert parse_sirocco("plain", cache_dir=str(embedded_model_dir.parent)).model == str(embedded_model_dir.resolve())
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sirocco("bad:SIROCCO_NUM_THREADS", cache_dir=str(embedded_model_dir.parent))

    vllm = peer_command(ServerSpec("vllm", "vllm", "/m"), tmp_path, 8123, num_threads=2)
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "8123" in vllm and "float32" in vllm
    llama = peer_command(ServerSpec("llama-cpp", "llama-cpp", "/m.gguf"), tmp_path, 8124, num_threads=2)
    assert llama[1:3] == ["-m", "llama_cpp.server"] and llama[llama.index("--n_threads") + 1] == "2"


def test_default_order_brackets_the_peers(embedded_model_dir: pathlib.Path) -> None:
    args = cpu_peers.build_parser().parse_args(
        ["--sirocco", "a", "--sirocco", "b:SIROCCO_NUM_THREADS=2", "--cache-dir", str(embedded_model_dir.parent)]
    )
    assert [spec.name for spec in cpu_peers.server_order(args)] == ["a", "b", "vllm", "llama-cpp", "a"]
    args.order = "b,a,b"
    assert [spec.name for spec in cpu_peers.server_order(args)] == ["b", "a", "b"]
