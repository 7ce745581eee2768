"""Per-step health metrics (stages/engine/health.py) on hand values and an independent entropy computation."""

import math

import polars as pl
import pytest
import torch

from stages.engine.health import (format_rate, has_boxed_answer, masked_sum_count,
                                  rollout_health, sampled_nll_mean, teacher_weight_entropy, token_entropy,
                                  train_entropy_mean, weight_entropy)
from stages.engine.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

# p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3
H_QUARTER = math.log(4) - 0.75 * math.log(3)


def test_token_entropy_hand_values():
    assert H_QUARTER == pytest.approx(0.5623351446188083, abs=1e-15)
    ln3 = math.log(3)
    assert token_entropy(torch.tensor([0.0, ln3])).item() == pytest.approx(H_QUARTER, abs=1e-6)
    # temperature 2 on doubled logits: the same distribution
    assert token_entropy(torch.tensor([0.0, 2 * ln3]), temperature=2.0).item() == pytest.approx(H_QUARTER, abs=1e-6)
    # uniform over 4: ln 4; a -inf logit (a token that cannot come) adds nothing, and no NaN
    e = token_entropy(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, ln3, float("-inf"), float("-inf")]]))
    assert e.tolist() == pytest.approx([math.log(4), H_QUARTER], abs=1e-6)
    # a near-deterministic distribution: ~0
    assert token_entropy(torch.tensor([0.0, 60.0])).item() == pytest.approx(0.0, abs=1e-20)


def _chunked_entropy(head, hidden, *, temperature=1.0, chunk=2048):
    """The trainer's token entropy: the scoring core's, from its own fp32 logits chunks (gather_logprobs)."""
    from stages.engine.scoring import gather_logprobs

    out: list = []
    gather_logprobs(head, hidden, torch.zeros(hidden.shape[0], dtype=torch.long), temperature=temperature, chunk=chunk,
                    entropy_out=out)
    return out[0]


def test_chunked_entropy_matches_categorical_for_any_chunk():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 8, generator=g) * 2)
    hidden = torch.randn(7, 8, generator=g, requires_grad=True)
    want = torch.distributions.Categorical(logits=(hidden @ head.weight.T).detach() / 0.7).entropy()
    for chunk in (1, 3, 7, 100):
        got = _chunked_entropy(head, hidden, temperature=0.7, chunk=chunk)
        assert got.shape == (7,) and got.dtype == torch.float32 and not got.requires_grad
        assert torch.allclose(got, want, atol=1e-5), chunk
    assert _chunked_entropy(head, hidden[:0]).shape == (0,)
    with pytest.raises(ValueError):
        _chunked_entropy(head, hidden, chunk=0)


def test_chunked_entropy_on_the_tiny_model_matches_its_own_logits(tiny):
    from stages.engine.scoring import split_lm

    model = tiny[0]
    ids = torch.tensor([[5, 17, 3, 42, 8, 9, 11]])
    body, head = split_lm(model)
    with torch.no_grad():
        hidden = body(input_ids=ids).last_hidden_state[0]
        logits = model(input_ids=ids).logits[0]
    want = torch.distributions.Categorical(logits=logits.float() / 1.1).entropy()
    assert torch.allclose(_chunked_entropy(head, hidden, temperature=1.1, chunk=3), want, atol=1e-4)


def test_masked_sum_count_and_train_entropy_mean():
    assert masked_sum_count(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 0, 1, 0])) == (4.0, 2)
    tr = pl.DataFrame({"entropy": [1.0, 2.0], "mask_tokens": [10, 30], "tokens": [40, 40]})
    assert train_entropy_mean(tr) == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)  # 1.75: weighted by mask_tokens
    assert train_entropy_mean(tr.drop("mask_tokens")) == pytest.approx(1.5)  # by tokens, equal
    assert train_entropy_mean(pl.DataFrame({"entropy": [1.0, 3.0]})) == pytest.approx(2.0)
    assert train_entropy_mean(pl.DataFrame({"loss": [1.0]})) is None


def test_format_rate_uses_the_graders_box():
    texts = ["so the answer is \\boxed{5}.",       # box
             "Answer: 5",                           # an answer line is not a box
             "\\boxed{5",                           # unterminated: no box
             "\\fbox{x+1}",                         # fbox counts
             None, "",                              # nothing
             "therefore \\boxed 7.",                # \boxed 7
             "\\boxed{" + "1" * 1001 + "}"]         # longer than MAX_ANSWER_CHARS: the grader reads nothing
    assert [has_boxed_answer(t) for t in texts] == [True, False, False, True, False, False, True, False]
    assert format_rate(texts) == pytest.approx(3 / 8)
    assert math.isnan(format_rate([]))


