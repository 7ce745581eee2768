"""SGSD formulas (docs/DESIGN.md 1.4) against hand-computed values."""

import math

import pytest
import torch

from stages.engine.objectives.sgsd import (
    category, gated_loss, maskable_token_ids, polarity, rollout_loss, stance, support_score, token_mask,
)
from stages.engine.objectives.sgsd import teacher_weights


def test_support_score_clips_and_masks():
    delta = torch.tensor([0.5, -4.0, 2.0, 10.0])
    mask = torch.tensor([True, True, False, True])
    # clip -> [0.5, -3, 2, 3]; masked sum 0.5 - 3 + 3 = 0.5; N = 3
    assert support_score(delta, mask).item() == pytest.approx(0.5 / 3, abs=1e-7)


def test_support_score_empty_mask_uses_n_1():
    assert support_score(torch.tensor([2.0, 1.0]), torch.tensor([False, False])).item() == 0.0
    # N = max(1, 1) with a single masked token
    assert support_score(torch.tensor([5.0, 1.0]), torch.tensor([True, False])).item() == pytest.approx(3.0)


def test_support_score_batched_over_teachers():
    delta = torch.tensor([[1.0, 1.0], [-5.0, 0.0]])
    mask = torch.tensor([True, True])
    assert support_score(delta, mask).tolist() == pytest.approx([1.0, -1.5])


@pytest.mark.parametrize("a,want", [(0.05, 0), (-0.05, 0), (0.0500001, 1), (-0.06, -1), (0.04, 0), (0.0, 0), (2.5, 1)])
def test_stance_threshold(a, want):
    assert stance(a) == want
    assert int(stance(torch.tensor(a))) == want


@pytest.mark.parametrize(
    "o,sigma,rho,cat",
    [(1, 1, 1, "helpful"), (-1, -1, 1, "warning"), (-1, 1, -1, "misleading"),
     (1, -1, -1, "over_suppressive"), (1, 0, 0, "neutral"), (-1, 0, 0, "neutral")],
)
def test_polarity_cells(o, sigma, rho, cat):
    assert polarity(o, sigma) == rho
    assert category(o, sigma) == cat


def test_polarity_rejects_bad_outcome():
    with pytest.raises(ValueError):
        polarity(0, 1)


# (D, l(D), dl/dD): l = log2 - softplus(-D^2/2), dl/dD = D * sigmoid(-D^2/2)
HAND = [
    (0.0, 0.0, 0.0),
    (0.5, 0.0605481, 0.2343953),   # log2 - log(1 + e^-0.125); 0.5 * sigmoid(-0.125)
    (1.22, 0.3044118, 0.3929454),  # log2 - log(1 + e^-0.7442); 1.22 * sigmoid(-0.7442)
    (3.0, 0.6820995, 0.0329608),   # log2 - log(1 + e^-4.5);    3 * sigmoid(-4.5)
    (6.0, 0.6931472, 9.138e-08),   # saturated at log 2;        6 * sigmoid(-18)
]


@pytest.mark.parametrize("d,val,grad", HAND)
def test_gated_loss_value_and_gradient(d, val, grad):
    for sign in (1.0, -1.0):
        x = torch.tensor(sign * d, dtype=torch.float64, requires_grad=True)
        y = gated_loss(x)
        y.backward()
        assert y.item() == pytest.approx(val, abs=1e-6)
        assert x.grad.item() == pytest.approx(sign * grad, abs=1e-6, rel=1e-3)


def test_gated_loss_gradient_peaks_near_1_22():
    d = torch.linspace(0.01, 4, 4000, dtype=torch.float64, requires_grad=True)
    gated_loss(d).sum().backward()
    assert d[d.grad.argmax()].item() == pytest.approx(1.22, abs=0.01)
    assert gated_loss(torch.tensor(50.0)).item() == pytest.approx(math.log(2))


def test_teacher_weights_softmax():
    w = teacher_weights([0.8, 0.6, 0.2])
    # e^.8 = 2.22554, e^.6 = 1.82212, e^.2 = 1.22140, sum 5.26906
    assert w == pytest.approx([0.42238, 0.34581, 0.23181], abs=1e-5)
    assert sum(w) == pytest.approx(1.0)
    assert teacher_weights([0.3, 0.3]) == pytest.approx([0.5, 0.5])
    assert teacher_weights([1.0, 0.0], temperature=0.5) == pytest.approx([0.880797, 0.119203], abs=1e-6)


