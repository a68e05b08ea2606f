"""bench/host_profile.py end to end at tiny sizes: every scenario runs, the wrapped phases are timed, the patches undone.

It wraps engine methods by name from outside, so an engine refactor that renames one fails here, not in a GPU session.
"""

from __future__ import annotations

import json
import pathlib

import pytest

import engine.sampler
import engine.tokenizer
from bench import host_profile

pytestmark = pytest.mark.slow


def test_every_scenario_times_its_phases(tmp_path: pathlib.Path, embedded_model_dir: pathlib.Path) -> None:
    out = tmp_path / "host-profile.jsonl"
    original_group_rows = engine.sampler._group_rows
    original_add = engine.tokenizer.IncrementalDetokenizer.add
    host_profile.main([
        "--prompt-len", "48", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--batch-sizes", "4",
        "--decode-steps", "3", "--steady-steps", "6", "--sampling-steps", "2", "--async-requests", "4",
        "--async-max-tokens", "12", "--work-dir", str(tmp_path / "checkpoint"), "--tokenizer-dir", str(embedded_model_dir),
        "--out", str(out),
    ])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_key = {(r["scenario"], r.get("sampling"), r.get("step_class")): r for r in records}

    decode = by_key[("decode-4", "greedy", "decode")]
    assert decode["steps"] == 3 and decode["num_decodes"] == 4 and decode["num_prefill_tokens"] == 0
    for phase in ("schedule_us", "prepare_us", "forward_us", "logits_us", "sampler_us", "fast_post_us", "slow_post_us",
                  "detokenize_us"):  # fmt: skip
        assert decode[phase] > 0, phase
    assert decode["detokenize_us"] <= decode["slow_post_us"] and decode["critical_host_us"] < decode["host_us"]
    prefill = by_key[("decode-4", "greedy", "prefill")]
    assert prefill["num_prefill_tokens"] > 0
    assert any(scenario == "steady-8" for scenario, _, _ in by_key)

    penalties = by_key[("decode-8", "penalties", "decode")]
    assert penalties["sampler_penalties_us"] > 0 and penalties["sampler_host_us"] > 0
    assert ("decode-8", "top_p", "decode") in by_key

    (delivered,) = [r for r in records if r["scenario"] == "async-4"]
    assert delivered["output_tokens"] == 4 * 12
    assert delivered["deliver_us_per_token"] > 0 and delivered["event_loop_us_per_token"] > 0
    assert delivered["decode_steps"] is not None and delivered["decode_steps"]["num_decodes"] >= 3
    assert records[-1]["scenario"] == "total" and records[-1]["python_ref_ms"] > 0

    # The module-level patches are undone: the next engine in this process runs unwrapped.
    assert engine.sampler._group_rows is original_group_rows
    assert engine.tokenizer.IncrementalDetokenizer.add is original_add
