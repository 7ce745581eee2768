"""The skill world's base build: SFT steps with per-sequence attention over slices (the naive baseline, the code
before 2026-12-06) against torch.split (ours), in one run, on the world corpus of configs/world.toml.

Training under ``varlen_attention`` runs causal SDPA once per packed sequence.  Taking each sequence as a slice
``q[:, :, s:e]`` makes every slice's backward allocate and zero-fill a gradient the size of the whole packed row
(``aten::fill_`` was 48% of a step in the profile), which grows with the square of the sequences per row;
``torch.split`` backpropagates with one ``cat``.  Same batches, same weights: the script also checks that both
give the same loss and gradients.

    python bench/world_build_bench.py                 # 30 timed SFT steps of the world base, batch 64
    python bench/world_build_bench.py --steps 10 --threads 1

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def slice_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The baseline: stages.engine.scoring.varlen_sdpa_attention as it was, one slice per packed sequence."""
    import torch
    import torch.nn.functional as F

    from stages.engine import scoring

    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling)
            for s, e in scoring._segment_bounds(kwargs["position_ids"])]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from stages import sft
    from stages.engine import scoring
    from stages.engine.config import load_toml
    from stages.engine.models import load_model, make_tiny_model
    from stages.engine.world import World
    from stages.experiments.world import config_from_sections

    torch.set_num_threads(args.threads)
    cfg = config_from_sections(load_toml(ROOT / "configs" / "world.toml"))
    world = World(cfg.world)
    tmp = Path(tempfile.mkdtemp())
    make_tiny_model(tmp / "init", seed=0, hidden_size=cfg.hidden_size, layers=cfg.layers, vocab_size=cfg.vocab_size,
                    corpus=world.vocabulary_texts())
    rows = world.corpus()[: args.batch * (args.steps + 2)]
    import polars as pl

    sc = sft.SFTConfig(model="x", data="x")
    res = {}
    grads = {}
    for name, attn in (("naive_slices", slice_attention), ("ours_split", scoring.varlen_sdpa_attention)):
        model, tok, _ = load_model(str(tmp / "init"), device="cpu", dtype="fp32", trainable=True)
        pairs = sft.encode(tok, pl.DataFrame(rows), False)
        orig = scoring.varlen_sdpa_attention
        from transformers import AttentionInterface

        times, losses = [], []
        try:
            for step in range(args.steps + 2):
                batch = pairs[step * args.batch : (step + 1) * args.batch]
                t0 = time.perf_counter()
                with scoring.varlen_attention(model):
                    AttentionInterface.register(scoring.VARLEN_ATTN, attn)
                    loss, _ = sft.nll_loss(model, batch, sc)
                    loss.backward()
                if step == 0:
                    grads[name] = [p.grad.clone() for p in model.parameters()]
                model.zero_grad(set_to_none=True)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
                losses.append(float(loss))
        finally:
            AttentionInterface.register(scoring.VARLEN_ATTN, orig)
        res[name] = {"s_per_step": sum(times) / len(times), "first_loss": losses[0],
                     "tokens_per_step": sum(len(p) + len(c) for p, c in pairs[: args.batch])}
    gdiff = max(float((a - b).abs().max()) for a, b in zip(grads["naive_slices"], grads["ours_split"]))
    ratio = res["naive_slices"]["s_per_step"] / res["ours_split"]["s_per_step"]
    print(f"world SFT step (forward + backward), batch {args.batch}, {args.threads} thread(s), {args.steps} timed steps:")
    for k, v in res.items():
        print(f"  {k:<13} {v['s_per_step']:.3f} s/step  ({v['tokens_per_step']} tokens, loss {v['first_loss']:.6f})")
    print(f"  ratio naive / ours: {ratio:.2f}x;  max |grad difference| {gdiff:.2e}")
    print(json.dumps({"bench": "world_build", "batch": args.batch, "threads": args.threads, "steps": args.steps, **res,
                      "ratio": ratio, "max_grad_diff": gdiff}))


if __name__ == "__main__":
    main()
