"""LoRA through peft: only adapter weights change; the saved adapter (and the merged model) reload for eval."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from test_train import make_run, student_logprobs, train_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_changes_only_adapter_weights_and_reloads(tmp_path, tiny, tiny_model_dir):
    from stages import train
    from stages.engine.generation.hf import HFBackend
    from stages.engine.generation.base import SamplingConfig
    from stages.engine.models import load_model

    run = make_run(tmp_path / "run", tiny, n_problems=3, K=2, teacher_shift=1.0, rho=lambda i, k: 1)
    cfg = train_cfg(tiny_model_dir, lora=True, lora_r=4, lora_alpha=8, lora_target="q_proj,v_proj,gate_proj",
                    teacher_mode="fixed", steps=3, batch_size=3, lr=1e-2, save_merged=True)
    t = train.Trainer(cfg)
    base_before = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in t.model.named_parameters())
    t.fit(run)
    after = dict(t.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())  # the base is untouched
    changed = [n for n, p in lora_before.items() if not torch.equal(after[n], p)]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)

    ck = run / "checkpoint"
    assert (ck / "adapter_config.json").exists() and (ck / "adapter_model.safetensors").exists()
    assert not (ck / "model.safetensors").exists()  # an adapter, not a full copy of the weights
    assert json.loads((ck / "sgsd_checkpoint.json").read_text())["adapter"] is True
    assert json.loads((ck / "adapter_config.json").read_text())["r"] == 4

    # the adapter folder reloads (base + adapter) and scores like the trained model; it differs from the base
    reloaded, tok, spec = load_model(str(ck), device="cpu", dtype="fp32")
    assert spec.adapter == str(ck)
    trained = student_logprobs(t.model.eval(), run)
    again = student_logprobs(reloaded, run)
    base = student_logprobs(tiny_model_dir, run)
    for rid in trained:
        assert torch.allclose(trained[rid], again[rid], atol=1e-5)
    assert max(float((trained[r] - base[r]).abs().max()) for r in base) > 1e-3
    # the merged folder is a plain HF model with the same outputs
    merged = load_model(str(ck / "merged"), device="cpu", dtype="fp32")[0]
    assert not hasattr(merged, "peft_config")
    m = student_logprobs(merged, run)
    for rid in trained:
        assert torch.allclose(trained[rid], m[rid], atol=1e-4)
    # and generates for eval
    prompts = pl.read_parquet(run / "rollout.parquet")["prompt_ids"].to_list()[:2]
    comps = HFBackend(reloaded, tok).generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=4))
    assert len(comps) == 2 and all(len(c.token_ids) >= 1 for c in comps)


def test_lora_training_continues_from_adapter_checkpoint(tmp_path, tiny, tiny_model_dir):
    """--model CKPT (an adapter checkpoint) continues training that adapter with its optimizer state."""
    from stages import train

    a = make_run(tmp_path / "a", tiny, n_problems=2, K=2)
    b = make_run(tmp_path / "b", tiny, n_problems=2, K=2, seed=1)
    kw = dict(lora=True, lora_r=4, lora_alpha=8, steps=1, batch_size=2)
    train.run(train_cfg(tiny_model_dir, **kw), a)
    train.run(train_cfg(str(a / "checkpoint"), **kw), b)
    meta = json.loads((b / "checkpoint" / "sgsd_checkpoint.json").read_text())
    assert meta["policy_step"] == 2 and meta["adapter"] is True
    assert meta["base_model"]["path"] == str(tiny_model_dir)
    osd = torch.load(b / "checkpoint" / "optimizer.pt", weights_only=True)
    assert all(float(s["step"]) == 2.0 for s in osd["state"].values())
