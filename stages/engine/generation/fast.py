"""Fast transformers generation: slot-based continuous batching over a static per-slot KV cache.

:class:`FastHFBackend` has the :class:`~stages.engine.generation.base.GenerationBackend` contract of ``HFBackend``
(one :class:`Completion` per (prompt, sample), the stored log-prob is ``log_softmax(logits / T)`` at the
sampled token before top-k/top-p truncation, greedy reports the T=1 log-prob) and is built for rollouts:

* **Static KV cache, one row per slot.**  ``[layers, slots, kv_heads, max_len, head_dim]`` tensors
  allocated once.  A decode step feeds one token per slot at that slot's own position, writes its key and
  value at that position (``index_put``) and attends over the first ``Lb`` positions with a per-slot mask,
  where ``Lb`` is the longest live sequence rounded up to ``kv_bucket`` (so short batches do not read the
  whole cache).
* **Continuous batching.**  When a sequence stops (EOS / stop token / its length limit) its slot is handed
  to the next waiting (prompt, sample) at the next host check (every ``sync_every`` steps), so long and
  short rollouts never wait on each other.  Samples of one prompt are prefilled once and the prompt's KV
  rows copied to each of their slots.  Once no prompt waits, live slots are compacted into the lowest
  rows and the step runs on a smaller batch bucket (powers of two), so the tail of a run does not pay
  for idle slots.
* **Graph-friendly decode step.**  The step reads and writes only static buffers (token, position,
  step counter, done flags, output rows), samples on device and never synchronises with the host, so on
  CUDA it is captured once per (batch bucket, ``Lb``) into a CUDA graph and replayed; ``compile=True``
  runs the decoder forward through ``torch.compile`` (Inductor, dynamic shapes, so one compile serves
  every bucket; no Inductor cudagraphs: the capture is ours).  Sampling stays eager aten ops inside the
  captured graph.
* **Batch-invariant, reproducible sampling.**  Sampling is Gumbel-max with noise from a counter-based
  hash of (seed, prompt index, sample index, token position, token id): a sequence's tokens do not depend
  on which slot it lands in or what else runs beside it, and no RNG state lives in the graph.
* **Weights shared in place.**  The engine calls the model's own modules; :meth:`update_weights` copies
  a new policy's weights into the *same* parameter tensors (merging LoRA deltas when the source is a
  PEFT model), so captured graphs and compiled code stay valid across loop steps.

Two ways to run a layer:

``impl="llama"`` (default for Llama / Qwen2 / Qwen3 / Mistral-shaped models): the engine runs the decoder
  layers itself from the model's submodules (norms, projections, rotary embedding, MLP) and calls
  ``scaled_dot_product_attention`` with grouped-query heads packed (``[slots, kv_heads, q_per_kv, d]``
  against the slot cache, no ``repeat_kv`` copy of the cache).  This is independent of the transformers
  version's attention plumbing (5.17 calls ``past_key_values.update(k, v, i)``, 5.24 ``cache.update(k, v,
  i, kwargs=...)``, and both repeat the KV heads whenever a mask is given).
``impl="model"`` (any other decoder whose attention calls ``cache.update``): the engine calls the model's
  decoder body with a duck-typed slot cache object and a ready-made ``{layer_type: additive mask}``
  dict, passed as ``cache=`` or ``past_key_values=`` according to ``inspect.signature(body.forward)``.
  Needs ``eager`` or ``sdpa`` attention.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections import deque
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from stages.engine.generation.base import (Completion, GenerationBackend, SamplingConfig, gumbel_noise,  # noqa: F401 (re-exported)
                                           job_key, sample_tokens)
from stages.engine.scoring import VARLEN_ATTN, split_lm, varlen_attention, varlen_sdpa_attention  # noqa: F401 (re-exported)

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")

# --------------------------------------------------------------------------------------------------
# running the decoder on the slot cache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class SlotKV:
    """The per-slot cache: one ``[slots, kv_heads, max_len, head_dim]`` key and value tensor per layer."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = [torch.zeros(slots, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.slots, self.max_len = slots, max_len

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_ids: torch.Tensor, rows: torch.Tensor):
        """Prompt keys/values [n, h, T, d] of prompt rows ``rows`` into ``slot_ids`` at positions 0..T-1."""
        T = k.shape[2]
        self.k[layer][slot_ids, :, :T] = k[rows]
        self.v[layer][slot_ids, :, :T] = v[rows]

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, ar: torch.Tensor, pos: torch.Tensor):
        """One token's key/value [B, h, 1, d] of slots ``ar`` (0..B-1) at their positions ``pos``."""
        self.k[layer][ar, :, pos] = k[:, :, 0]
        self.v[layer][ar, :, pos] = v[:, :, 0]

    def move(self, src: int, dst: int, length: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class _Runner:
    """prefill(ids, lens, slot_ids, rows) -> last-position logits [n, V];
    decode(tok, pos, Lb) -> logits [B, V] (B = len(tok)), both writing the slot cache."""

    def __init__(self, model):
        self.model = model
        self.body, self.head = split_lm(model)
        cfg = getattr(self.body, "config", None) or model.config
        self.config = cfg
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        self.window = getattr(cfg, "sliding_window", None)
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _windows(self) -> list[int | None]:
        return [self.window if "sliding" in t else None for t in self.layer_types]


class LlamaRunner(_Runner):
    """Runs Llama-family decoder layers itself, from the model's own submodules."""

    def __init__(self, model):
        super().__init__(model)
        body = self.body
        self.embed = body.embed_tokens
        self.layers = list(body.layers)[: self.n_layers]
        self.norm = body.norm
        self.rotary = body.rotary_emb
        attn0 = self.layers[0].self_attn
        self.scaling = getattr(attn0, "scaling", self.head_dim**-0.5)
        self.rep = self.n_heads // self.n_kv
        wins = []
        for layer, t in zip(self.layers, self.layer_types):
            w = getattr(layer.self_attn, "sliding_window", None)
            if w is None and "sliding" in t:
                w = self.window
            wins.append(w)
        self.layer_windows = wins

    @staticmethod
    def supports(model) -> bool:
        try:
            body, _ = split_lm(model)
        except TypeError:
            return False
        cfg = getattr(body, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in LLAMA_LIKE:
            return False
        if any(t not in ("full_attention", "sliding_attention") for t in (getattr(cfg, "layer_types", None) or [])):
            return False
        if getattr(cfg, "model_type", None) == "mistral" and getattr(cfg, "sliding_window", None):
            return False  # Mistral keeps its window on the config, not per layer: leave it to impl="model"
        need = ("embed_tokens", "layers", "norm", "rotary_emb")
        if not all(hasattr(body, n) for n in need):
            return False
        a = body.layers[0].self_attn
        return all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(body.layers[0], n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")
        )

    def _qkv(self, attn, x, cos, sin):
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, self.head_dim)
        k = attn.k_proj(x).view(B, T, -1, self.head_dim)
        v = attn.v_proj(x).view(B, T, -1, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _mlp_block(self, layer, h, a):
        h = h + layer.self_attn.o_proj(a)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def prefill(self, kv: SlotKV, ids, lens, slot_ids, rows):
        n, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(n, T)
        h = self.embed(ids)
        cos, sin = self.rotary(h, pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            kv.write_prefill(i, k, v, slot_ids, rows)
            w = self.layer_windows[i]
            if self.rep > 1:
                k = k.repeat_interleave(self.rep, dim=1)
                v = v.repeat_interleave(self.rep, dim=1)
            if w is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            else:
                d = torch.arange(T, device=ids.device)
                m = causal & ((d[:, None] - d[None, :]) < w)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=self.scaling)
            h = self._mlp_block(layer, h, a.transpose(1, 2).reshape(n, T, -1))
        last = h[torch.arange(n, device=ids.device), lens - 1]
        return self.head(self.norm(last))

    def decode(self, kv: SlotKV, tok, pos, Lb: int, ar):
        B = tok.shape[0]
        h = self.embed(tok[:, None])
        cos, sin = self.rotary(h, pos[:, None])
        kpos = torch.arange(Lb, device=tok.device)
        full = (kpos[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, Lb]
        masks = {None: full}
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            kv.write_decode(i, k, v, ar, pos)
            w = self.layer_windows[i]
            if w not in masks:
                masks[w] = full & (kpos[None, :] > pos[:, None] - w)[:, None, None, :]
            # grouped-query heads packed as query rows: [B, kv_heads, q_per_kv, d] against [B, kv_heads, Lb, d]
            qg = q.reshape(B, self.n_kv, self.rep, self.head_dim)
            a = F.scaled_dot_product_attention(
                qg, kv.k[i][:B, :, :Lb], kv.v[i][:B, :, :Lb], attn_mask=masks[w], scale=self.scaling
            )
            h = self._mlp_block(layer, h, a.reshape(B, 1, -1))
        return self.head(self.norm(h[:, 0]))


class _SlotCache:
    """Duck-typed transformers cache for :class:`ModelRunner`: ``update`` writes into the slot cache and
    returns what the layer attends to.  Accepts both the 5.17 (``update(k, v, i)``) and 5.24
    (``update(k, v, i, kwargs=...)``) call shapes."""

    is_compileable = True
    is_sliding = False

    def __init__(self, kv: SlotKV):
        self.kv = kv
        self.mode = "decode"
        self.args: tuple = ()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.mode == "prefill":
            slot_ids, rows = self.args
            self.kv.write_prefill(layer_idx, key_states, value_states, slot_ids, rows)
            return key_states, value_states
        ar, pos, Lb = self.args
        B = ar.shape[0]
        self.kv.write_decode(layer_idx, key_states, value_states, ar, pos)
        return self.kv.k[layer_idx][:B, :, :Lb], self.kv.v[layer_idx][:B, :, :Lb]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.kv.k)


class ModelRunner(_Runner):
    """Calls the model's decoder body with a :class:`_SlotCache` and ready-made additive masks."""

    def __init__(self, model):
        super().__init__(model)
        impl = getattr(self.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"FastHFBackend(impl='model') needs eager or sdpa attention, the model uses {impl!r}")
        params = inspect.signature(self.body.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.dtype = next(self.body.parameters()).dtype

    def _mask_dict(self, allowed_by_window: Callable[[int | None], torch.Tensor]) -> dict:
        neg = torch.finfo(self.dtype).min
        out = {}
        for t in set(self.layer_types):
            w = self.window if "sliding" in t else None
            allowed = allowed_by_window(w)
            out[t] = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(~allowed, neg)
        return out

    def _call(self, cache, ids, pos, masks):
        return self.body(input_ids=ids, position_ids=pos, attention_mask=masks, use_cache=True, **{self.cache_kw: cache}).last_hidden_state

    def prefill(self, kv, ids, lens, slot_ids, rows):
        n, T = ids.shape
        d = torch.arange(T, device=ids.device)

        def allowed(w):
            m = d[:, None] >= d[None, :]
            if w is not None:
                m = m & ((d[:, None] - d[None, :]) < w)
            return m[None, None]

        cache = _SlotCache(kv)
        cache.mode, cache.args = "prefill", (slot_ids, rows)
        h = self._call(cache, ids, d.expand(n, T), self._mask_dict(allowed))
        return self.head(h[torch.arange(n, device=ids.device), lens - 1])

    def decode(self, kv, tok, pos, Lb, ar):
        kpos = torch.arange(Lb, device=tok.device)

        def allowed(w):
            m = kpos[None, :] <= pos[:, None]
            if w is not None:
                m = m & (kpos[None, :] > pos[:, None] - w)
            return m[:, None, None, :]

        cache = _SlotCache(kv)
        cache.args = (ar, pos, Lb)
        h = self._call(cache, tok[:, None], pos[:, None], self._mask_dict(allowed))
        return self.head(h[:, 0])


# --------------------------------------------------------------------------------------------------
# weights


def _plain_name(name: str) -> str:
    for pre in ("base_model.model.",):
        if name.startswith(pre):
            name = name[len(pre):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state(model) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor of ``model`` as a plain (non-PEFT) model: LoRA deltas of active adapters
    added to their base weights, names without PEFT's wrappers."""
    out: dict[str, torch.Tensor] = {}
    lora_mods = {}
    for mname, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and hasattr(mod, "active_adapters"):
            lora_mods[mname] = mod
    for name, p in model.named_parameters():
        if ".lora_" in name or "modules_to_save" in name and ".original_module." in name:
            continue
        out[_plain_name(name)] = p
    for mname, mod in lora_mods.items():
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            continue
        wname = _plain_name(mname + ".base_layer.weight")
        w = mod.base_layer.weight
        for ad in mod.active_adapters:
            if ad in getattr(mod, "lora_A", {}):
                w = w + mod.get_delta_weight(ad).to(w.dtype)
        out[wname] = w
    return out


class FastHFBackend(GenerationBackend):
    """Continuous-batching transformers decoder over a static slot KV cache (see the module docstring).

    ``max_batch``: slots decoded together.  ``max_len``: positions per slot (prompt + completion); None
    sizes the cache at the first call (and grows it when a later call needs more).  ``compile``:
    ``torch.compile`` the decoder forward of the decode step (default: on for CUDA, off on CPU).  ``cuda_graphs``: capture the
    decode step per (batch bucket, KV bucket) and replay it (default: on for CUDA).  ``sync_every``: decode
    steps between host checks for finished sequences (default 8 on CUDA, 1 on CPU).  ``kv_bucket``: the
    attended cache length is rounded up to a multiple of this.  ``prefill_tokens``: padded prompt tokens
    per prefill forward.  ``impl``: "auto" | "llama" | "model" (see the module docstring).
    """

    name = "hf-fast"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 64,
        max_len: int | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        sync_every: int | None = None,
        kv_bucket: int = 256,
        prefill_tokens: int = 16384,
        impl: str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.max_batch = int(max_batch)
        self.fixed_max_len = max_len
        self.compile = cuda if compile is None else bool(compile)
        self.cuda_graphs = cuda if cuda_graphs is None else (bool(cuda_graphs) and cuda)
        self.sync_every = int(sync_every) if sync_every else (8 if cuda else 1)
        self.kv_bucket = int(kv_bucket)
        self.prefill_tokens = int(prefill_tokens)
        if impl == "auto":
            impl = "llama" if LlamaRunner.supports(model) else "model"
        if impl not in ("llama", "model"):
            raise ValueError(f"unknown impl {impl!r} (auto, llama or model)")
        self.impl = impl
        self.runner: _Runner = LlamaRunner(model) if impl == "llama" else ModelRunner(model)
        gcfg = getattr(model, "generation_config", None)
        eos = gcfg.eos_token_id if gcfg is not None else None
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.vocab = self.runner.head.weight.shape[0]
        self.kv: SlotKV | None = None
        self._graphs: dict = {}
        self._pool = None
        self._step_fn = None
        self.stats: dict = {}
        self.fallbacks: list[str] = []  # compile / CUDA-graph failures this engine recovered from

    # ---------------------------------------------------------------- buffers
    def _allocate(self, max_len: int) -> None:
        # One spare slot row and one spare position that no step ever uses: the slices [:B] and [:Lb] are
        # then never the whole tensor, so torch.compile keeps B and Lb symbolic (no recompile per bucket).
        r, S, dev = self.runner, self.max_batch + 1, self.device
        dtype = next(self.model.parameters()).dtype
        self.close()
        self.kv = SlotKV(r.n_layers, S, r.n_kv, max_len + 1, r.head_dim, dtype, dev)
        z = lambda dt: torch.zeros(S, dtype=dt, device=dev)  # noqa: E731
        self.cur_tok, self.pos, self.gen, self.limit, self.keys = (z(torch.long) for _ in range(5))
        self.done = torch.ones(S, dtype=torch.bool, device=dev)
        self.stopped = z(torch.bool)
        self.out_tok = torch.zeros(S, max_len, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(S, max_len, dtype=torch.float32, device=dev)
        self.stop_mask = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.top_p = torch.ones((), dtype=torch.float32, device=dev)
        self.ar = torch.arange(S, device=dev)
        self.max_len = max_len
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()
        # torch.compile covers the decoder forward (where fusion pays); sampling and bookkeeping stay eager
        # aten ops (sort / topk / cumsum), which the CUDA graph captures all the same.
        decode = self.runner.decode
        if self.compile:
            decode = torch.compile(decode, dynamic=True, fullgraph=False)
        self._decode = decode
        self._step_fn = self._step_impl

    def close(self) -> None:
        self._graphs.clear()
        self.kv = None
        self._pool = None

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Copy ``model``'s weights into this engine's parameter tensors in place (same storage, so
        compiled code and captured graphs stay valid).  ``model`` may be the same object (no-op), a
        copy of the same architecture in another dtype/device, or a PEFT (LoRA) wrap of it."""
        if model is self.model:
            return
        dst = dict(self.model.named_parameters())
        direct = dict(model.named_parameters())
        if set(direct) == set(dst):
            for n, p in dst.items():
                p.copy_(direct[n].detach())
            return
        src = merged_state(model)
        missing = [n for n in dst if _plain_name(n) not in src]
        if missing:
            raise ValueError(f"update_weights: the new model lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, p in dst.items():
            s = src[_plain_name(n)]
            if s.shape != p.shape:
                raise ValueError(f"update_weights: {n} has shape {tuple(s.shape)}, expected {tuple(p.shape)}")
            p.copy_(s.detach())

    # ---------------------------------------------------------------- the decode step
    def _step_impl(self, B: int, Lb: int) -> None:
        """One decode step for slots 0..B-1, all state in static buffers (graph-capturable)."""
        ar = self.ar[:B]
        tok, pos, gen, done = self.cur_tok[:B], self.pos[:B], self.gen[:B], self.done[:B]
        logits = self._decode(self.kv, tok, pos, Lb, ar)
        new, lp = sample_tokens(
            logits, greedy=self._greedy, top_k=self._top_k, use_top_p=self._use_top_p,
            temperature=self.temperature, top_p=self.top_p, keys=self.keys[:B], steps=gen,
        )
        live = ~done
        col = gen.clamp(max=self.max_len - 1)
        self.out_tok[ar, col] = torch.where(live, new, self.out_tok[ar, col])
        self.out_lp[ar, col] = torch.where(live, lp, self.out_lp[ar, col])
        is_stop = self.stop_mask[new] & live
        gen_next = gen + live.long()
        fin = live & (is_stop | (gen_next >= self.limit[:B]))
        self.stopped[:B] = self.stopped[:B] | is_stop
        self.gen[:B] = gen_next
        self.pos[:B] = torch.where(live & ~fin, pos + 1, pos)
        self.cur_tok[:B] = torch.where(live, new, tok)
        self.done[:B] = done | fin

    def _state(self) -> list[torch.Tensor]:
        return [self.cur_tok, self.pos, self.gen, self.done, self.stopped]

    def _run_steps(self, B: int, Lb: int, n: int) -> None:
        if self.cuda_graphs:
            key = (B, Lb, self._greedy, self._top_k, self._use_top_p)
            g = self._graphs.get(key)
            if g is None:
                try:
                    g = self._capture(B, Lb)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # keep generating without graphs rather than lose the run
                    self._fallback("cuda_graphs", e)
            if g is not None:
                self._graphs[key] = g
                for _ in range(n):
                    g.replay()
                return
        for _ in range(n):
            self._guarded_step(B, Lb)

    def _guarded_step(self, B: int, Lb: int) -> None:
        """A step; a torch.compile failure (raised before any kernel runs) falls back to the eager forward."""
        if not self.compile:
            return self._step_fn(B, Lb)
        try:
            return self._step_fn(B, Lb)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            self._fallback("compile", e)
            return self._step_fn(B, Lb)

    def _fallback(self, what: str, err: Exception) -> None:
        msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        warnings.warn(f"FastHFBackend: {what} failed ({msg}); continuing without it", RuntimeWarning, stacklevel=3)
        self.fallbacks.append(f"{what}: {msg}")
        if what == "compile":
            self.compile = False
            self._decode = self.runner.decode
        else:
            self.cuda_graphs = False
            self._graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.synchronize()

    def _capture(self, B: int, Lb: int):
        t0 = time.perf_counter()
        snap = [t.clone() for t in self._state()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compiles (once per shape family) and settles the allocator
                self._guarded_step(B, Lb)
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(self._state(), snap):
            t.copy_(v)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._step_fn(B, Lb)
        torch.cuda.synchronize()
        self.stats["graphs"] = self.stats.get("graphs", 0) + 1
        self.stats["capture_s"] = self.stats.get("capture_s", 0.0) + time.perf_counter() - t0
        return g

    # ---------------------------------------------------------------- prefill / admission
    def _sample_first(self, logits, slot_ids):
        return sample_tokens(
            logits, greedy=self._greedy, top_k=self._top_k, use_top_p=self._use_top_p,
            temperature=self.temperature, top_p=self.top_p, keys=self.keys[slot_ids],
            steps=torch.zeros_like(slot_ids),
        )

    def _admit(self, assign: list[tuple[int, int]], jobs, prompts, max_new: int) -> None:
        """Prefill ``assign`` = [(slot, job index)]: one prompt row per distinct prompt, copied to each slot."""
        dev = self.device
        by_prompt: dict[int, list[int]] = {}
        for slot, j in assign:
            by_prompt.setdefault(jobs[j][0], []).append(slot)
        order = sorted(by_prompt, key=lambda pi: -len(prompts[pi]))
        i = 0
        while i < len(order):
            T = len(prompts[order[i]])
            n = max(1, min(len(order) - i, self.prefill_tokens // max(T, 1)))
            chunk = order[i : i + n]
            i += n
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            lens = torch.tensor([len(prompts[pi]) for pi in chunk])
            for r, pi in enumerate(chunk):
                ids[r, : len(prompts[pi])] = torch.tensor(prompts[pi])
            slot_list = [s for pi in chunk for s in by_prompt[pi]]
            row_list = [r for r, pi in enumerate(chunk) for _ in by_prompt[pi]]
            slot_ids = torch.tensor(slot_list, device=dev)
            rows = torch.tensor(row_list, device=dev)
            logits = self.runner.prefill(self.kv, ids.to(dev), lens.to(dev), slot_ids, rows)
            tok, lp = self._sample_first(logits[rows], slot_ids)
            plen = lens.to(dev)[rows]
            limit = torch.clamp(self.max_len - plen, max=max_new)
            fin = self.stop_mask[tok] | (limit <= 1)
            self.out_tok[slot_ids, 0] = tok
            self.out_lp[slot_ids, 0] = lp
            self.cur_tok[slot_ids] = tok
            self.pos[slot_ids] = plen
            self.gen[slot_ids] = 1
            self.limit[slot_ids] = limit
            self.stopped[slot_ids] = self.stop_mask[tok]
            self.done[slot_ids] = fin
            self.stats["prefill_tokens"] = self.stats.get("prefill_tokens", 0) + int(ids.numel())

    # ---------------------------------------------------------------- generate
    def _bucket(self, n: int) -> int:
        """Batch bucket for n live slots: a power of two >= n (at least 8, so no size-1/size-2
        specialisation), at most max_batch."""
        b = 8
        while b < n:
            b *= 2
        return min(b, self.max_batch)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, on_done=None) -> list[Completion]:
        prompts = [[int(t) for t in p] for p in prompts]
        jobs = [(pi, si) for pi in range(len(prompts)) for si in range(cfg.n)]
        if not jobs:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("FastHFBackend: empty prompt")
        longest = max(len(p) for p in prompts)
        if cfg.max_new_tokens <= 0:
            return [Completion(pi, si, [], [], "length", "") for pi, si in jobs]
        need = longest + cfg.max_new_tokens
        if self.fixed_max_len is not None:
            L = int(self.fixed_max_len)
            if longest >= L:
                raise ValueError(f"FastHFBackend: a prompt of {longest} tokens does not fit max_len={L}")
            if need > L:
                warnings.warn(f"FastHFBackend: prompt + max_new_tokens = {need} > max_len={L}: "
                              "long completions are cut at max_len (finish_reason 'length')", stacklevel=2)
        else:
            L = max(self.kv_bucket, -(-need // self.kv_bucket) * self.kv_bucket)
            if self.kv is not None and self.max_len >= L:
                L = self.max_len
        if self.kv is None or self.max_len != L:
            self._allocate(L)
        t_start = time.perf_counter()
        self.stats = {"prefill_tokens": 0, "steps": 0, "graphs": 0, "capture_s": 0.0}
        self._greedy = cfg.greedy()
        self._top_k = int(cfg.top_k) if cfg.top_k and cfg.top_k > 0 and not self._greedy else 0
        self._use_top_p = (not self._greedy) and cfg.top_p < 1.0
        self.temperature.fill_(cfg.temperature if not self._greedy else 1.0)
        self.top_p.fill_(cfg.top_p)
        self.stop_mask.zero_()
        stops = [t for t in self.eos_ids + [int(x) for x in cfg.stop_token_ids] if 0 <= t < self.vocab]
        if stops:
            self.stop_mask[torch.tensor(stops, device=self.device)] = True
        S = self.max_batch
        self.done.fill_(True)
        self.stopped.zero_()
        self.pos.zero_()
        self.gen.zero_()
        self.cur_tok.fill_(self.pad_id)
        self.keys.zero_()
        queue = deque(range(len(jobs)))
        slot_job = [-1] * S
        slot_plen = [0] * S
        results: dict[tuple[int, int], Completion] = {}
        B = self._bucket(min(S, len(jobs)))
        k = self.sync_every
        gen_host = [0] * S
        while queue or any(j >= 0 for j in slot_job):
            # hand free slots (lowest first, inside the current batch bucket) to waiting jobs
            free = [s for s in range(B) if slot_job[s] < 0]
            if queue and free:
                assign = []
                for s in free[: len(queue)]:
                    j = queue.popleft()
                    pi, si = jobs[j]
                    slot_job[s], slot_plen[s], gen_host[s] = j, len(prompts[pi]), 1
                    assign.append((s, j))
                self.keys[torch.tensor([s for s, _ in assign], device=self.device)] = torch.tensor(
                    [_signed(job_key(cfg.seed, cfg.prompt_key(jobs[j][0]), jobs[j][1])) for _, j in assign], device=self.device)
                self._admit(assign, jobs, prompts, cfg.max_new_tokens)
            elif not queue:
                B = self._compact(B, slot_job, slot_plen, gen_host)
            live_pos = [slot_plen[s] + gen_host[s] - 1 for s in range(B) if slot_job[s] >= 0]
            if live_pos:
                top = max(live_pos) + k
                Lb = min(self.max_len, -(-top // self.kv_bucket) * self.kv_bucket)
                self._run_steps(B, Lb, k)
                self.stats["steps"] += k
            # harvest
            done = self.done[:B].cpu().tolist()
            gens = self.gen[:B].cpu().tolist()
            for s in range(B):
                gen_host[s] = gens[s]
            fin = [s for s in range(B) if slot_job[s] >= 0 and done[s]]
            if fin:
                idx = torch.tensor(fin, device=self.device)
                toks = self.out_tok[idx].cpu()
                lps = self.out_lp[idx].cpu()
                stopped = self.stopped[idx].cpu().tolist()
                for r, s in enumerate(fin):
                    pi, si = jobs[slot_job[s]]
                    n = gens[s]
                    row = toks[r, :n].tolist()
                    text = self.tokenizer.decode(row, skip_special_tokens=True) if self.tokenizer is not None else ""
                    results[(pi, si)] = Completion(pi, si, row, lps[r, :n].tolist(), "stop" if stopped[r] else "length", text)
                    slot_job[s] = -1
                if on_done:
                    on_done(len(fin))
        wall = time.perf_counter() - t_start
        ntok = sum(len(c.token_ids) for c in results.values())
        self.stats.update(wall_s=wall, new_tokens=ntok, tokens_per_s=ntok / wall if wall > 0 else float("nan"))
        return [results[key] for key in sorted(results)]

    def _compact(self, B: int, slot_job: list[int], slot_plen: list[int], gen_host: list[int]) -> int:
        """Move live slots into the lowest rows and shrink the batch bucket when half of it is idle."""
        live = [s for s in range(B) if slot_job[s] >= 0]
        nb = self._bucket(max(1, len(live)))
        if nb >= B:
            return B
        holes = [s for s in range(nb) if slot_job[s] < 0]
        movers = [s for s in live if s >= nb]
        for src, dst in zip(movers, holes):
            length = slot_plen[src] + gen_host[src]
            self.kv.move(src, dst, min(length, self.max_len))
            for t in self._state() + [self.limit, self.keys]:
                t[dst] = t[src]
            self.out_tok[dst] = self.out_tok[src]
            self.out_lp[dst] = self.out_lp[src]
            slot_job[dst], slot_plen[dst], gen_host[dst] = slot_job[src], slot_plen[src], gen_host[src]
            slot_job[src] = -1
            self.done[src] = True
        self.stats["moved_slots"] = self.stats.get("moved_slots", 0) + min(len(movers), len(holes))
        return nb


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x
