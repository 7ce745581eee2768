"""vLLM backend vs the transformers scoring core, run inside the vLLM venv by tests/test_vllm_backend.py.

    .venv-vllm/bin/python tests/vllm_consistency_check.py MODEL_DIR --work SCRATCH_DIR [--out summary.json]

Loads MODEL_DIR in :class:`stages.engine.generation.vllm.VLLMBackend` (fp32) and in transformers (fp32), samples
with vLLM, rescores the sampled tokens with :func:`stages.engine.scoring.score_segments` and reports, as one
JSON object on the last stdout line (and in ``--out``):

* ``plain``: n=2 samples for 3 chat prompts at T=1, top-k off, top-p 1, 24 new tokens: vLLM's sampling
  log-probs vs the model's own log-probs (``max_abs_diff``);
* ``truncated``: T=1.1, top-p 0.95, top-k 20 (DESIGN's reference sampling): vLLM's log-probs vs
  ``log_softmax(logits / 1.1)`` before truncation, and, as a control that the comparison can fail, vs
  the renormalised truncated distribution (``max_abs_diff_vs_truncated`` must be large);
* ``greedy``: T=0: tokens equal the argmax of the transformers logits, log-probs at T=1;
* ``mixed``: one batch of requests with different temperatures and lengths (rows removed and moved
  mid-batch): each row's log-probs vs the transformers log-probs at its own temperature;
* ``update``: ``update_weights`` with a PEFT LoRA model (non-zero B, merged on the fly), then sampling
  again: log-probs vs that LoRA model's own log-probs, and vs the old weights (must differ);
* ``lora`` / ``lora_update``: a second engine on a saved LoRA adapter folder (vLLM's LoRA path), then
  ``update_weights`` with a changed adapter (swapped in as a new LoRA request).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stages.engine.generation.base import SamplingConfig  # noqa: E402
from stages.engine.models import load_model  # noqa: E402
from stages.engine.prompts import chat_prompt_ids, student_prompt  # noqa: E402
from stages.engine.scoring import Segment, score_segments  # noqa: E402

PROBLEMS = ["Compute $22 + 6$.", "What is the sum of the first 10 positive integers?", "Solve $2x + 3 = 11$ for $x$."]


def diff(comps, prompts, model, temperature: float) -> float:
    segs = [Segment.of(prompts[c.prompt_index], c.token_ids) for c in comps]
    ref = score_segments(model, segs, temperature=temperature)
    worst = 0.0
    for c, r in zip(comps, ref):
        got = torch.tensor(c.logprobs, dtype=torch.float32)
        assert got.shape == r.shape, (got.shape, r.shape)
        worst = max(worst, float((got - r).abs().max()))
    return worst


@torch.no_grad()
def truncated_logprobs(model, prompt, toks, cfg: SamplingConfig) -> torch.Tensor:
    """Log-probs of ``toks`` under the top-k/top-p truncated, renormalised distribution at cfg.temperature."""
    ids = torch.tensor([list(prompt) + list(toks)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(toks)].float() / cfg.temperature
    kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    srt, idx = torch.sort(logits, descending=True, dim=-1)
    probs = F.softmax(srt, dim=-1)
    remove = (probs.cumsum(-1) - probs) > cfg.top_p
    srt = srt.masked_fill(remove, float("-inf"))
    logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    return F.log_softmax(logits, dim=-1).gather(-1, torch.tensor(toks).unsqueeze(-1)).squeeze(-1)


class Phases:
    """Wall time of each phase of the check (reported as ``phases_s``)."""

    def __init__(self):
        self.t = time.time()
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.time()
        self.times[name] = round(now - self.t, 2)
        self.t = now


def summarize(comps, n_prompts: int) -> dict:
    return {
        "completions": len(comps),
        "per_prompt": [sum(1 for c in comps if c.prompt_index == i) for i in range(n_prompts)],
        "order_ok": [(c.prompt_index, c.sample_index) for c in comps]
        == sorted((c.prompt_index, c.sample_index) for c in comps),
        "finish_reasons": sorted({c.finish_reason for c in comps}),
        "lengths": [len(c.token_ids) for c in comps],
        "logprobs_finite": all(all(x == x and abs(x) != float("inf") for x in c.logprobs) for c in comps),
        "distinct_samples": len({tuple(c.token_ids) for c in comps}),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--work", required=True, help="scratch folder (the LoRA adapter is saved there)")
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args()
    t0 = time.time()
    phase = Phases()
    from stages.engine.generation.vllm import VLLMBackend

    model, tok, spec = load_model(args.model_dir, device="cpu", dtype="fp32")
    prompts = [chat_prompt_ids(tok, student_prompt(p), thinking=(i % 2 == 1)) for i, p in enumerate(PROBLEMS)]
    phase("import_and_hf_load")
    backend = VLLMBackend(spec, tokenizer=tok, dtype="fp32", max_model_len=512, seed=0)
    phase("vllm_init")
    out: dict = {"prompt_lengths": [len(p) for p in prompts], "phases_s": phase.times}

    done: list[int] = []
    cfg = SamplingConfig(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24, seed=1)
    comps = backend.generate(prompts, cfg, on_done=done.append)
    phase("generate_plain")
    again = backend.generate(prompts, cfg)
    phase("generate_plain_again")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out["plain"] = summarize(comps, len(prompts)) | {
        "max_abs_diff": diff(comps, prompts, model, 1.0),
        "on_done_total": sum(done),
        "same_seed_same_tokens": [c.token_ids for c in comps] == [c.token_ids for c in again],
        "stop_ends_with_eos": all(c.token_ids[-1] == eos for c in comps if c.finish_reason == "stop"),
    }

    cfg_t = SamplingConfig(n=2, temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=24, seed=2)
    comps_t = backend.generate(prompts, cfg_t)
    phase("generate_truncated")
    trunc = max(float((torch.tensor(c.logprobs) - truncated_logprobs(model, prompts[c.prompt_index], c.token_ids, cfg_t))
                      .abs().max()) for c in comps_t)
    out["truncated"] = summarize(comps_t, len(prompts)) | {
        "max_abs_diff": diff(comps_t, prompts, model, 1.1),
        "max_abs_diff_vs_truncated": trunc,
    }

    cfg_g = SamplingConfig(n=1, temperature=0.0, max_new_tokens=16)
    comps_g = backend.generate(prompts, cfg_g)
    phase("generate_greedy")
    argmax_ok = True
    with torch.no_grad():
        for c in comps_g:
            ids = torch.tensor([list(prompts[c.prompt_index]) + c.token_ids])
            p = len(prompts[c.prompt_index])
            am = model(input_ids=ids).logits[0, p - 1 : p - 1 + len(c.token_ids)].argmax(-1).tolist()
            argmax_ok &= am == c.token_ids
    out["greedy"] = summarize(comps_g, len(prompts)) | {"max_abs_diff": diff(comps_g, prompts, model, 1.0),
                                                          "argmax_ok": bool(argmax_ok)}
    phase("score_hf")

    # mixed temperatures and lengths in one batch: requests finish at different steps, so vLLM removes
    # and moves rows of its persistent batch and the normalizer must follow each row's temperature
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    mixed = [(0.7, 6), (1.0, 24), (1.3, 14)]
    sps = [SamplingParams(temperature=t, max_tokens=m, seed=10 + i, logprobs=0, ignore_eos=True)
           for i, (t, m) in enumerate(mixed)]
    outs = backend.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
    phase("generate_mixed")
    worst = 0.0
    for p, (t, _), o in zip(prompts, mixed, outs):
        c = o.outputs[0]
        got = torch.tensor([d[x].logprob for x, d in zip(c.token_ids, c.logprobs)])
        ref = score_segments(model, [Segment.of(p, c.token_ids)], temperature=t)[0]
        worst = max(worst, float((got - ref).abs().max()))
    out["mixed"] = {"lengths": [len(o.outputs[0].token_ids) for o in outs], "max_abs_diff": worst}

    # update_weights with a LoRA-wrapped copy of the model, non-zero adapters (merged on the fly)
    from peft import LoraConfig, get_peft_model

    base2, _, _ = load_model(args.model_dir, device="cpu", dtype="fp32")
    lora = get_peft_model(base2, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n_, p_ in lora.named_parameters():
            if "lora_B" in n_:
                p_.normal_(0.0, 0.3)
    lora.eval()
    phase("make_lora")
    backend.update_weights(lora)
    phase("update_weights")
    comps_u = backend.generate(prompts, cfg)
    phase("generate_updated")
    out["update"] = summarize(comps_u, len(prompts)) | {
        "max_abs_diff": diff(comps_u, prompts, lora, 1.0),
        "max_abs_diff_vs_old_weights": diff(comps_u, prompts, model, 1.0),
        "in_process": backend._runner_in_process(),
    }
    backend.close()

    # a LoRA adapter folder as the model: vLLM's LoRA path, then update_weights swapping in a changed adapter
    from stages.engine.models import save_model

    adapter_dir = Path(args.work) / "adapter"
    save_model(lora, tok, adapter_dir, base_spec=spec)
    peft_model, _, aspec = load_model(str(adapter_dir), device="cpu", dtype="fp32")
    phase("save_load_adapter")
    lb = VLLMBackend(aspec, tokenizer=tok, dtype="fp32", max_model_len=512, seed=0)
    phase("vllm_init_lora")
    comps_l = lb.generate(prompts, cfg)
    phase("generate_lora")
    out["lora"] = summarize(comps_l, len(prompts)) | {
        "max_abs_diff": diff(comps_l, prompts, peft_model, 1.0),
        "max_abs_diff_vs_base": diff(comps_l, prompts, model, 1.0),
    }
    with torch.no_grad():
        for n_, p_ in peft_model.named_parameters():
            if "lora_B" in n_:
                p_.mul_(-1.0)
    lb.update_weights(peft_model)
    phase("update_lora")
    comps_l2 = lb.generate(prompts, cfg)
    phase("generate_lora_updated")
    out["lora_update"] = summarize(comps_l2, len(prompts)) | {
        "max_abs_diff": diff(comps_l2, prompts, peft_model, 1.0),
        "max_abs_diff_vs_old_adapter": diff(comps_l2, prompts, lora, 1.0),
    }
    lb.close()
    out["total_s"] = round(time.time() - t0, 2)
    line = json.dumps(out)
    if args.out:
        Path(args.out).write_text(line)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
