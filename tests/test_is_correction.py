"""Importance-sampling correction of the engine/trainer mismatch (issue 23, item 2): the weights of every mode
by hand, their place in the GRPO token loss, and the per-objective defaults (TRL 0.26 as the reference ran it)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.engine.errors import InputError
from stages.engine.objectives.grpo import IS_CAP, is_weights, sequence_loss
from stages.train import TrainConfig

OLD = torch.tensor([-1.0, -0.5, -2.0])
SMP = torch.tensor([-2.5, -0.6, -1.0])  # d = +1.5, +0.1, -1.0 -> r = 4.4817, 1.1052, 0.3679
MASK = torch.tensor([True, True, True])


def test_token_modes_by_hand():
    r = [math.exp(1.5), math.exp(0.1), math.exp(-1.0)]
    assert is_weights(OLD, SMP, MASK, "token-truncate", 2.0).tolist() == pytest.approx([2.0, r[1], r[2]], rel=1e-6)
    assert is_weights(OLD, SMP, MASK, "token-mask", 2.0).tolist() == pytest.approx([0.0, r[1], r[2]], rel=1e-6)
    assert is_weights(OLD, SMP, MASK, "none").tolist() == [1.0, 1.0, 1.0]


def test_sequence_modes_by_hand_and_the_mask():
    # sum d = 0.6 -> r = 1.8221 (below 2: kept as is); a masked-out token does not count
    r = math.exp(0.6)
    assert is_weights(OLD, SMP, MASK, "sequence-mask", 2.0).tolist() == pytest.approx([r] * 3, rel=1e-6)
    assert is_weights(OLD, SMP, MASK, "sequence-truncate", 1.5).tolist() == pytest.approx([1.5] * 3)
    assert is_weights(OLD, SMP, MASK, "sequence-mask", 1.5).tolist() == [0.0, 0.0, 0.0]
    m = torch.tensor([False, True, True])  # sum d = -0.9
    assert is_weights(OLD, SMP, m, "sequence-mask", IS_CAP).tolist() == pytest.approx([math.exp(-0.9)] * 3, rel=1e-6)
    assert IS_CAP == 3.0


def test_weight_multiplies_the_surrogate_per_token():
    logp = OLD.clone().requires_grad_(True)  # ratio 1: surrogate per token = -A
    w = is_weights(OLD, SMP, MASK, "token-truncate", 2.0)
    loss, _ = sequence_loss(logp, OLD, 0.5, MASK, is_weight=w)
    assert float(loss.detach()) == pytest.approx(-0.5 * (2.0 + math.exp(0.1) + math.exp(-1.0)), rel=1e-6)
    loss.backward()  # d/dlogp of -A * ratio * w at ratio 1 = -A w: the weight carries no gradient of its own
    assert logp.grad.tolist() == pytest.approx((-0.5 * w).tolist(), rel=1e-6)
    plain, _ = sequence_loss(OLD, OLD, 0.5, MASK)
    assert float(plain) == pytest.approx(-1.5)


def test_defaults_per_objective_and_refusals():
    assert TrainConfig(objective="grpo", model="m").resolved().is_correction is None  # auto: by rollout backend
    assert "is_correction" not in TrainConfig(objective="grpo", model="m").key()     # old manifests still match
    assert TrainConfig(objective="grpo", model="m", is_correction="token-mask").key()["is_correction"] == "token-mask"
    with pytest.raises(InputError, match="is a GRPO option"):
        TrainConfig(objective="sgsd", model="m", is_correction="token-truncate").resolved()
    with pytest.raises(InputError, match="needs --old-logprobs policy"):
        TrainConfig(objective="grpo", model="m", is_correction="token-mask", old_logprobs="sampler").resolved()


def test_auto_mode_follows_the_rollout_backend(tmp_path):
    """TRL applies its correction only to vLLM rollouts: auto = sequence-mask for a vllm table, none for hf."""
    import polars as pl

    from stages.engine.objectives.grpo import GRPO

    def table(backend):
        d = tmp_path / backend
        d.mkdir()
        pl.DataFrame({"rollout_id": ["a", "b"], "problem_id": ["p", "p"], "prompt_ids": [[1, 2], [1, 2]],
                      "completion_ids": [[3], [4]], "sample_logprobs": [[-0.1], [-0.2]], "reward": [1.0, 0.0],
                      "temperature": [1.0, 1.0], "backend": [backend, backend]}).write_parquet(d / "rollout.parquet")
        return d

    cfg = TrainConfig(objective="grpo", model="m").resolved()
    assert GRPO(cfg).load(table("vllm"), None).info["is_correction"] == "sequence-mask"
    assert GRPO(cfg).load(table("hf"), None).info["is_correction"] == "none"
    got = GRPO(TrainConfig(objective="grpo", model="m", is_correction="token-truncate", is_cap=2.0).resolved()).load(table("hf-fast"), None)
    assert got.info["is_correction"] == "token-truncate" and got.info["is_cap"] == 2.0
    assert got.items[0].sample_logprobs == [-0.1]


@pytest.mark.usefixtures("one_thread")
def test_train_applies_the_weight_and_logs_the_gap(tmp_path, tiny, tiny_model_dir):
    """Sampling log-probs stored 1 nat below the trainer's: token-truncate at C = 2 weighs every token by 2
    (the loss doubles at the on-policy first step), and the agreement columns see the 1-nat gap."""
    import polars as pl

    from stages import train
    from stages.engine.atomic import write_parquet
    from test_train import make_run, train_cfg

    runs = {}
    for name in ("plain", "truncate"):
        run = make_run(tmp_path / name, tiny, n_problems=2, samples=4, correct=lambda i: i % 4 == 0)
        rt = pl.read_parquet(run / "rollout.parquet")
        rt = rt.with_columns(pl.col("sample_logprobs").list.eval(pl.element() - 1.0))
        write_parquet(rt, run / "rollout.parquet")
        kw = {"is_correction": "token-truncate", "is_cap": 2.0} if name == "truncate" else {}
        runs[name] = pl.read_parquet(train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1, batch_size=8,
                                                         loss_agg="token-mean", **kw), run))
    p, t = runs["plain"], runs["truncate"]
    assert abs(p["loss"][0]) > 1e-6 and t["loss"][0] == pytest.approx(2.0 * p["loss"][0], rel=1e-4)
    assert t["is_weight_mean"][0] == pytest.approx(2.0) and t["is_capped_frac"][0] == 1.0
    assert "is_weight_mean" not in p.columns
    assert t["agree_abs_mean"][0] == pytest.approx(1.0, abs=1e-3) and t["agree_frac_over"][0] == 1.0
    assert t["agree_kl"][0] == pytest.approx(math.e - 2, rel=1e-2)  # exp(1) - 1 - 1 per token
