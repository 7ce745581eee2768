"""Generation backends behind one interface: vLLM when installed, transformers otherwise.

A backend takes tokenized prompts and a :class:`SamplingConfig` and returns one :class:`Completion` per
(prompt, sample) with the completion token ids, the *sampling log-prob* of each token and the finish
reason.  The sampling log-prob is ``log_softmax(logits / temperature)`` at the sampled token, before
top-k / top-p truncation (vLLM: ``processed_logits`` plus the normaliser in stages/engine/generation/vllm.py;
transformers: :func:`sample_tokens`); at temperature 1 it is the model's own log-prob, which the scoring core
reproduces.

Sampling is seeded per (prompt key, sample index), never per batch or per process: ``SamplingConfig.prompt_keys``
gives every prompt a key (the rollout stage derives it from the problem id), so a problem draws the same
completion whatever else is in its batch, which shard of a sharded run it lands in and how many ranks a
``torchrun`` loop has.  The transformers backends use Gumbel-max with a counter-based hash of (seed, key,
sample, position, token) (:func:`gumbel_noise`); vLLM gets a per-request seed from the same key.
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
    # one key per prompt (a 48-bit hash of the problem id in the rollout stage); None: the prompt's index
    prompt_keys: list[int] | None = None

    def greedy(self) -> bool:
        return self.temperature <= 0

    def prompt_key(self, i: int) -> int:
        """The sampling key of prompt ``i`` of a call."""
        return int(self.prompt_keys[i]) if self.prompt_keys is not None else i


def prompt_key_of(problem_id: str) -> int:
    """48-bit sampling key of a problem id (sha256), stable across processes, shards and runs."""
    import hashlib

    return int(hashlib.sha256(str(problem_id).encode()).hexdigest()[:12], 16)


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

    def sleep(self, level: int = 1) -> None:
        """Free generation memory while the policy trains (vLLM sleep mode); a no-op for the others."""

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (before new weights are loaded)."""

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# counter-based noise: murmur3's 32-bit finaliser in int64 arithmetic that never overflows

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32, with every intermediate below 2**49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def job_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """32-bit key of one (prompt, sample) job under ``seed``."""
    h = _fmix32_int(seed ^ 0x5BD1E995)
    h = _fmix32_int(h ^ (prompt_index & _M32))
    h = _fmix32_int(h + 0x68E31DA4 ^ (prompt_index >> 32))
    return _fmix32_int(h ^ (sample_index * 0x27D4EB2F & _M32))


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, K] (fp32) for jobs ``keys`` [B] at token positions ``steps`` [B], vocabulary
    entries ``token_ids`` ([B, K] or [K]); the same (key, step, token) always gets the same value."""
    r = _fmix32((keys + steps * 0x9E3779B1) & _M32)
    r2 = _fmix32(r ^ 0x2545F491)
    h = _fmix32(_fmix32(r[:, None] ^ token_ids) ^ r2[:, None])
    u = (h.double() + 0.5) * (1.0 / 4294967296.0)  # in (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def sample_tokens(
    logits: torch.Tensor,
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], log-probs [B]) from logits [B, V], with the reference
    semantics (log-prob of ``log_softmax(logits / T)`` before truncation; top-k, then top-p on what is
    left) and Gumbel-max sampling with :func:`gumbel_noise` instead of a generator."""
    logits = logits.float()
    if greedy:
        logp = F.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    scaled = logits / temperature
    logp = F.log_softmax(scaled, dim=-1)
    V = scaled.shape[-1]
    if 0 < top_k < V:
        vals, idx = torch.topk(scaled, top_k, dim=-1)
    elif use_top_p:
        vals, idx = torch.sort(scaled, dim=-1, descending=True)
    else:
        vals, idx = scaled, None
    if use_top_p:
        probs = F.softmax(vals, dim=-1)
        remove = (probs.cumsum(-1) - probs) > top_p  # keep the smallest prefix whose mass reaches top_p
        vals = vals.masked_fill(remove, float("-inf"))
    ids = idx if idx is not None else torch.arange(V, device=logits.device)
    choice = (vals + gumbel_noise(keys, steps, ids)).argmax(dim=-1)
    tok = idx.gather(-1, choice[:, None]).squeeze(-1) if idx is not None else choice
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)



def cache_argument(model) -> str:
    """Name of the KV-cache argument/output of a model's forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
