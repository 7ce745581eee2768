"""Optional metric sinks beside the Parquet logs: TensorBoard and Weights & Biases (``pip install 'sgsd[report]'``).

Used by ``sgsd loop`` (one row per loop step, ``loop.tensorboard`` / ``loop.wandb_project``) and ``sgsd train``
(one row per optimizer step, ``--tensorboard`` / ``--wandb-project``).  A sink that is asked for but not installed
says so once and the run goes on: the Parquet tables hold every number anyway.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable


class MetricSinks:
    def __init__(self, tensorboard: bool, wandb_project: str, run_dir: Path, config: dict, log: Callable[[str], None],
                 subdir: str = "tensorboard"):
        self.tb = self.wb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / subdir))
            except ImportError:
                log("tensorboard is not installed (pip install 'sgsd[report]'): metrics go to Parquet only")
        if wandb_project:
            try:
                import wandb

                rid = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
                self.wb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, id=rid, resume="allow")
            except ImportError:
                log("wandb is not installed (pip install 'sgsd[report]'): metrics go to Parquet only")

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wb is not None

    def write(self, row: dict, step: int) -> None:
        nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(nums, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
