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
