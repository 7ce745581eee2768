"""The trainer's loss against values computed here: GRPO advantages and loss by hand, the SGSD loss from an
independent forward pass (plain HF logits, no packing) and the formulas written out."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from stages.engine.training import Sampler
from test_train import make_run, train_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# make_run(T=8): completion lengths 8 - (i % 3) for rollout i = 0, 1, 2, 3 -> 8, 7, 6, 8
LENS = [8, 7, 6, 8]
# group demo-000 = rollouts 0, 1 with rewards (1, 0); group demo-001 = rollouts 2, 3 with rewards (0, 0).
# A = (r - mean) / (unbiased std + 1e-4): std of (1, 0) = sqrt(0.5) = 0.7071068 -> A = +-0.5 / 0.7072068
A0 = 0.5 / (math.sqrt(0.5) + 1e-4)
ADV = [A0, -A0, 0.0, 0.0]


def _grpo_run(tmp_path, tiny):
    return make_run(tmp_path / "run", tiny, n_problems=2, samples=2, correct=lambda i: i == 0)


def test_grpo_advantages_are_the_hand_values(tmp_path, tiny, tiny_model_dir):
    from stages.engine.objectives.grpo import GRPO
    from stages.train import TrainConfig

    run = _grpo_run(tmp_path, tiny)
    data = GRPO(TrainConfig(model=str(tiny_model_dir), objective="grpo").resolved()).load(run, tiny[1])
    assert [it.rid for it in data.items] == ["demo-000#0", "demo-000#1", "demo-001#0", "demo-001#1"]
    assert [it.advantage for it in data.items] == pytest.approx(ADV, abs=1e-6)
    assert [len(it.completion_ids) for it in data.items] == LENS
    assert A0 == pytest.approx(0.70700680, abs=1e-7)


@pytest.mark.parametrize("agg", ["sequence-mean", "token-mean"])
def test_grpo_first_step_loss_is_the_hand_value(tmp_path, tiny, tiny_model_dir, agg):
    """pi_old from the training model: the first step's ratio is 1, so the per-token loss is -A_i.
    sequence-mean (TRL loss_type grpo): mean_i(-A_i) over the batch's sequences; token-mean: sum_i -A_i n_i / sum n_i.
    A batch of 2 of the 4 rollouts (partial groups) makes the sequence mean non-zero."""
    from stages import train

    run = _grpo_run(tmp_path, tiny)
    out = train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1, batch_size=2, micro_batch_size=1,
                              loss_agg=agg, seed=0), run)
    m = pl.read_parquet(out)
    batch = Sampler(4, 2, 0).batch(0)  # which rows the seeded sampler drew (input selection only)
    if agg == "sequence-mean":
        want = -sum(ADV[i] for i in batch) / 2
    else:
        want = -sum(ADV[i] * LENS[i] for i in batch) / sum(LENS[i] for i in batch)
    assert abs(want) > 1e-3  # the drawn batch holds a partial group
    assert m["ratio_mean"][0] == pytest.approx(1.0, abs=1e-5)
    assert m["loss"][0] == pytest.approx(want, abs=1e-5)
    assert m["advantage_abs"][0] == pytest.approx(sum(abs(ADV[i]) for i in batch) / 2, abs=1e-6)


def test_grpo_full_batch_token_mean_hand_value(tmp_path, tiny, tiny_model_dir):
    from stages import train

    run = _grpo_run(tmp_path, tiny)
    m = pl.read_parquet(train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1, batch_size=4,
                                            loss_agg="token-mean"), run))
    # -(A0 * 8 - A0 * 7) / (8 + 7 + 6 + 8) = -A0 / 29
    assert m["loss"][0] == pytest.approx(-A0 / 29, abs=1e-5)


def _independent_logprobs(model, prompt, completion):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)], -1)
    return lp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).tolist()


@pytest.mark.parametrize("teacher_mode", ["live", "fixed"])
def test_sgsd_trainer_loss_equals_an_independent_computation(tmp_path, tiny, tiny_model_dir, teacher_mode):
    """First step: loss = mean over rollouts of sum_k w_k rho_k (1/N) sum_t m_t (log 2 - softplus(-D^2 / 2)),
    D = teacher - student log-prob, with both log-probs from an unpacked HF forward of the initial model."""
    from stages import train

    model, tok, _ = tiny
    run = make_run(tmp_path / "run", tiny, n_problems=3, K=2)
    m = pl.read_parquet(train.run(train_cfg(tiny_model_dir, objective="sgsd", steps=1, batch_size=0,
                                            micro_batch_size=2, teacher_mode=teacher_mode), run))
    ro = {r["rollout_id"]: r for r in pl.read_parquet(run / "rollout.parquet").to_dicts()}
    st = pl.read_parquet(run / "score_teachers.parquet").sort(["rollout_id", "teacher_rank"]).to_dicts()
    pol = {(r["rollout_id"], r["teacher_rank"]): r for r in pl.read_parquet(run / "polarize.parquet").to_dicts()}
    per_rollout: dict[str, float] = {}
    for r in st:
        rid = r["rollout_id"]
        comp = ro[rid]["completion_ids"]
        s = _independent_logprobs(model, ro[rid]["prompt_ids"], comp)
        t = _independent_logprobs(model, r["teacher_prompt_ids"], comp)
        p = pol[(rid, r["teacher_rank"])]
        mask = p["token_mask"]
        n = max(1, sum(mask))
        gate = sum(math.log(2) - math.log1p(math.exp(-((tt - ss) ** 2) / 2)) for tt, ss, k in zip(t, s, mask) if k) / n
        per_rollout[rid] = per_rollout.get(rid, 0.0) + p["weight"] * p["polarity"] * gate
    want = sum(per_rollout.values()) / len(per_rollout)
    assert abs(want) > 1e-4  # the check is not trivially 0
    assert m["loss"][0] == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("source,ratio", [("policy", 1.0), ("sampler", math.exp(-0.1))])
def test_grpo_pi_old_from_the_training_model_or_the_sampler(tmp_path, tiny, tiny_model_dir, source, ratio):
    """Sampler log-probs shifted by +0.1 (an engine/trainer mismatch): 'sampler' puts it in the first ratio,
    exp(-0.1) = 0.904837; 'policy' (default, as TRL) takes pi_old from the training model: ratio 1."""
    from stages import train
    from stages.engine.atomic import write_parquet

    run = _grpo_run(tmp_path, tiny)
    rt = pl.read_parquet(run / "rollout.parquet")
    rt = rt.with_columns(pl.col("sample_logprobs").list.eval(pl.element() + 0.1))
    write_parquet(rt, run / "rollout.parquet")
    m = pl.read_parquet(train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1, batch_size=4,
                                            old_logprobs=source), run))
    assert m["ratio_mean"][0] == pytest.approx(ratio, abs=1e-5)
