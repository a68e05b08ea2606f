"""Logits processors on synthetic logits: only the listed rows change, ids past the vocabulary are ignored, and the
batched penalties equal a row-by-row computation."""

from __future__ import annotations

import random

import torch

from engine import SamplingParams
from engine.logits_processors import TokenHistories, apply_logit_bias, apply_penalties, mask_stop_ids
from engine.sequence import PENDING_TOKEN_ID, Sequence

VOCAB = 16


def seq(token_ids: list[int], num_prompt: int) -> Sequence:
    return Sequence("r", 0, token_ids, num_prompt, arrival_s=0.0)


def test_logit_bias_changes_only_the_listed_rows_and_ignores_ids_past_the_vocabulary() -> None:
    logits = torch.zeros(3, VOCAB)
    apply_logit_bias(logits, [0, 2], [{1: 2.5, VOCAB: 9.0}, {1: -1.0, 15: 4.0}])
    expected = torch.zeros(3, VOCAB)
    expected[0, 1], expected[2, 1], expected[2, 15] = 2.5, -1.0, 4.0
    assert torch.equal(logits, expected)


def test_stop_ids_are_masked_only_on_the_listed_rows() -> None:
    logits = torch.zeros(3, VOCAB)
    mask_stop_ids(logits, [1], [frozenset({3, 5, VOCAB + 2})])
    assert torch.isinf(logits[1, [3, 5]]).all() and (logits[1, [3, 5]] < 0).all()
    assert int(torch.isinf(logits).sum()) == 2


def test_batched_penalties_equal_a_row_by_row_computation() -> None:
    rng = random.Random(0)
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.7),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(frequency_penalty=-0.5),
        SamplingParams(presence_penalty=1.0, frequency_penalty=0.25),
    ]
    # repeated tokens, an empty output, and an id past the vocabulary (ignored)
    seqs = [seq([rng.randrange(4) for _ in range(12)], 5), seq([1, 2, 2, 9], 4), seq([3, 3, 3, 7, 7, VOCAB + 1], 2)]
    seqs.append(seq([0] * 6, 1))
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = logits.clone()
    for row, (p, s) in enumerate(zip(params, seqs, strict=True)):
        for token in {t for t in s.token_ids if t < VOCAB}:
            value = expected[row, token]
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in {t for t in s.output_token_ids if t < VOCAB}:
            count = s.output_token_ids.count(token)
            expected[row, token] -= p.frequency_penalty * count + p.presence_penalty
    apply_penalties(logits, [0, 1, 2, 3], params, seqs)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert not torch.equal(logits[:4], torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))[:4])


def test_penalties_leave_the_other_rows_alone() -> None:
    logits = torch.ones(3, VOCAB)
    apply_penalties(logits, [1], [SamplingParams(presence_penalty=2.0)], [seq([4, 4, 6], 1)])
    assert torch.equal(logits[[0, 2]], torch.ones(2, VOCAB))
    assert logits[1, 4].item() == -1.0 and logits[1, 6].item() == -1.0 and logits[1, 0].item() == 1.0


def test_token_histories_follow_appends_replacements_and_new_sequences() -> None:
    """The kept histories always flatten to the sequences' current token ids, step after step."""
    rng = random.Random(2)
    histories = TokenHistories()
    seqs = [seq([rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))], 1) for _ in range(4)]
    for step in range(12):
        for s in seqs:
            s.token_ids.append(rng.randrange(VOCAB))
        if step == 3:
            seqs[1].token_ids[-1] = PENDING_TOKEN_ID  # a look-ahead placeholder, seen by this step...
        if step == 4:
            seqs[1].token_ids[-2] = 7  # ... and replaced by the real token before the next
        if step == 6:
            seqs = [*seqs[1:], seq([5, 6], 1)]  # one sequence finished, another joined
        expected = [t for s in seqs for t in s.token_ids]
        assert histories.flat(seqs).tolist() == expected, step
    # penalties computed through kept histories equal a fresh computation
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5)] * len(seqs)
    seqs[0].token_ids[-1] = 3
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(3))
    fresh = logits.clone()
    apply_penalties(logits, list(range(len(seqs))), params, seqs, histories)
    apply_penalties(fresh, list(range(len(seqs))), params, seqs)
    assert torch.equal(logits, fresh)
