"""The packed, chunked scoring core against the naive padded full-logits computation."""

import random

import pytest
import torch

from stages.engine.generation.hf import HFBackend
from stages.engine.generation.base import SamplingConfig
from stages.engine.prompts import chat_prompt_ids, student_prompt, teacher_prompt
from stages.engine.scoring import Segment, pack_batches, score_naive, score_segments


def _segments(tok, n_rollouts=5, k=3, seed=0):
    rng = random.Random(seed)
    segs = []
    for r in range(n_rollouts):
        problem = f"Compute ${rng.randint(1, 99)} + {rng.randint(1, 99)}$." + " Then double it." * rng.randint(0, 4)
        completion = [rng.randint(5, len(tok) - 1) for _ in range(rng.randint(3, 40))]
        segs.append(Segment.of(chat_prompt_ids(tok, student_prompt(problem), False), completion))
        for j in range(k):
            skill = {"title": f"skill {j}", "principle": "p " * rng.randint(1, 20), "when_to_apply": "always"}
            mistake = {"description": f"mistake {j}", "how_to_avoid": "check " * rng.randint(1, 10)}
            segs.append(Segment.of(chat_prompt_ids(tok, teacher_prompt(problem, skill, mistake), False), completion))
    return segs


@pytest.mark.parametrize("budget,chunk", [(100000, 2048), (300, 7), (1, 1)])
def test_packed_chunked_equals_naive(tiny, budget, chunk):
    model, tok, _ = tiny
    segs = _segments(tok)
    assert len({len(s) for s in segs}) > 5  # variable lengths
    ours = score_segments(model, segs, token_budget=budget, logit_chunk=chunk)
    ref = score_naive(model, segs, pad_id=tok.pad_token_id)
    for a, b, s in zip(ours, ref, segs):
        assert a.dtype == torch.float32 and a.shape == (len(s.completion_ids),)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_scoring_temperature(tiny):
    model, tok, _ = tiny
    segs = _segments(tok, 2, 1)
    for a, b in zip(score_segments(model, segs, temperature=1.1), score_naive(model, segs, temperature=1.1, pad_id=tok.pad_token_id)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_sequences_do_not_attend_across_pack_boundaries(tiny):
    model, tok, _ = tiny
    segs = _segments(tok, 3, 1)
    alone = [score_segments(model, [s])[0] for s in segs]
    packed = score_segments(model, segs, token_budget=10**6)
    for a, b in zip(alone, packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_grad_path_matches_and_backpropagates(tiny):
    model, tok, _ = tiny
    segs = _segments(tok, 2, 1)
    model.zero_grad()
    lp = score_segments(model, segs, grad=True, logit_chunk=5)
    for a, b in zip(lp, score_naive(model, segs, pad_id=tok.pad_token_id)):
        torch.testing.assert_close(a.detach(), b, atol=1e-4, rtol=0)
    sum(x.sum() for x in lp).backward()
    g = [p.grad for p in model.parameters() if p.grad is not None]
    assert g and all(torch.isfinite(x).all() for x in g)
    model.zero_grad()


def test_pack_batches_respects_budget():
    lengths = [5, 9, 3, 12, 7, 1]
    batches = pack_batches(lengths, 12)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 12 for b in batches)
    assert pack_batches([20, 3], 10) == [[0], [1]]


def test_sampling_logprobs_equal_scoring_core_hf(tiny):
    """At T=1 with top-k/top-p off, rollout's stored log-probs equal the scoring core's (transformers backend)."""
    model, tok, _ = tiny
    prompts = [chat_prompt_ids(tok, student_prompt(p), False) for p in ["Compute $2+3$.", "What is the sum of the first 10 positive integers?"]]
    cfg = SamplingConfig(n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24, seed=3, batch_size=4)
    comps = HFBackend(model, tok).generate(prompts, cfg)
    assert len(comps) == 6 and len({tuple(c.token_ids) for c in comps}) > 1
    scored = score_segments(model, [Segment.of(prompts[c.prompt_index], c.token_ids) for c in comps])
    for c, s in zip(comps, scored):
        assert c.finish_reason in ("stop", "length")
        assert max(abs(a - b) for a, b in zip(c.logprobs, s.tolist())) < 1e-3


def test_greedy_equals_model_generate(tiny):
    model, tok, _ = tiny
    prompts = [chat_prompt_ids(tok, student_prompt(p), False) for p in ["Compute $2+3$.", "Solve for $x$: $3x + 4 = 13$."]]
    comps = HFBackend(model, tok).generate(prompts, SamplingConfig(temperature=0, max_new_tokens=12, batch_size=2))
    for p, c in zip(prompts, comps):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert c.token_ids == ref[: len(c.token_ids)]
