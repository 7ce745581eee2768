"""torch.distributed plumbing shared by the trainer and the loop: the process group, per-(seed, step, rank)
seeding and the RNG state a checkpoint stores.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from stages.engine.seeds import derive_seed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); one process: Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = group_timeout()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    owns = not tdist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=local, owns_group=owns)


def group_timeout():
    """How long a rank waits at a collective: ``$SGSD_DIST_TIMEOUT_S`` seconds, default 2 h (torch's default is
    10 min for NCCL), because in ``sgsd loop`` the other ranks wait while rank 0 alone evaluates or updates the
    skill bank."""
    from datetime import timedelta

    raw = os.environ.get("SGSD_DIST_TIMEOUT_S", "7200")
    try:
        sec = float(raw)
    except ValueError:
        sec = float("nan")
    if not (sec > 0 and sec < float("inf")):
        from stages.engine.errors import InputError

        raise InputError(None, f"SGSD_DIST_TIMEOUT_S must be a positive number of seconds (got {raw!r})")
    return timedelta(seconds=sec)


def seed_all(seed: int, step: int, rank: int) -> None:
    """Every random draw of an optimizer step (dropout, ...) is a function of (seed, policy step, rank)."""
    s = derive_seed(seed, step, "optimizer", rank)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


def rng_state() -> dict:
    """torch / numpy / python RNG states as tensors and plain values only: the file loads with
    ``torch.load(weights_only=True)`` (no pickle that could run code)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": random.getstate()}  # (version, tuple of ints, gauss or None)
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], np.asarray(npst["keys"].numpy(), dtype=np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)  # a tuple: written before the states were stored as tensors
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
