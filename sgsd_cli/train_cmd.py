"""`sgsd train`: options generated from TrainConfig, grouped in help panels by purpose."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from sgsd_cli.common import RunDir, console, out, progress_bars
from sgsd_cli.options import stage_command
from stages import train
from stages.engine.config import deprecated
from stages.engine.errors import InputError

DTYPE_ALIAS = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
Resume = Annotated[str, typer.Option("--resume", help="auto: continue from the newest checkpoint of --run-dir, refusing a corrupt one; latest-valid: fall back to the newest valid one; never; or a checkpoint folder.", rich_help_panel="Checkpoints")]
Force = Annotated[bool, typer.Option("--force", metavar="", help="Retrain even if train.parquet is up to date, discarding this run directory's checkpoints.")]
Dtype = Annotated[str | None, typer.Option("--dtype", hidden=True, help="Deprecated: --precision (auto, fp32 or bf16 weights).")]


@stage_command("train", train.TrainConfig, section="train", shared_loop_keys=("model", "gguf_file", "objective", "seed", "device"))
def train_cmd(make_cfg, run_dir: RunDir, resume: Resume = "auto", dtype: Dtype = None, force: Force = False) -> None:
    """Train the policy on one run directory's tables with the sgsd, opsd or grpo objective."""
    cfg = make_cfg()
    if dtype is not None:  # the former name of --precision (auto / fp32 / bf16); --precision wins
        deprecated("sgsd train --dtype", "--precision")
        if dtype not in DTYPE_ALIAS:
            raise InputError(None, f"--dtype for training must be auto, fp32 or bf16 (got '{dtype}'); see --precision")
        if cfg.precision == "auto":
            cfg = replace(cfg, precision=DTYPE_ALIAS[dtype])
    with progress_bars() as bars:
        path = train.run(cfg, run_dir, resume=resume, force=force, progress=bars,
                         log=lambda s: console.print(s, highlight=False, markup=False))
    out.print(f"train: {path}")