def test_rollout_loss_hand_computed():
    s = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[-0.5, -2.0], [-1.0, -3.0]], dtype=torch.float64)
    # teacher 1: D = [0.5, 0] -> l = [0.0605481, 0] -> mean 0.0302741
    # teacher 2: D = [0, -1]  -> l = [0, 0.2190696] -> mean 0.1095348
    # L = 0.6 * 1 * 0.0302741 + 0.4 * (-1) * 0.1095348 = -0.0256494
    loss = rollout_loss(s, t, torch.tensor([True, True]), torch.tensor([0.6, 0.4]), torch.tensor([1, -1]))
    assert loss.item() == pytest.approx(-0.0256494, abs=1e-6)
    loss.backward()
    # dL/ds_t = -sum_k w_k rho_k (1/N) l'(D_kt): t0: -0.6*0.5*0.2343953 = -0.0703186; t1: +0.4*0.5*l'(-1) = 0.2*(-0.3775407)
    assert s.grad.tolist() == pytest.approx([-0.0703186, -0.0755081], abs=1e-6)


def test_rollout_loss_stance_variant_hand_computed():
    """reversed_tokens='stance': a reversed teacher's term keeps only tokens whose Delta has its stance's sign."""
    # correct rollout, over-suppressive teacher (sigma = -1, rho = -1) and a helpful one (sigma = +1, rho = +1)
    s = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[-2.0, -1.5, -1.0], [-0.5, -2.0, -1.0]], dtype=torch.float64)
    mask, w = torch.tensor([True, True, True]), torch.tensor([1.0, 0.0])
    rho, sigma = torch.tensor([-1, 1]), torch.tensor([-1, 1])
    # teacher 1: D = [-1, 0.5, 0]; l = [0.2190696, 0.0605481, 0]
    # all:    L = -(0.2190696 + 0.0605481) / 3 = -0.0932059; dL/ds = -rho/N l'(D) = [1/3 * (-0.3775407), 1/3 * 0.2343953, 0]
    loss = rollout_loss(s, t, mask, w, rho, sigma=sigma, reversed_tokens="all")
    assert loss.item() == pytest.approx(-0.0932059, abs=1e-6)
    loss.backward()
    assert s.grad.tolist() == pytest.approx([-0.1258469, 0.0781318, 0.0], abs=1e-6)  # lowers s_1: a correct token
    s.grad = None
    # stance: only t = 0 (sign(D) = -1 = sigma); L = -0.2190696 / 3 = -0.0730232 (N stays 3)
    loss = rollout_loss(s, t, mask, w, rho, sigma=sigma, reversed_tokens="stance")
    assert loss.item() == pytest.approx(-0.0730232, abs=1e-6)
    loss.backward()
    assert s.grad.tolist() == pytest.approx([-0.1258469, 0.0, 0.0], abs=1e-6)
    # a wrong rollout's misleading teacher (sigma = +1, rho = -1): D = [1, -0.5] keeps t = 0 only
    s2 = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    t2 = torch.tensor([[0.0, -1.5]], dtype=torch.float64)
    loss = rollout_loss(s2, t2, torch.tensor([True, True]), torch.tensor([1.0]), torch.tensor([-1]),
                        sigma=torch.tensor([1]), reversed_tokens="stance")
    assert loss.item() == pytest.approx(-0.2190696 / 2, abs=1e-6)
    # rho = +1 terms are untouched by the variant
    a = rollout_loss(s2, t2, torch.tensor([True, True]), torch.tensor([1.0]), torch.tensor([1]), sigma=torch.tensor([-1]),
                     reversed_tokens="stance")
    assert a.item() == pytest.approx((0.2190696 + 0.0605481) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        rollout_loss(s2, t2, torch.tensor([True, True]), torch.tensor([1.0]), torch.tensor([-1]), reversed_tokens="stance")


def test_rollout_loss_respects_mask_and_teacher_is_constant():
    s = torch.tensor([-1.0, -2.0], requires_grad=True)
    t = torch.tensor([[0.0, 5.0]], requires_grad=True)
    loss = rollout_loss(s, t, torch.tensor([True, False]), torch.tensor([1.0]), torch.tensor([1]))
    assert loss.item() == pytest.approx(0.6931472 - math.log(1 + math.exp(-0.5)), abs=1e-6)
    loss.backward()
    assert t.grad is None and s.grad[1].item() == 0.0


def test_token_mask_excludes_special_think_and_newlines(tiny):
    _, tok, _ = tiny
    special, newline = maskable_token_ids(tok)
    v = tok.get_vocab()
    im_end, think, end_think = v["<|im_end|>"], v["<think>"], v["</think>"]
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    nl2 = tok("\n\n", add_special_tokens=False)["input_ids"]
    word = tok("Therefore", add_special_tokens=False)["input_ids"]
    space_word = tok(" 12", add_special_tokens=False)["input_ids"]
    ids = [think] + nl + word + nl2 + space_word + [end_think, im_end]
    m = token_mask(ids, special, newline)
    want = [False] + [False] * len(nl) + [True] * len(word) + [False] * len(nl2) + [True] * len(space_word) + [False, False]
    assert m == want
    assert tok.pad_token_id in special


def test_method_parameters_are_declared_once_and_reach_each_stage():
    """k / weight temperature (score-teachers), clip / stance threshold (polarize), tau / polarity (train) are
    SGSDMethod's fields: same defaults and ranges on every stage, and method_of() reads them back."""
    import dataclasses

    from stages.engine.config import field_opt
    from stages.engine.errors import InputError
    from stages.engine.objectives.sgsd import SGSDMethod, method_of
    from stages.polarize import PolarizeConfig
    from stages.score_teachers import ScoreTeachersConfig
    from stages.train import TrainConfig

    assert dataclasses.astuple(SGSDMethod()) == (8, 1.0, 3.0, 0.05, 1.0, "verifier")
    declared = {f.name: f for f in dataclasses.fields(SGSDMethod)}
    for cls, names in ((ScoreTeachersConfig, ("k", "weight_temperature")), (PolarizeConfig, ("clip", "stance_threshold")),
                       (TrainConfig, ("tau", "polarity"))):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for n in names:
            a, b = field_opt(fields[n]), field_opt(declared[n])
            assert fields[n].default == declared[n].default
            assert (a["help"], a["ge"], a["gt"], a["choices"]) == (b["help"], b["ge"], b["gt"], b["choices"])
    pc = PolarizeConfig(clip=2.0, stance_threshold=0.2)
    assert method_of(pc) == SGSDMethod(clip=2.0, stance_threshold=0.2)
    assert method_of(TrainConfig(model="m", tau=0.5, polarity="imitate")) == SGSDMethod(tau=0.5, polarity="imitate")
    with pytest.raises(InputError, match="stance-threshold must be >= 0"):
        SGSDMethod(stance_threshold=-0.1)
    with pytest.raises(InputError, match="--k must be >= 1"):
        ScoreTeachersConfig(model="m", k=0)


def test_trainer_takes_the_stance_polarize_wrote(tmp_path):
    """The reversed-token gate uses the stance polarize gave each teacher (its own threshold), not a second
    threshold in the trainer; a table without the column falls back to the support at the default threshold."""
    import polars as pl

    from stages.engine.objectives.sgsd import SGSD
    from stages.train import TrainConfig

    pl.DataFrame({"rollout_id": ["r"], "problem_id": ["p"], "prompt_ids": [[1]], "completion_ids": [[2, 3]]}
                 ).write_parquet(tmp_path / "rollout.parquet")
    pl.DataFrame({"rollout_id": ["r", "r"], "teacher_rank": [0, 1], "teacher_prompt_ids": [[4], [5]],
                  "teacher_logprobs": [[-1.0, -1.0], [-2.0, -2.0]]}).write_parquet(tmp_path / "score_teachers.parquet")
    pol = pl.DataFrame({"rollout_id": ["r", "r"], "teacher_rank": [0, 1], "weight": [0.5, 0.5], "polarity": [0, 1],
                        "token_mask": [[True, True]] * 2, "support": [0.1, -0.3], "stance": [0, -1]})
    pol.write_parquet(tmp_path / "polarize.parquet")
    obj = SGSD(TrainConfig(model="m").resolved())
    assert [t.stance for t in obj.load(tmp_path, None).items[0].teachers] == [0, -1]  # polarize's (threshold 0.2)
    pol.drop("stance").write_parquet(tmp_path / "polarize.parquet")
    assert [t.stance for t in obj.load(tmp_path, None).items[0].teachers] == [1, -1]  # |0.1| > 0.05
