"""GRPO dynamic sampling in the loop (stages/loop.py dynamic_batch, LoopRun.fill_batch), overlong filtering in the
GRPO loss, the token entropy the trainer logs, and a health alarm stopping the loop.  Hand-built tables; the
tiny model only for the loop plumbing."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import torch

from test_loop import _cfg, _run

pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(spec: dict[str, list[float]]) -> pl.DataFrame:
    """Graded rollouts: one row per (problem, sample) with its reward."""
    rows = [(f"{p}:{i}", p, float(r)) for p, rs in spec.items() for i, r in enumerate(rs)]
    return pl.DataFrame(rows, schema=["rollout_id", "problem_id", "reward"], orient="row")


def test_dynamic_batch_drops_equal_groups_and_draws_more_hand_values():
    """Target 3 groups.  First draw A [1,1] B [0,1] C [0,0] D [1,0]: B, D kept, A, C dropped; missing 1 at a keep rate
    2/4, so ceil(1 * 4 / 2) = 2 more prompts.  Draw 1 (E [0,0], F [1,1]) keeps nothing: 6 drawn, 2 kept, ceil(1 * 6 / 2)
    = 3 more (budget 5 - 2 = 3 left).  Draw 2 (G [0,1], H [1,0], I [0,0]) fills the batch with G; H is surplus."""
    from stages.loop import dynamic_batch

    extra = {1: {"E": [0, 0], "F": [1, 1]}, 2: {"G": [0, 1], "H": [1, 0], "I": [0, 0]}}
    asked = []

    def draw(r, k, exclude):
        asked.append((r, k, sorted(exclude)))
        return _groups(extra[r])

    batch, m = dynamic_batch(_groups({"A": [1, 1], "B": [0, 1], "C": [0, 0], "D": [1, 0]}), draw, target=3, max_extra=5)
    assert asked == [(1, 2, ["A", "B", "C", "D"]), (2, 3, ["A", "B", "C", "D", "E", "F"])]
    assert batch["rollout_id"].to_list() == ["B:0", "B:1", "D:0", "D:1", "G:0", "G:1"]
    assert m == {"ds_groups_drawn": 9, "ds_groups_kept": 3, "ds_groups_dropped": 5, "ds_drop_frac": 5 / 9,
                 "ds_rounds": 2, "ds_short": 0, "ds_extra_prompts": 5}


def test_dynamic_batch_budget_cap_and_nothing_informative():
    from stages.loop import dynamic_batch

    asked = []

    def draw(r, k, exclude):
        asked.append(k)
        return _groups({f"E{r}.{j}": [0, 0] for j in range(k)})

    first = _groups({"A": [1, 1], "B": [0, 1], "C": [0, 0], "D": [1, 0]})
    batch, m = dynamic_batch(first, draw, target=3, max_extra=1)  # wants 2, the cap allows 1, then it is spent
    assert asked == [1] and m["ds_short"] == 1 and m["ds_groups_kept"] == 2 and m["ds_extra_prompts"] == 1
    assert batch["problem_id"].unique(maintain_order=True).to_list() == ["B", "D"]
    # no informative group anywhere and no budget: the first draw trains whole (zero advantage), flagged short
    flat = _groups({"A": [1, 1], "C": [0, 0]})
    batch, m = dynamic_batch(flat, draw, target=2, max_extra=0)
    assert batch.equals(flat) and m["ds_short"] == 1 and m["ds_drop_frac"] == 1.0 and m["ds_rounds"] == 0


def test_extra_problems_are_seeded_and_exclude_the_step():
    from stages.loop import extra_problems

    pool = pl.DataFrame({"id": [f"p{i}" for i in range(10)], "problem": ["x"] * 10, "answer": ["1"] * 10})
    a = extra_problems(pool, 3, 1, 4, {"p0", "p1"}, seed=5)
    assert a.equals(extra_problems(pool, 3, 1, 4, {"p0", "p1"}, seed=5)) and a.height == 4
    assert not set(a["id"]) & {"p0", "p1"}
    assert extra_problems(pool, 3, 1, 20, {"p0"}, seed=5).height == 9  # the pool runs out
    assert not a.equals(extra_problems(pool, 3, 2, 4, {"p0", "p1"}, seed=5))  # another draw, another permutation


class _FW:
    """The trainer as GRPO's loss sees it: fixed student log-probs and token entropies."""

    def __init__(self, data, lp, ent):
        self.data, self._lp, self._ent = data, lp, ent
        self.mode = "none"

    def student(self, kind, segs, T, entropy=False, **kw):
        return (self._lp, self._ent) if entropy else self._lp


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_overlong_filtering_masks_truncated_rows_in_the_grpo_loss(tmp_path, mask_truncated):
    """Two groups of two.  pi_old = pi (ratio 1), so each token's surrogate is -A.  Rewards P [1, 0] give A = +-0.5/(std
    + eps) with std = sqrt(1/2); Q [1, 1] gives 0.  The truncated row P:1 (A < 0, 3 tokens) contributes +|A| under
    sequence-mean unmasked and 0 masked; the batch normaliser stays 4 sequences either way."""
    from stages.engine.objectives.grpo import GRPO
    from stages.train import TrainConfig

    rt = pl.DataFrame({"rollout_id": ["P:0", "P:1", "Q:0", "Q:1"], "problem_id": ["P", "P", "Q", "Q"],
                       "prompt_ids": [[1], [1], [2], [2]], "completion_ids": [[5, 6], [5, 6, 7], [8], [9, 9]],
                       "finish_reason": ["stop", "length", "stop", "length"], "reward": [1.0, 0.0, 1.0, 1.0],
                       "temperature": [1.0] * 4})
    rt.write_parquet(tmp_path / "rollout.parquet")
    cfg = TrainConfig(objective="grpo", model="m", mask_truncated=mask_truncated).resolved()
    obj = GRPO(cfg)
    data = obj.load(tmp_path, None)
    masks = {it.rid: it.mask for it in data.items}
    cut = mask_truncated
    assert masks == {"P:0": [True, True], "P:1": [not cut] * 3, "Q:0": [True], "Q:1": [not cut] * 2}
    lp = torch.tensor([-1.0, -2.0, -1.5, -0.5, -0.7, -3.0, -0.2, -0.4])  # tokens of P:0, P:1, Q:0, Q:1
    ent = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    parts = torch.split(lp, [2, 3, 1, 2])
    for it, p in zip(data.items, parts):
        it.old_logprobs = p.tolist()
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # (r - mean) / (unbiased std + eps)
    loss, st = obj.loss(_FW(data, lp, ent), data.items, [1.0] * 4, obj.normaliser(data.items))
    want = (-a + (0.0 if cut else a)) / 4  # P:0 -> -a, P:1 -> +a unless masked, Q -> 0
    assert loss.item() == pytest.approx(want, abs=1e-5)
    kept = [1.0, 2.0, 6.0] if cut else list(range(1, 9))
    assert st["entropy_tokens"] == len(kept) and st["entropy_sum"] == pytest.approx(sum(kept))
    assert st["mask_tokens"] == (3 if cut else 8)


