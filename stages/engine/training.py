"""The optimizer loop's shared pieces: `sgsd train` and `sgsd sft` both draw batches, schedule the learning rate,
step AdamW and write checkpoints with these.  docs/DESIGN.md 2.

* :class:`Sampler`: global batches of row indices, a fresh seeded permutation per epoch, partial last batch dropped;
* :func:`lr_lambda`: linear warmup, then constant, cosine or linear decay to ``min_lr_ratio`` at the horizon;
* :func:`adamw_and_schedule`: AdamW and its LambdaLR; :func:`optimizer_step`: clip, step, schedule, zero;
* :func:`write_checkpoint_files`: the non-model files of a checkpoint (optimizer, scheduler, metrics so far, state,
  meta; :mod:`stages.engine.checkpoint` owns the folder, its checksums and the atomic commit);
  :func:`lift_model_dir` makes the checkpoint folder itself a model folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl
import torch

from stages.engine import checkpoint as ckpt
from stages.engine.atomic import atomic_write_json, write_parquet

SCHEDULES = ("constant", "cosine", "linear")


class Sampler:
    """Global batches of row indices: a fresh seeded permutation per epoch, partial last batch dropped."""
    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.B, self.seed = n_rows, batch_size, seed
        self.per_epoch = max(1, n_rows // batch_size)

    def batch(self, b: int) -> list[int]:
        epoch, j = divmod(b, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return [int(x) for x in perm[j * self.B : (j + 1) * self.B]]

    def state(self, position: int) -> dict:
        return {"rows": self.n, "batch_size": self.B, "seed": self.seed, "batches_per_epoch": self.per_epoch,
                "position": position, "epoch": position // self.per_epoch}


def lr_lambda(*, warmup_steps: int, schedule: str, min_lr_ratio: float, horizon: int) -> Callable[[int], float]:
    """LR factor of optimizer step ``step``: linear warmup to 1, then constant, cosine or linear (HF
    get_linear_schedule_with_warmup) decay to ``min_lr_ratio`` at ``horizon``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, horizon - warmup_steps))
        if schedule == "linear":
            return min_lr_ratio + (1 - min_lr_ratio) * (1.0 - progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def adamw_and_schedule(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                       schedule: str = "constant", min_lr_ratio: float = 0.0, horizon: int = 1):
    """AdamW over ``params`` and its LambdaLR (:func:`lr_lambda`)."""
    opt = torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps=warmup_steps, schedule=schedule,
                                                             min_lr_ratio=min_lr_ratio, horizon=horizon))
    return opt, sched


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradient norm (``max_norm <= 0``: measure only); the norm before clipping."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)


def optimizer_step(opt, sched) -> float:
    """AdamW step, schedule step, zero the gradients; the learning rate the step used."""
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr


def lift_model_dir(tmp: Path) -> None:
    """Move ``tmp/model/*`` up into ``tmp``: the checkpoint folder is itself a model folder (``--model CKPT``)."""
    for f in (tmp / "model").iterdir():
        os.replace(f, tmp / f.name)
    (tmp / "model").rmdir()


def write_checkpoint_files(tmp: Path, *, optimizer_state: dict, scheduler_state: dict, rows: list[dict],
                           state: dict, meta: dict) -> None:
    """The optimizer / scheduler states, the metrics rows so far, the resume state and the meta of a checkpoint."""
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    if rows:
        write_parquet(pl.DataFrame(rows), tmp / ckpt.METRICS)
    atomic_write_json(tmp / ckpt.STATE, state)
    atomic_write_json(tmp / ckpt.META, meta)


def saved_rows(start: Path) -> list[dict]:
    """The metrics rows a checkpoint carries (none when it has no metrics file)."""
    return pl.read_parquet(start / ckpt.METRICS).to_dicts() if (start / ckpt.METRICS).exists() else []