def test_rollout_health_hand_values(tmp_path):
    ro = pl.DataFrame({"rollout_id": ["p#0", "p#1", "q#0"],
                       "completion_ids": [[1, 2, 3], [4], [5, 6]],
                       "finish_reason": ["stop", "length", "stop"],
                       "completion": ["\\boxed{1}", "no box", "\\boxed{2}"],
                       "sample_logprobs": [[-1.0, -2.0, -0.5], None, [-3.0, -0.5]]})
    h = rollout_health(ro)
    assert h == pytest.approx({"completion_len_mean": 2.0, "completion_len_max": 3, "truncated_frac": 1 / 3,
                               "format_rate": 2 / 3, "sampled_nll_mean": 7.0 / 5})
    assert sampled_nll_mean([None]) is None
    bad = ro.with_columns(pl.Series("sample_logprobs", [[-1.0, float("nan"), 0.0], None, [-3.0, -0.5]]))
    with pytest.raises(InputError, match="rollout.parquet.*sample_logprobs.*p#0"):
        rollout_health(bad, tmp_path / "rollout.parquet")
    with pytest.raises(InputError, match="finish_reason"):
        rollout_health(ro.drop("finish_reason"), tmp_path / "rollout.parquet")


def test_teacher_weight_entropy_hand_values(tmp_path):
    assert weight_entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    assert weight_entropy([1.0, 0.0, 0.0]) == 0.0
    assert weight_entropy([1.0, 3.0]) == pytest.approx(H_QUARTER)  # renormalised to (1/4, 3/4)
    with pytest.raises(ValueError):
        weight_entropy([0.5, -0.1])
    st = pl.DataFrame({"rollout_id": ["a", "a", "b", "b", "b", "c", "c", "c", "c"],
                       "teacher_rank": [0, 1, 0, 1, 2, 0, 1, 2, 3],
                       "weight": [0.5, 0.5, 1.0, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25]})
    # (ln 2 + 0 + ln 4) / 3 = ln 2
    assert teacher_weight_entropy(st) == pytest.approx(math.log(2))
    assert teacher_weight_entropy(st.head(0)) is None
    p = tmp_path / "score_teachers.parquet"
    with pytest.raises(InputError, match="weight.*non-finite.*'b'"):
        teacher_weight_entropy(st.with_columns(pl.Series("weight", [0.5, 0.5, float("inf")] + [0.0] * 6)), p)
    with pytest.raises(InputError, match="negative.*'c'"):
        teacher_weight_entropy(st.with_columns(pl.Series("weight", [0.5] * 5 + [-0.25] + [0.25] * 3)), p)
    with pytest.raises(InputError, match="'b': its teacher weights are all 0"):
        teacher_weight_entropy(st.with_columns(pl.Series("weight", [0.5, 0.5] + [0.0] * 3 + [0.25] * 4)), p)


@pytest.mark.parametrize("grad", [False, True])
def test_scoring_core_entropy_matches_the_full_logits(tiny, grad):
    """``score_segments(..., entropy_out=)`` (the trainer's loss pass) gives, per segment and completion position, the
    entropy of the full next-token distribution at the temperature, as an unpacked forward's logits give it
    (``torch.special.entr``, an independent formula), for any chunk size, with and without gradients (the checkpointed
    chunks are recomputed in backward: the entropy is still one value per position)."""
    from stages.engine.scoring import Segment, score_segments

    model = tiny[0]
    segs = [Segment.of([3, 7, 9], [11, 12, 13, 14]), Segment.of([5], [6, 8]), Segment.of([3, 7, 9], [11, 12, 13, 14])]
    T = 1.3
    want = []
    with torch.no_grad():
        for s in segs:
            ids = torch.tensor([list(s.prompt_ids) + list(s.completion_ids)])
            z = model(input_ids=ids).logits[0].double() / T
            p = torch.softmax(z, -1)[len(s.prompt_ids) - 1 : -1]
            want.append(torch.special.entr(p).sum(-1))
    for chunk in (1, 3, 64):
        ents: list = []
        with torch.set_grad_enabled(grad):
            lps = score_segments(model, segs, temperature=T, logit_chunk=chunk, grad=grad, entropy_out=ents)
            if grad:
                torch.cat(lps).sum().backward()
        assert [e.shape[0] for e in ents] == [4, 2, 4] and not any(e.requires_grad for e in ents)
        for e, w in zip(ents, want):
            assert torch.allclose(e.double(), w, atol=1e-4)
    model.zero_grad(set_to_none=True)