def test_dynamic_sampling_is_grpo_only_and_range_checked(tmp_path, tiny_model_dir):
    from stages.engine.errors import InputError

    cfg = _cfg(tmp_path, tiny_model_dir, objective="opsd", steps=1)
    with pytest.raises(InputError, match="dynamic_sampling is a GRPO option"):
        _run(cfg, ["loop.dynamic_sampling=true"])
    cfg = _cfg(tmp_path, tiny_model_dir, objective="grpo", steps=1, n=2, name="neg")
    with pytest.raises(InputError, match="ds-max-extra-prompts must be >= 0"):
        _run(cfg, ["loop.dynamic_sampling=true", "loop.ds_max_extra_prompts=-1"])


def test_dynamic_sampling_in_the_loop(tmp_path, tiny_model_dir):
    """The tiny random model's groups are (nearly) all wrong, so every group is dropped: the loop draws the budget's
    extra prompts in ds_round_rr/ folders, trains on what it has and logs the draws (ds_* columns)."""
    cfg = _cfg(tmp_path, tiny_model_dir, objective="grpo", steps=1, n=2)
    m = pl.read_parquet(_run(cfg, ["loop.dynamic_sampling=true", "loop.ds_max_extra_prompts=2"]))
    sd = tmp_path / "run" / "step_0001"
    tb = pl.read_parquet(sd / "train_batch.parquet")
    assert {"reward", "sample_logprobs", "finish_reason"} <= set(tb.columns)
    row = m.row(0, named=True)
    assert row["ds_groups_drawn"] == 2 + row["ds_extra_prompts"] and row["ds_extra_prompts"] <= 2
    assert row["ds_groups_kept"] + row["ds_groups_dropped"] <= row["ds_groups_drawn"]
    rounds = sorted(p.name for p in sd.glob("ds_round_*"))
    assert len(rounds) == row["ds_rounds"]
    drawn = set(pl.read_parquet(sd / "problems.parquet")["id"])
    for r in rounds:
        extra = set(pl.read_parquet(sd / r / "problems.parquet")["id"])
        assert not extra & drawn
        drawn |= extra
    tr = pl.read_parquet(sd / "train.parquet")
    assert tr["rollouts"].sum() == tb.height  # the trainer trained on the batch table
    for col in ("completion_len_mean", "truncated_frac", "format_rate", "sampled_nll_mean", "entropy_mean"):
        assert math.isfinite(row[col]), col


