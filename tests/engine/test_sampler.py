"""Sampler on synthetic logits: penalties, top-k / top-p / min-p filtering, seeds, greedy, logprobs."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.sampler import Sampler, SampleRow
from engine.sequence import Sequence

VOCAB = 8


def row(params: SamplingParams, token_ids: list[int] | None = None, num_prompt: int = 0, seed: int = 0) -> SampleRow:
    seq = Sequence("r", 0, token_ids or [], num_prompt, arrival_s=0.0)
    return SampleRow(params, torch.Generator().manual_seed(seed), seq, frozenset({7}))


def logits(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float32)


def draws(values: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler()
    return {sampler(values.clone(), [row(params, seed=i)]).token_ids[0] for i in range(n)}


def test_greedy_takes_the_argmax_and_reports_raw_logprobs() -> None:
    values = logits(0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    out = Sampler()(values.clone(), [row(SamplingParams(temperature=0.0, logprobs=2))])
    assert out.token_ids == [1]
    sampled, top_ids, top_lps = out.logprobs[0]  # type: ignore[misc]
    expected = torch.log_softmax(values[0], -1)
    assert sampled == pytest.approx(expected[1].item()) and top_ids == [1, 2]
    assert top_lps == pytest.approx([expected[1].item(), expected[2].item()])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    values = logits(2.0, 1.9, -1.0, -1.1, 0, 0, 0, 0)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(values.clone(), [row(params, [0, 2], num_prompt=1)]).token_ids == [1]  # 2.0 -> 1.0 < 1.9
    processed = values.clone()
    Sampler()(processed, [row(params, [0, 2], num_prompt=1)])
    assert processed[0, :4].tolist() == pytest.approx([1.0, 1.9, -2.0, -1.1])


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    values = logits(5.0, 4.5, 0, 0, 0, 0, 0, 0)
    processed = values.clone()
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = Sampler()(processed, [row(params, [1, 0, 0, 0], num_prompt=1)])  # prompt [1]; output three 0s
    assert processed[0, 0].item() == pytest.approx(5.0 - 0.5 - 3 * 0.25)
    assert processed[0, 1].item() == pytest.approx(4.5)  # only in the prompt: untouched
    assert out.token_ids == [1]


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    values = logits(0, 0, 0, 0, 0, 0, 0, 10.0)  # token 7 is the stop id
    params = SamplingParams(temperature=0.0, min_tokens=2)
    assert Sampler()(values.clone(), [row(params, [3, 4], num_prompt=1)]).token_ids != [7]
    assert Sampler()(values.clone(), [row(params, [3, 4, 5], num_prompt=1)]).token_ids == [7]


def test_top_k_top_p_min_p_restrict_the_draws() -> None:
    values = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.03, 0.01, 0.005, 0.005]]))
    assert draws(values, SamplingParams(temperature=1.0)) >= {0, 1, 2, 3}
    assert draws(values, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(values, SamplingParams(temperature=1.0, top_p=0.65)) == {0, 1}  # 0.4 < 0.65, 0.4 + 0.3 >= 0.65
    assert draws(values, SamplingParams(temperature=1.0, min_p=0.6)) == {0, 1}  # kept: p >= 0.6 * 0.4


def test_draws_follow_the_distribution_and_the_seed() -> None:
    values = torch.log(torch.tensor([[0.7, 0.3, 0, 0, 0, 0, 0, 0]]))
    sampler = Sampler()
    picks = [sampler(values.clone(), [row(SamplingParams(), seed=i)]).token_ids[0] for i in range(2000)]
    assert abs(picks.count(0) / len(picks) - 0.7) < 0.04
    again = [sampler(values.clone(), [row(SamplingParams(), seed=i)]).token_ids[0] for i in range(2000)]
    assert picks == again


def test_rows_are_independent_of_their_batch() -> None:
    values = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, top_p=0.9)
    batch = Sampler()(values.clone(), [row(params, seed=i) for i in range(5)]).token_ids
    alone = [Sampler()(values[i : i + 1].clone(), [row(params, seed=i)]).token_ids[0] for i in range(5)]
    assert batch == alone


def test_huge_top_k_is_clamped_to_the_vocabulary() -> None:
    values = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    huge = Sampler()(values.clone(), [row(SamplingParams(top_k=2**63), seed=5)]).token_ids
    unrestricted = Sampler()(values.clone(), [row(SamplingParams(), seed=5)]).token_ids
    assert huge == unrestricted
