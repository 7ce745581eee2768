"""`sgsd sft`: loss on the completion only (checked against an independent forward), training lowers it,
checkpoint + resume reproduce an uninterrupted run, bad data is one line and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from stages import sft
from stages.engine.errors import InputError

PAIRS = [{"prompt": f"Compute {a} + {b}.", "completion": f"\\boxed{{{a + b}}}"} for a in range(1, 7) for b in range(1, 4)]


def _data(tmp_path, rows=PAIRS):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_loss_is_completion_only_nll(tiny, tmp_path):
    """nll_loss equals the mean -log p of the completion tokens (+EOS) from a plain padded-free forward."""
    model, tok, _ = tiny
    cfg = sft.SFTConfig(model="x", data="x")
    import polars as pl

    df = pl.DataFrame(PAIRS[:3])
    pairs = sft.encode(tok, df, thinking=False)
    assert all(c[-1] == tok.eos_token_id for _, c in pairs)
    from stages.engine.scoring import varlen_attention

    with torch.no_grad(), varlen_attention(model):
        got, ntok = sft.nll_loss(model, pairs, cfg)
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in pairs:
            ids = torch.tensor([list(p) + list(c)])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            for j, t in enumerate(c):
                total -= float(logp[len(p) + j - 1, t])
                count += 1
    assert ntok == count
    assert float(got) == pytest.approx(total / count, rel=1e-4)


def test_training_lowers_loss_and_resume_matches(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    kw = dict(model=str(tiny_model_dir), data=str(data), steps=6, batch_size=6, lr=3e-3, warmup_steps=1, device="cpu")
    full = tmp_path / "full"
    sft.run(sft.SFTConfig(**kw), full)
    import polars as pl

    losses = pl.read_parquet(full / "sft.parquet")["loss"].to_list()
    assert len(losses) == 6 and losses[-1] < losses[0]
    # interrupted run: snapshots every 3 steps; drop the final checkpoint and the manifest, rerun -> resumes at 3
    part = tmp_path / "part"
    sft.run(sft.SFTConfig(**kw, save_every=3, keep_last=0), part)
    shutil.rmtree(part / "checkpoint")
    (part / "sft.manifest.json").unlink()
    logs = []
    sft.run(sft.SFTConfig(**kw, save_every=3, keep_last=0), part, log=logs.append)
    assert any("resuming" in s and "step 3/6" in s for s in logs)
    from safetensors.torch import load_file

    a = load_file(full / "checkpoint" / "model.safetensors")
    b = load_file(part / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # a finished run with the same config is skipped
    logs.clear()
    sft.run(sft.SFTConfig(**kw), full, log=logs.append)
    assert any("up to date" in s for s in logs)


def test_bad_data_is_one_line_exit_2(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(InputError):
        sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(bad)), tmp_path / "r")
    r = subprocess.run([sys.executable, "-m", "sgsd_cli.main", "sft", "--run-dir", str(tmp_path / "r2"), "--model",
                        str(tiny_model_dir), "--data", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "completion" in lines[0]
    assert not (tmp_path / "r2" / "sft.parquet").exists()


def test_row_thinking_column_sets_each_prompts_template(tiny, tmp_path):
    """A row's `thinking` flag picks its chat-template form: the same prompt encodes to the template's
    thinking-off form (empty think block in the assistant header) or its thinking-on form."""
    import polars as pl

    from stages.engine.prompts import chat_prompt_ids

    _, tok, _ = tiny
    df = pl.DataFrame({"prompt": ["Compute 1 + 2."] * 2, "completion": ["\\boxed{3}"] * 2, "thinking": [False, True]})
    (p_off, _), (p_on, _) = sft.encode(tok, df, thinking=False)
    assert list(p_off) == chat_prompt_ids(tok, "Compute 1 + 2.", False)
    assert list(p_on) == chat_prompt_ids(tok, "Compute 1 + 2.", True)
    assert p_on != p_off
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b", "thinking": "yes"}) + "\n")
    with pytest.raises(InputError, match="thinking"):
        sft.load_pairs(bad)