def test_planted_length_blow_up_fires_the_alarm_and_stops_the_loop(tmp_path, tiny_model_dir, monkeypatch):
    """From step 6 on the policy's completions are 4x longer (planted: the rollout stage generates 8 new tokens instead
    of 2; the tiny random model rarely stops early).  Steps 6-10's mean length is >= 2x the median of steps 1-5, so the
    length alarm fires at step 10 (the first step with a full window after 5 earlier steps) and loop.alarm_stop stops
    the loop there with an exit-2 error; metrics.parquet keeps the step's row with the alarm."""
    from dataclasses import replace

    import stages.rollout as rollout_mod
    from stages.engine.errors import InputError

    real = rollout_mod.run

    def planted(cfg, run_dir, **kw):
        step = int(Path(run_dir).name.split("_")[1])
        return real(replace(cfg, max_new_tokens=8 if step >= 6 else 2), run_dir, **kw)

    monkeypatch.setattr(rollout_mod, "run", planted)
    cfg = _cfg(tmp_path, tiny_model_dir, objective="grpo", steps=10, n=2)
    with pytest.raises(InputError, match="collapse alarm at step 10: length") as e:
        _run(cfg, ["loop.alarm_stop=true", "loop.probe_tokens=0", "rollout.max_new_tokens=2"])
    assert type(e.value) is InputError  # the CLI turns it into one line and exit code 2
    m = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert m.height == 10 and m["alarms"][:9].to_list() == [""] * 9 and m["alarms"][9].startswith("length:")
    lens = m["completion_len_mean"].to_list()
    assert max(lens[:5]) <= 2 and min(lens[5:]) > 4


def test_dapo_recipe_turns_the_knobs_on_and_the_baseline_keeps_them_off():
    from stages import loop
    from stages.engine.config import load_toml

    root = Path(__file__).resolve().parent.parent / "configs"
    base = loop.build_sections(load_toml(root / "grpo_qwen3_1.7b.toml")).resolved()
    dapo = loop.build_sections(load_toml(root / "grpo_dapo_qwen3_1.7b.toml")).resolved()
    assert not base["loop"]["dynamic_sampling"] and not base["train"]["mask_truncated"]
    assert base["train"]["clip_eps_high"] is None and base["train"]["loss_agg"] == "sequence-mean"
    assert dapo["loop"]["dynamic_sampling"] and dapo["loop"]["ds_max_extra_prompts"] == 8
    assert dapo["train"]["mask_truncated"] and dapo["train"]["clip_eps_high"] == 0.28
    assert dapo["train"]["loss_agg"] == "token-mean" and dapo["train"]["clip_eps"] == 0.2
    # everything else as the baseline
    for sec in ("rollout", "polarize", "eval"):
        assert base.get(sec) == dapo.get(sec)


def test_two_rank_dynamic_sampling_equals_one_process(tmp_path, tiny_model_dir):
    """Under torchrun (2 ranks, gloo) every rank takes the same dynamic-sampling decisions from the same graded
    tables and generates its block of each extra draw (a draw of one prompt leaves a rank an empty block): the extra
    draws, the batch table and the training losses equal one process's."""
    from test_distributed_loop import _cfg as dist_cfg, _run_here, _sgsd_script, _table, _torchrun

    torch.set_num_threads(1)
    one, sets = dist_cfg(tmp_path, "one", tiny_model_dir, objective="grpo", n=2)
    ds = ["loop.dynamic_sampling=true", "loop.ds_max_extra_prompts=1"]  # one extra prompt: rank 1 gets none
    _run_here((one, sets + ds))
    two, sets2 = dist_cfg(tmp_path, "two", tiny_model_dir, objective="grpo", n=2)
    proc = _torchrun(_sgsd_script(tmp_path), (two, sets2 + ds))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for n in (1, 2):
        a, b = tmp_path / "one" / f"step_{n:04d}", tmp_path / "two" / f"step_{n:04d}"
        rounds = sorted(p.name for p in a.glob("ds_round_*"))
        assert rounds and rounds == sorted(p.name for p in b.glob("ds_round_*"))
        for r in rounds:
            ra, rb = pl.read_parquet(a / r / "rollout.parquet"), _table(b / r, "rollout")
            assert rb["completion_ids"].to_list() == ra["completion_ids"].to_list()
        ta, tb = pl.read_parquet(a / "train_batch.parquet"), pl.read_parquet(b / "train_batch.parquet")
        assert tb["rollout_id"].to_list() == ta["rollout_id"].to_list()
        assert (a / "dynamic_sampling.json").read_text() == (b / "dynamic_sampling.json").read_text()
        la, lb = pl.read_parquet(a / "train.parquet")["loss"], pl.read_parquet(b / "train.parquet")["loss"]
        assert lb.to_list() == pytest.approx(la.to_list(), abs=1e-5)
