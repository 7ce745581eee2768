"""Engine/trainer agreement (issue 23, item 1): the per-table gap metrics by hand, the refresh probe on the tiny
model, and a loop whose engine refresh is broken on purpose must stop naming the step and the gap."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import polars as pl
import pytest
import torch

from stages.engine import agreement

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gap_metrics_by_hand():
    train = torch.tensor([-1.0, -2.0, -0.5])
    sample = torch.tensor([-1.0, -1.7, -0.8])  # d = 0, -0.3, +0.3
    s = agreement.gap_sums(train, sample, threshold=0.25)
    assert s["n"] == 3 and s["over"] == 2
    assert s["abs_sum"] == pytest.approx(0.6) and s["abs_max"] == pytest.approx(0.3)
    k3 = (math.exp(-0.3) + 0.3 - 1) + (math.exp(0.3) - 0.3 - 1)  # 0.0407...
    assert s["k3_sum"] == pytest.approx(k3)
    s2 = agreement.gap_sums(torch.tensor([-2.0]), torch.tensor([-3.0]), threshold=0.25)  # d = +1
    m = agreement.summary(agreement.combine([s, s2]))
    assert m["agree_tokens"] == 4 and m["agree_abs_mean"] == pytest.approx(1.6 / 4)
    assert m["agree_abs_max"] == pytest.approx(1.0) and m["agree_frac_over"] == pytest.approx(3 / 4)
    assert m["agree_kl"] == pytest.approx((k3 + math.e - 2) / 4)
    empty = agreement.summary(agreement.combine([]))
    assert empty["agree_tokens"] == 0 and math.isnan(empty["agree_abs_mean"])


def test_probe_tolerance_is_the_coarser_dtype():
    assert agreement.probe_tolerance(torch.float32, torch.float32) == 2e-3
    assert agreement.probe_tolerance(torch.bfloat16, torch.float32) == 5e-2
    assert agreement.probe_tolerance(None, torch.float16) == 2e-2


def test_probe_sees_stale_weights(tiny):
    from stages.engine.generation.hf import HFBackend

    model, tok, _ = tiny
    prompts = [tok("1 + 1 =", add_special_tokens=False)["input_ids"], tok("two plus", add_special_tokens=False)["input_ids"]]
    eng = HFBackend(copy.deepcopy(model), tok)
    ok = agreement.probe(eng, model, prompts, tokens=8)
    assert ok.ok and ok.tokens > 0 and ok.gap_mean < 1e-4 and ok.tol == 2e-3
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.lm_head.weight.mul_(3.0)  # the trainer moved on; the engine kept the old weights
    bad = agreement.probe(eng, moved, prompts, tokens=8)
    assert not bad.ok and bad.gap_mean > 10 * bad.tol
    eng.update_weights(moved)
    assert agreement.probe(eng, moved, prompts, tokens=8).ok


def test_broken_weight_refresh_stops_the_loop(tmp_path, tiny_model_dir, monkeypatch):
    """The engine holds its own copy of the weights (as vLLM does) and its refresh is broken on purpose: the
    probe after the refresh stops the loop at step 2 naming the gap; with probe_action = "warn" the loop goes on,
    and the agreement metrics (train.parquet -> metrics.parquet) show the stale engine's rollouts."""
    import stages.loop as loop_mod
    from stages.engine.generation.hf import HFBackend
    from stages.engine.errors import InputError
    from test_loop import _cfg, _run

    monkeypatch.setattr(loop_mod, "make_backend", lambda kind, model, tokenizer, spec, **kw: HFBackend(copy.deepcopy(model), tokenizer))
    monkeypatch.setattr(HFBackend, "update_weights", lambda self, model: None)  # the refresh silently does nothing
    sets = ['loop.backend="hf"', "train.lr=0.05"]
    with pytest.raises(InputError, match=r"engine/trainer mismatch at step 2: .* differ from the trainer's by [0-9.e-]+ nats"):
        _run(_cfg(tmp_path, tiny_model_dir, objective="opsd", steps=2), sets)
    said = []
    monkeypatch.setattr(loop_mod, "new_alarms", lambda rows: [])
    from stages import loop
    from stages.engine.config import resolve

    sections, source = resolve(_cfg(tmp_path, tiny_model_dir, objective="opsd", steps=2, name="warn"),
                               sets + ['loop.probe_action="warn"'])
    m = pl.read_parquet(loop.run(sections, source=source, log=said.append))
    assert any("warning: engine/trainer mismatch at step 2" in s for s in said)
    # step 1: the engine's copy is the trainer's model, the stored sampling log-probs agree to rounding
    assert m["agree_tokens"][0] > 0 and m["agree_abs_max"][0] < 1e-3 and m["agree_frac_over"][0] == 0.0
    assert m["probe_gap_mean"][0] < 1e-4
    # step 2: sampled by the stale engine, rescored by the trained model
    assert m["agree_abs_mean"][1] > 10 * max(m["agree_abs_mean"][0], 1e-4) and m["probe_gap_mean"][1] > 2e-3
    tr = pl.read_parquet(tmp_path / "warn" / "step_0002" / "train.parquet")
    assert {"agree_abs_mean", "agree_abs_max", "agree_kl", "agree_frac_over"} <= set(tr.columns)
