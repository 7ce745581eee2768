"""Generation backends behind one interface: vLLM when installed, transformers otherwise.

A backend takes tokenized prompts and a :class:`SamplingConfig` and returns one :class:`Completion` per
(prompt, sample) with the completion token ids, the *sampling log-prob* of each token and the finish
reason.  The sampling log-prob is ``log_softmax(logits / temperature)`` at the sampled token, before
top-k / top-p truncation (vLLM: ``processed_logits`` plus the normaliser in stages/vllm_backend.py;
transformers: computed in the decode loop below); at temperature 1 it is the model's own log-prob, which the
scoring core reproduces.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F



@dataclass
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 32  # transformers backend: sequences decoded together
    stop_token_ids: list[int] = field(default_factory=list)

    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    text: str


class GenerationBackend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One Completion per (prompt, sample), ordered by prompt then sample."""

    def update_weights(self, model) -> None:  # pragma: no cover - backends that hold their own copy override
        """Load new policy weights (loop: after a training step)."""

    def close(self) -> None:
        pass


def sample_from_logits(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], sampling log-probs [B]) from last-position logits [B, V].

    Log-probs are of ``log_softmax(logits / T)`` before top-k/top-p; sampling uses the truncated
    distribution.  Greedy (T <= 0) takes the argmax and reports the T=1 log-prob.
    """
    logits = logits.float()
    if cfg.greedy():
        logp = F.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    scaled = logits / cfg.temperature
    logp = F.log_softmax(scaled, dim=-1)
    filt = scaled
    if cfg.top_k and cfg.top_k > 0 and cfg.top_k < filt.shape[-1]:
        kth = torch.topk(filt, cfg.top_k, dim=-1).values[..., -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(filt, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        remove = (cum - probs) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = F.softmax(filt, dim=-1)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def cache_argument(model) -> str:
    """Name of the KV-cache argument/output of a model's forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


class HFBackend(GenerationBackend):
    """transformers decode loop: left-padded batches, KV cache, on-device sampling, per-sequence EOS."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.cache_arg = cache_argument(model)

    def update_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def _decode_batch(self, prompts: list[list[int]], cfg: SamplingConfig, gen: torch.Generator | None):
        model = self.model
        device = next(model.parameters()).device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p) :] = torch.tensor(p)
            attn[b, L - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.eos_ids + list(cfg.stop_token_ids), device=device)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = getattr(out, self.cache_arg)
        logits = out.logits[:, -1]
        next_pos = pos[:, -1] + 1
        toks = torch.empty((B, 0), dtype=torch.long, device=device)
        lps = torch.empty((B, 0), dtype=torch.float32, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(cfg.max_new_tokens):
            tok, lp = sample_from_logits(logits, cfg, gen)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            toks = torch.cat([toks, tok[:, None]], 1)
            lps = torch.cat([lps, lp[:, None]], 1)
            is_stop = torch.isin(tok, stop) & ~done
            stopped |= is_stop
            done |= is_stop
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        use_cache=True, **{self.cache_arg: past})
            past = getattr(out, self.cache_arg)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        toks, lps, stopped = toks.cpu(), lps.cpu(), stopped.cpu()
        res = []
        for b in range(B):
            row = toks[b].tolist()
            n = len(row)
            if stopped[b]:
                n = next(i for i, t in enumerate(row) if t in self.eos_ids or t in cfg.stop_token_ids) + 1
            res.append((row[:n], lps[b, :n].tolist(), "stop" if stopped[b] else "length"))
        return res

    def generate(self, prompts, cfg, on_done=None):
        jobs = [(pi, si) for pi in range(len(prompts)) for si in range(cfg.n)]
        gen = None
        device = next(self.model.parameters()).device
        if not cfg.greedy():
            gen = torch.Generator(device=device)
            gen.manual_seed(cfg.seed)
        # sort by prompt length so a batch wastes little padding
        jobs.sort(key=lambda j: -len(prompts[j[0]]))
        results: dict[tuple[int, int], Completion] = {}
        for s in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[s : s + cfg.batch_size]
            outs = self._decode_batch([list(prompts[pi]) for pi, _ in chunk], cfg, gen)
            for (pi, si), (toks, lps, fin) in zip(chunk, outs):
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                results[(pi, si)] = Completion(pi, si, toks, lps, fin, text)
            if on_done:
                on_done(len(chunk))
        return [results[k] for k in sorted(results)]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ("auto", "vllm", "hf-fast", "hf")


def resolve_backend(kind: str, spec=None, *, cuda: bool) -> str:
    """The concrete backend of ``kind``; auto: vLLM when importable and the model is not a GGUF file, else the
    slot-refilling static-cache engine (``hf-fast``) on CUDA, else the plain transformers loop (``hf``)."""
    from stages.io import InputError  # lazy: stages.io imports polars, which the GPU bench machine lacks

    if kind not in BACKENDS:
        raise InputError(None, f"unknown backend '{kind}' (use {', '.join(BACKENDS)})")
    if kind != "auto":
        return kind
    if vllm_available() and spec is not None and not spec.gguf_file:
        return "vllm"
    return "hf-fast" if cuda else "hf"


def make_backend(kind: str, *, model=None, tokenizer=None, spec=None, **vllm_kwargs) -> GenerationBackend:
    """``kind``: auto | vllm | hf-fast | hf (see :func:`resolve_backend`)."""
    from stages.io import InputError

    on_cuda = model is not None and next(model.parameters()).device.type == "cuda"
    kind = resolve_backend(kind, spec, cuda=on_cuda)
    if kind == "vllm":
        if not vllm_available():
            raise InputError(None, "backend 'vllm' requested but vllm is not installed (pip install 'sgsd[vllm]')")
        from stages.vllm_backend import VLLMBackend

        return VLLMBackend(spec, tokenizer=tokenizer, **vllm_kwargs)
    if model is None or tokenizer is None:
        raise ValueError(f"the {kind} backend needs a loaded model and tokenizer")
    if kind == "hf-fast":
        from stages.fast_generation import FastHFBackend

        return FastHFBackend(model, tokenizer)
    return HFBackend(model, tokenizer)
