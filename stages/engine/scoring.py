"""The scoring core: log-probs of *given* tokens, packed and chunked.  docs/DESIGN.md 1.4 and 1.7.

Every stage that needs log-probs (score-teachers, train, GRPO's old log-probs, consistency checks) calls
:func:`score_segments`.  It

* packs variable-length sequences into one row per micro-batch (no padding), with position ids that
  restart at 0 for every sequence; transformers then builds a block-diagonal causal mask from the
  position ids (``attention_mask=None``, no cache), so sequences never see each other;
* micro-batches are bounded by a token budget;
* runs the decoder body once, keeps only the hidden states of positions that predict completion tokens,
  and pushes those through the LM head in chunks, computing ``log_softmax`` in fp32 per chunk, so the
  full ``[tokens, vocab]`` fp32 tensor never exists for the whole batch (with gradients, each chunk is
  recomputed in backward instead of being kept).

:func:`score_naive` is the reference: right-padded batch, full logits, fp32 log-softmax over
``[batch, time, vocab]``.  Tests check both agree to 1e-4 and ``bench/score_bench.py`` compares them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Segment:
    """One sequence to score: the log-probs of ``completion_ids`` given ``prompt_ids`` + preceding completion."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    @classmethod
    def of(cls, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> "Segment":
        return cls(tuple(int(x) for x in prompt_ids), tuple(int(x) for x in completion_ids))

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def split_lm(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning hidden states, LM head) of an HF causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    body = getattr(inner, inner.base_model_prefix, None) if hasattr(inner, "base_model_prefix") else None
    if body is None or head is None:
        raise TypeError(f"cannot split {type(inner).__name__} into body and LM head")
    return body, head


def pack_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Greedy first-fit over indices sorted by length (longest first); one over-long sequence goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = lengths[i]
        for b, load in enumerate(loads):
            if load + n <= token_budget:
                batches[b].append(i)
                loads[b] += n
                break
        else:
            batches.append([i])
            loads.append(n)
    return batches


def head_logits_fp32(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in fp32 even under bf16 autocast (training): fp32 weights see fp32 hidden states; bf16
    weights are upcast for the product (a sharded FSDP weight keeps the module call, then the cast)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        w = head.weight
        if w.dtype == torch.float32:
            return head(hidden.float())
        if not hasattr(w, "full_tensor") and getattr(head, "bias", None) is None:
            return F.linear(hidden.float(), w.float())
        return head(hidden.to(w.dtype)).float()


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                    entropy: list | None = None) -> torch.Tensor:
    """Log-probs of ``targets`` from one chunk.  ``entropy``: an empty list receives the chunk's per-position entropy
    ``-sum_v p_v log p_v`` of the same logits (no grad; a metric); a list already filled is left alone, so the
    recomputation of a checkpointed chunk in backward does not compute it twice."""
    logits = head_logits_fp32(head, hidden)
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    if entropy is not None and not entropy:
        entropy.append(token_entropy_from_logp(logp.detach()))
    return torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """``-sum_v exp(l_v) l_v`` over the last dim of log-probs ``l``, one fused dot product per row; rows holding a
    ``-inf`` log-prob (a masked token: ``0 log 0 = 0``) are redone with the explicit rule."""
    ent = -torch.linalg.vecdot(logp.exp(), logp)
    bad = ~torch.isfinite(ent)
    if bool(bad.any()):
        lq = logp[bad]
        p = lq.exp()
        ent[bad] = -torch.where(p > 0, p * lq, torch.zeros_like(lq)).sum(-1)
    return ent


def gather_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk: int = 2048,
    entropy_out: list | None = None,
) -> torch.Tensor:
    """fp32 log-probs of ``targets`` [N] from ``hidden`` [N, H], ``chunk`` rows of [chunk, vocab] at a time.
    ``entropy_out``: a list that receives the ``[N]`` fp32 entropies of the same positions (no grad), computed
    from the same logits chunks (no second LM-head pass)."""
    outs, ents = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        holder: list | None = [] if entropy_out is not None else None
        if needs_grad:
            outs.append(checkpoint(_chunk_logprobs, head, h, t, temperature, holder, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(head, h, t, temperature, holder))
        if holder:
            ents.append(holder[0])
    if entropy_out is not None:
        entropy_out.append(torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class Packed:
    """Several segments laid end to end in one row: no padding, position ids restarting per segment."""

    ids: list[int]    # [T] token ids
    pos: list[int]    # [T] position ids
    sel: list[int]    # [C] row positions whose next-token prediction is a completion token
    tgt: list[int]    # [C] those completion tokens
    spans: list[tuple[int, int]]  # (caller's index, completion length) per segment, in row order


def pack(segments: Sequence[Segment], keys: Sequence[int] | None = None) -> Packed:
    """Pack ``segments`` into one row (``keys``: the caller's index of each segment, default 0..n-1)."""
    ids, pos, sel, tgt, spans = [], [], [], [], []
    offset = 0
    for i, s in zip(keys if keys is not None else range(len(segments)), segments):
        full = s.prompt_ids + s.completion_ids
        p, c = len(s.prompt_ids), len(s.completion_ids)
        if p == 0 and c > 0:
            raise ValueError("a segment needs at least one prompt token")
        ids.extend(full)
        pos.extend(range(len(full)))
        sel.extend(range(offset + p - 1, offset + p - 1 + c))
        tgt.extend(s.completion_ids)
        spans.append((i, c))
        offset += len(full)
    return Packed(ids, pos, sel, tgt, spans)


def score_segments(
    model,
    segments: Sequence[Segment],
    *,
    temperature: float = 1.0,
    token_budget: int = 16384,
    logit_chunk: int = 2048,
    grad: bool = False,
    on_batch: Callable[[int], None] | None = None,
    entropy_out: list | None = None,
) -> list[torch.Tensor]:
    """fp32 log-probs of every segment's completion tokens, in input order (one 1-D tensor each).

    Identical segments are scored once.  ``on_batch(n_segments)`` is called after each micro-batch
    (progress bars).  With ``grad=True`` the returned tensors carry gradients.  ``entropy_out``: a list that
    receives, per segment in input order, the entropy of the full next-token distribution at each completion
    position (fp32, no grad), from the same logits chunks.
    """
    body, head = split_lm(model)
    device = head.weight.device
    uniq: dict[Segment, int] = {}
    for s in segments:
        uniq.setdefault(s, len(uniq))
    useg = list(uniq)
    results: list[torch.Tensor | None] = [None] * len(useg)
    ent_results: list[torch.Tensor | None] = [None] * len(useg)
    # Without gradients, attention runs per packed sequence (no [T, T] block mask; see varlen_attention).
    # With gradients the block-mask path is kept: gradient checkpointing re-runs attention in backward,
    # outside this call (wrap forward *and* backward in `varlen_attention(model)` to use it there).
    ctx = torch.enable_grad() if grad else torch.no_grad()
    attn = contextlib.nullcontext() if grad or _varlen_active(model) else varlen_attention(model)
    with ctx, attn:
        for batch in pack_batches([len(s) for s in useg], token_budget):
            pk = pack([useg[i] for i in batch], batch)
            hidden = body(input_ids=torch.tensor([pk.ids], device=device), position_ids=torch.tensor([pk.pos], device=device),
                          attention_mask=None, use_cache=False).last_hidden_state[0]
            hsel = hidden.index_select(0, torch.tensor(pk.sel, device=device))
            ent: list | None = [] if entropy_out is not None else None
            lp = gather_logprobs(head, hsel, torch.tensor(pk.tgt, device=device), temperature=temperature, chunk=logit_chunk,
                                 entropy_out=ent)
            start = 0
            for i, c in pk.spans:
                results[i] = lp[start : start + c]
                if ent is not None:
                    ent_results[i] = ent[0][start : start + c]
                start += c
            if on_batch:
                on_batch(len(batch))
    if entropy_out is not None:
        entropy_out.extend(ent_results[uniq[s]] for s in segments)
    return [results[uniq[s]] for s in segments]  # type: ignore[misc]


def _varlen_active(model) -> bool:
    body, _ = split_lm(model)
    return getattr(body.config, "_attn_implementation", None) == VARLEN_ATTN


def score_naive(model, segments: Sequence[Segment], *, temperature: float = 1.0, pad_id: int = 0) -> list[torch.Tensor]:
    """Reference: right-padded batch, full [B, T, V] fp32 logits, log_softmax, gather."""
    device = next(model.parameters()).device
    L = max(len(s) for s in segments)
    ids = torch.full((len(segments), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(segments), L), dtype=torch.long)
    for b, s in enumerate(segments):
        full = s.prompt_ids + s.completion_ids
        ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits / temperature, dim=-1)
    out = []
    for b, s in enumerate(segments):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        tgt = torch.tensor(s.completion_ids, device=device)
        out.append(logp[b, p - 1 : p - 1 + c].gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
    return out


# --------------------------------------------------------------------------------------------------
# packed scoring without the [T, T] mask: per-sequence attention inside a packed row

VARLEN_ATTN = "sgsd_varlen_sdpa"
_bounds_cache: dict = {}


def _segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the sequences packed in row 0 of ``position_ids`` (a sequence starts at position 0).
    Computed once per forward (every layer gets the same tensor)."""
    key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids._version)
    hit = _bounds_cache.get(key)
    if hit is not None:
        return hit
    T = position_ids.shape[-1]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = list(zip(starts, starts[1:] + [T]))
    _bounds_cache.clear()
    _bounds_cache[key] = bounds
    return bounds


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: causal SDPA per packed sequence (flash kernel on CUDA, no mask).

    Used only inside :func:`varlen_attention`, for unpadded single-row packed inputs without a cache
    (``score_segments``); anything else goes to transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    if pos is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    # torch.split, not slicing: the backward of a slice allocates and zero-fills a full-size gradient per
    # sequence (quadratic in the number of packed sequences; 48% of a world SFT step), split's is one cat
    sizes = [e - s for s, e in _segment_bounds(pos)]
    outs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout if module.training else 0.0,
                                       scale=scaling)
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


class varlen_attention:
    """Context manager: while active, ``model``'s attention runs per packed sequence instead of over the
    whole packed row with a block-diagonal ``[T, T]`` mask (transformers' SDPA path for packed position
    ids computes every cross-sequence block and materialises the mask).  With ``grad=True`` keep the
    backward pass inside the context too: gradient checkpointing re-runs attention there.

        with varlen_attention(model):
            lps = score_segments(model, segs, grad=True)
            loss(lps).backward()
    """

    def __init__(self, model):
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTN, varlen_sdpa_attention)
        body, _ = split_lm(model)
        self.configs = [c for c in {id(c): c for c in (body.config, getattr(model, "config", None)) if c is not None}.values()]
        self.old: list = []

    def __enter__(self):
        self.old = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = VARLEN_ATTN
        return self

    def __exit__(self, *exc):
        for c, o in zip(self.configs, self.old):
            c._attn_implementation = o
        _bounds_cache.clear()
        return False


def score_segments_varlen(model, segments, *, temperature: float = 1.0, token_budget: int = 16384,
                          logit_chunk: int = 2048, grad: bool = False, on_batch=None):
    """:func:`stages.engine.scoring.score_segments` (same signature and results) with :class:`varlen_attention`.

    For ``grad=True`` the backward pass must also run under ``varlen_attention(model)`` (see there);
    this function refuses ``grad=True`` otherwise."""
    body, _ = split_lm(model)
    active = body.config._attn_implementation == VARLEN_ATTN
    if grad and not active:
        raise ValueError("score_segments_varlen(grad=True): run forward and backward inside `with varlen_attention(model):`")
    kw = dict(temperature=temperature, token_budget=token_budget, logit_chunk=logit_chunk, grad=grad, on_batch=on_batch)
    if active:
        return score_segments(model, segments, **kw)
    with varlen_attention(model):
        return score_segments(model, segments, **kw)
