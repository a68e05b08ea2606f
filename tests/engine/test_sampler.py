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


def test_draws_never_land_on_a_zero_probability_token_and_match_each_probability() -> None:
    # zeros between, before and after the live tokens: the inverse-CDF draw must step over every flat stretch
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0]])
    sampler = Sampler(seed=3)
    unseeded = [SampleRow(SamplingParams(), None, Sequence("r", 0, [], 0, arrival_s=0.0), frozenset({7})) for _ in range(8)]
    picks = [sampler(torch.log(probs).expand(8, -1).clone(), unseeded).token_ids for _ in range(500)]  # 4000 shared draws
    flat = [t for step in picks for t in step]
    assert set(flat) == {1, 4, 6}
    for token, p in ((1, 0.5), (4, 0.25), (6, 0.25)):
        assert abs(flat.count(token) / len(flat) - p) < 0.03, (token, flat.count(token) / len(flat))


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


def unseeded(params: SamplingParams, token_ids: list[int] | None = None, num_prompt: int = 0) -> SampleRow:
    """A row without its own generator: it takes part in the sampler's shared draw."""
    return SampleRow(params, None, Sequence("r", 0, token_ids or [], num_prompt, arrival_s=0.0), frozenset({7}))


def test_mixed_batch_greedy_rows_take_the_argmax_and_seeded_rows_match_their_run_alone() -> None:
    values = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.5, top_k=5, min_p=0.05)
    batch_rows = [row(greedy), row(seeded, seed=11), unseeded(SamplingParams()), row(greedy), row(seeded, seed=12)]
    batch_rows.append(unseeded(SamplingParams(top_p=0.8)))
    out = Sampler()(values.clone(), batch_rows).token_ids
    argmax = values.argmax(dim=-1).tolist()
    assert out[0] == argmax[0] and out[3] == argmax[3]
    for i, seed in ((1, 11), (4, 12)):
        assert out[i] == Sampler()(values[i : i + 1].clone(), [row(seeded, seed=seed)]).token_ids[0]


def test_unseeded_rows_share_one_draw_that_the_sampler_seed_reproduces() -> None:
    values = torch.zeros(64, VOCAB)  # uniform: every token is possible
    rows = [unseeded(SamplingParams()) for _ in range(64)]
    first = Sampler(seed=3)(values.clone(), rows).token_ids
    assert first == Sampler(seed=3)(values.clone(), rows).token_ids
    assert first != Sampler(seed=4)(values.clone(), rows).token_ids
    assert len(set(first)) > 4  # one shared draw still gives each row its own noise


def test_logit_bias_applies_to_each_row_its_own_bias() -> None:
    values = torch.zeros(3, VOCAB)
    processed = values.clone()
    params = [
        SamplingParams(temperature=0.0, logit_bias={2: 5.0, 4: -1.0}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={6: 3.0, 100: 50.0}),  # 100 is past the vocabulary: ignored
    ]
    out = Sampler()(processed, [row(p) for p in params])
    assert out.token_ids == [2, 0, 6]
    assert processed[0].tolist() == [0, 0, 5.0, 0, -1.0, 0, 0, 0]
    assert processed[1].tolist() == [0] * VOCAB
    assert processed[2].tolist() == [0, 0, 0, 0, 0, 0, 3.0, 0]


def test_penalties_on_several_rows_count_repeated_tokens() -> None:
    values = torch.tensor([[3.0, 2.0, 1.0, -1.0, 0, 0, 0, 0]] * 3)
    processed = values.clone()
    rows = [
        row(SamplingParams(temperature=0.0, frequency_penalty=0.5), [0, 1, 1, 1, 2], num_prompt=2),  # output 1,1,2
        row(SamplingParams(temperature=0.0, repetition_penalty=2.0), [3, 3, 0], num_prompt=1),  # seen: 0 and 3
        row(SamplingParams(temperature=0.0, presence_penalty=1.5), [0, 0, 0, 5], num_prompt=0),
    ]
    Sampler()(processed, rows)
    assert processed[0].tolist() == pytest.approx([3.0, 2.0 - 2 * 0.5, 1.0 - 0.5, -1.0, 0, 0, 0, 0])
    assert processed[1].tolist() == pytest.approx([1.5, 2.0, 1.0, -2.0, 0, 0, 0, 0])
    assert processed[2].tolist() == pytest.approx([1.5, 2.0, 1.0, -1.0, 0, -1.5, 0, 0])


def test_min_tokens_masks_only_the_rows_below_it() -> None:
    values = logits(0, 0, 0, 0, 0, 0, 0, 10.0).repeat(3, 1)
    params = SamplingParams(temperature=0.0, min_tokens=2)
    rows = [row(params, [3, 4], num_prompt=1), row(params, [3, 4, 5], num_prompt=1), row(SamplingParams(temperature=0.0))]
    assert Sampler()(values, rows).token_ids == [0, 7, 7]


def test_logprobs_only_for_the_rows_that_ask_each_with_its_own_k() -> None:
    values = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0), SamplingParams(logprobs=0)]
    params.append(SamplingParams(temperature=0.0, logprobs=1, logit_bias={0: 100.0}))  # logprobs stay the raw ones
    out = Sampler()(values.clone(), [row(p, seed=i) for i, p in enumerate(params)])
    expected = torch.log_softmax(values, dim=-1)
    assert out.logprobs[1] is None
    for i, k in ((0, 3), (2, 0), (3, 1)):
        sampled, top_ids, top_lps = out.logprobs[i]  # type: ignore[misc]
        assert sampled == pytest.approx(expected[i, out.token_ids[i]].item())
        assert top_ids == expected[i].topk(k).indices.tolist()
        assert top_lps == pytest.approx(expected[i].topk(k).values.tolist())
    assert out.token_ids[3] == 0


def test_top_k_applies_only_to_the_rows_that_ask() -> None:
    values = (torch.arange(VOCAB) * 0.01).repeat(2, 1)  # nearly uniform, the last token on top
    rows = [unseeded(SamplingParams(top_k=1)), unseeded(SamplingParams())]
    sampler = Sampler()
    picks = [sampler(values.clone(), rows).token_ids for _ in range(200)]
    assert {p[0] for p in picks} == {VOCAB - 1}
    assert len({p[1] for p in picks}) == VOCAB
