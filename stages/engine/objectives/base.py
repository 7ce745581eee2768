"""The objective interface and its registry.  docs/DESIGN.md 2 ("Objectives").

An objective is one class in ``stages/engine/objectives/<name>.py`` decorated with :func:`register`; ``sgsd train
--objective NAME`` looks it up with :func:`get`, so a new objective is one new file.  The trainer
(``stages/train.py``) owns the model, optimizer, schedule, distributed wrapping and checkpoints; an objective owns:

* which tables it reads (:meth:`Objective.input_paths`) and how it turns them into one :class:`Item` per rollout
  (:meth:`Objective.load`): the **loss mask** of each rollout is ``Item.mask`` (set here, e.g. ``mask_truncated``),
  and rows it drops are dropped here;
* whether it needs a frozen copy of the weights (:meth:`Objective.needs_frozen_copy`) and any one-off work before
  the first step (:meth:`Objective.prepare`);
* its loss on a micro-batch (:meth:`Objective.loss`), which returns the loss already divided by the batch
  normaliser (:meth:`Objective.normaliser`) and a dict of **sums** (summed over micro-batches and ranks);
* its **metrics**: :meth:`Objective.metrics` turns those sums into the objective's own columns of the
  ``train.parquet`` row (the trainer writes the shared columns: loss, grad norm, lr, tokens, accuracy ...).

The trainer gives :meth:`Objective.loss` a :class:`Forwards`: the student forward (with gradients, through DDP /
FSDP) and the frozen forward (teacher / reference, no grad).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import polars as pl
import torch

from stages.engine.errors import InputError
from stages.engine.health import masked_sum_count
from stages.engine.scoring import Segment
from stages.engine.tables import ROLLOUT


@dataclass
class TeacherTarget:
    """One skill-conditioned teacher of one rollout (sgsd)."""
    prompt_ids: tuple[int, ...]
    logprobs: list[float]
    weight: float
    rho: int
    category: str = "neutral"
    support: float = 0.0
    stance: int = 0


@dataclass
class Item:
    """One rollout as the trainer sees it; ``mask`` is the loss mask over its completion tokens."""
    rid: str
    group: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    mask: list[bool]
    correct: bool | None = None
    teachers: list[TeacherTarget] = field(default_factory=list)  # sgsd
    teacher_prompt_ids: tuple[int, ...] = ()  # opsd
    old_logprobs: list[float] | None = None  # grpo
    sample_logprobs: list[float] | None = None  # grpo: the engine's, for the importance-sampling correction
    advantage: float = 0.0
    reward: float = 0.0

    @property
    def segment(self) -> Segment:
        return Segment.of(self.prompt_ids, self.completion_ids)


@dataclass
class Data:
    """What :meth:`Objective.load` returns: the items (sorted by rollout id), the input tables, facts for the
    manifest (``bank_version`` is recorded in the checkpoint when present) and the log-prob temperature."""
    items: list[Item]
    inputs: dict[str, Path]
    info: dict[str, Any]
    temperature: float = 1.0


class Forwards(Protocol):
    """What an objective may ask of the trainer."""
    data: Data
    mode: str  # none, ddp or fsdp
    dist: Any

    def student(self, kind: str, segs: list[Segment], temperature: float, **kw) -> torch.Tensor: ...
    def frozen(self, kind: str, segs: list[Segment], temperature: float, role: str = "teacher") -> torch.Tensor: ...
    def teacher_head(self): ...
    def scoring_forward(self, segs: list[Segment], temperature: float) -> torch.Tensor: ...
    def log(self, msg: str) -> None: ...


class Objective:
    """Base class: override what differs.  ``cfg`` is the resolved train config (read-only here)."""
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # position in the --objective choices
    default_teacher_mode: ClassVar[str] = "live"
    default_lora_dropout: ClassVar[float] = 0.0

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def input_paths(cls, run_dir: Path) -> dict[str, Path]:
        return {"rollout": ROLLOUT.path(run_dir)}

    def load(self, run_dir: Path, tok) -> Data:
        raise NotImplementedError

    @property
    def iterations(self) -> int:
        """Optimizer steps per batch of rollouts."""
        return 1

    def needs_frozen_copy(self, lora: bool) -> bool:
        """A frozen copy of the initial weights beside the policy (besides the EMA teacher, which always has one)."""
        return False

    def prepare(self, trainer: Forwards, run_dir: Path) -> None:
        """One-off work after loading, before the first step (e.g. GRPO's pi_old log-probs)."""

    def normaliser(self, items: list[Item]) -> float:
        """The batch loss's denominator: masked tokens by default."""
        return float(sum(sum(i.mask) for i in items))

    def loss(self, fw: Forwards, items: list[Item], weights: list[float], norm: float) -> tuple[torch.Tensor, dict]:
        """(loss / norm, sums) of one micro-batch; ``weights[i] = 0`` marks a padding row (no loss, no stats)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The objective's own columns of a train.parquet row, from the step's summed stats."""
        return {}


def base_stats(items: list[Item], weights: list[float]) -> dict:
    """The sums every objective reports (the trainer's shared columns)."""
    real = [it for it, w in zip(items, weights) if w > 0]
    return {"rollouts": len(real), "tokens": sum(len(i.completion_ids) for i in real),
            "mask_tokens": sum(sum(i.mask) for i in real), "correct": sum(1 for i in real if i.correct)}


def entropy_sums(entropy: torch.Tensor | None, mask: torch.Tensor) -> dict:
    """A micro-batch's token-entropy sums over its loss-masked tokens (``mask`` [N], weight-0 rows already 0):
    ``entropy_sum`` / ``entropy_tokens`` give the trainer's ``entropy`` column; nothing when not computed."""
    if entropy is None:
        return {}
    s, n = masked_sum_count(entropy, mask.to(entropy.device) > 0)
    return {"entropy_sum": s, "entropy_tokens": n}


def loss_mask(items: list[Item], weights: list[float], device=None) -> torch.Tensor:
    """The micro-batch's loss mask over its concatenated completion tokens, 0 on weight-0 (padding) rows."""
    return torch.tensor([bool(b) and w > 0 for it, w in zip(items, weights) for b in it.mask], dtype=torch.bool,
                        device=device)


def unique_temperature(df: pl.DataFrame, col: str, path: Path, override: float | None, default: float) -> float:
    """The one log-prob temperature of a table (``override`` wins; several values are refused)."""
    if override is not None:
        return float(override)
    if col not in df.columns:
        return default
    vals = sorted(set(float(v) for v in df[col].drop_nulls().to_list()))
    if len(vals) > 1:
        raise InputError(path, f"rows use several {col} values {vals}; pass --scoring-temperature")
    t = vals[0] if vals else default
    return t if t > 0 else 1.0  # greedy rollouts: log-probs at T = 1


def check_len(path: Path, rid: str, what: str, n: int, want: int) -> None:
    if n != want:
        raise InputError(path, f"rollout '{rid}': {what} has {n} entries but the completion has {want} tokens")


# ---- the registry

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available as ``--objective cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"objective '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once, so each registers its objective."""
    pkg = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
        importlib.import_module(f"{pkg}.{info.name}")


def names() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n)))


def get(name: str) -> type[Objective]:
    _discover()
    if name not in _REGISTRY:
        raise InputError(None, f"objective must be one of {', '.join(names())}, got '{name}'")
    return _REGISTRY[name]

