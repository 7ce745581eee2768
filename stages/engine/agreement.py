"""Engine/trainer agreement: do the log-probs the rollout engine sampled with match the trainer's?  docs/DESIGN.md 2.

Two checks, each formula once (hand-valued in tests/test_agreement.py):

* **Per table** (``sgsd train``, every objective): before the first update on a step's table the trainer
  recomputes, without gradients and in eval mode, the log-probs of the sampled tokens of up to
  ``train.agreement_rollouts`` rollouts at the rollout's sampling temperature (greedy rows: T = 1), and compares
  them with the engine's stored ``sample_logprobs``.  With ``d_t = lp_train_t - lp_sample_t`` over the N sampled
  tokens: ``agree_abs_mean = mean |d_t|``, ``agree_abs_max = max |d_t|``, ``agree_kl = mean(exp(d_t) - d_t - 1)``
  (the k3 estimate of KL(sampler || trainer) from the sampler's own tokens, >= 0; tokens were drawn after
  top-k / top-p, the log-probs are before it, so it is an estimate), ``agree_frac_over = mean [|d_t| > thr]``
  (thr = ``train.agreement_threshold``, 0.2 nats: a sampler/trainer ratio outside about PPO's 0.2 clip range).
* **Per weight refresh** (``sgsd loop``): after the resident engine is built or gets new weights
  (``update_weights``), :func:`probe` samples ``loop.probe_tokens`` tokens from the first prompts of the step
  with the engine (T = 1, no top-k / top-p) and scores them with the trainer's model.  The gap is the mean
  |d_t|; it must be within a dtype-aware tolerance (:func:`probe_tolerance`: fp32 2e-3, fp16 2e-2, bf16 5e-2
  nats, the coarser of engine and trainer) or the loop stops naming the step and the gap
  (``loop.probe_action = "warn"``: one warning line instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_THRESHOLD = 0.2
DEFAULT_ROLLOUTS = 16
DEFAULT_PROBE_TOKENS = 16
PROBE_PROMPTS = 2
TOLERANCE = {torch.float32: 2e-3, torch.float64: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
COLUMNS = ("agree_abs_mean", "agree_abs_max", "agree_kl", "agree_frac_over", "agree_tokens")


def gap_sums(train_lp: torch.Tensor, sample_lp: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Sums over one rollout's sampled tokens (combined over rollouts by adding, ``abs_max`` by max)."""
    d = train_lp.detach().double() - sample_lp.detach().double().to(train_lp.device)
    return {"n": float(d.numel()), "abs_sum": float(d.abs().sum()), "abs_max": float(d.abs().max()) if d.numel() else 0.0,
            "k3_sum": float((torch.exp(d) - d - 1.0).sum()), "over": float((d.abs() > threshold).sum())}


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    out = {"n": 0.0, "abs_sum": 0.0, "abs_max": 0.0, "k3_sum": 0.0, "over": 0.0}
    for p in parts:
        for k in ("n", "abs_sum", "k3_sum", "over"):
            out[k] += p[k]
        out["abs_max"] = max(out["abs_max"], p["abs_max"])
    return out


def summary(s: dict[str, float]) -> dict[str, float]:
    """The ``agree_*`` metrics of :data:`COLUMNS` (NaN means when no token was compared)."""
    n = s["n"]
    nan = float("nan")
    return {"agree_abs_mean": s["abs_sum"] / n if n else nan, "agree_abs_max": s["abs_max"] if n else nan,
            "agree_kl": s["k3_sum"] / n if n else nan, "agree_frac_over": s["over"] / n if n else nan,
            "agree_tokens": int(n)}


def probe_tolerance(*dtypes) -> float:
    """Tolerance of the probe's mean |delta logp| for the coarsest of the given dtypes (None entries skipped)."""
    return max([TOLERANCE.get(d, TOLERANCE[torch.bfloat16]) for d in dtypes if d is not None] or [TOLERANCE[torch.float32]])


def engine_dtype(engine) -> torch.dtype | None:
    """The dtype the engine computes in: its own model's parameters, or its ``dtype`` attribute (vLLM)."""
    m = getattr(engine, "model", None)
    if m is not None and hasattr(m, "parameters"):
        try:
            return next(m.parameters()).dtype
        except StopIteration:
            return None
    d = getattr(engine, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32,
            "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(str(d)) if d else None


@dataclass
class ProbeResult:
    gap_mean: float
    gap_max: float
    tokens: int
    tol: float

    @property
    def ok(self) -> bool:
        return not (self.gap_mean > self.tol) and math.isfinite(self.gap_mean)

    def to_json(self) -> dict:
        return {"gap_mean": self.gap_mean, "gap_max": self.gap_max, "tokens": self.tokens, "tol": self.tol, "ok": self.ok}


def probe(engine, model, prompts: Sequence[Sequence[int]], *, tokens: int = DEFAULT_PROBE_TOKENS, tol: float | None = None,
          compute_dtype: torch.dtype | None = None, seed: int = 0, token_budget: int = 16384) -> ProbeResult:
    """Sample ``tokens`` tokens per prompt with ``engine`` (T = 1, no truncation) and score them with ``model``
    (the trainer's weights, eval mode, no grad); ``compute_dtype``: the trainer's compute dtype when it is not
    its parameters' (bf16 autocast)."""
    from stages.engine.generation.base import SamplingConfig
    from stages.engine.scoring import Segment, score_segments

    cfg = SamplingConfig(n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=tokens, seed=seed, batch_size=len(prompts))
    outs = [c for c in engine.generate([list(p) for p in prompts], cfg) if c.token_ids]
    if tol is None:
        tol = probe_tolerance(engine_dtype(engine), next(model.parameters()).dtype, compute_dtype)
    if not outs:
        return ProbeResult(0.0, 0.0, 0, tol)
    was = model.training
    model.eval()
    try:
        lps = score_segments(model, [Segment.of(tuple(prompts[c.prompt_index]), tuple(c.token_ids)) for c in outs],
                             temperature=1.0, token_budget=token_budget)
    finally:
        model.train(was)
    s = combine([gap_sums(lp, torch.tensor(c.logprobs)) for lp, c in zip(lps, outs)])
    return ProbeResult(s["abs_sum"] / s["n"], s["abs_max"], int(s["n"]), tol)
