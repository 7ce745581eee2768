"""`sgsd sft`: options generated from SFTConfig (with --config / --set / --dry-run like every stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import Force, RunDir, console, out, progress_bars
from sgsd_cli.options import stage_command
from stages import sft

Resume = Annotated[str, typer.Option("--resume", help="auto: continue from the newest checkpoint of --run-dir, refusing a corrupt one; latest-valid; never; or a checkpoint folder.", rich_help_panel="Checkpoints")]


@stage_command("sft", sft.SFTConfig, section="sft", shared_loop_keys=())
def sft_cmd(cfg: sft.SFTConfig, run_dir: RunDir, resume: Resume = "auto", force: Force = False) -> None:
    """Supervised fine-tuning on prompt/completion pairs: chat template applied, loss on the completion only; checkpoints and resume as `sgsd train`."""
    cfg.check()
    with progress_bars() as bars:
        path = sft.run(cfg, run_dir, resume=resume, force=force, progress=bars,
                       log=lambda s: console.print(s, highlight=False, markup=False))
    out.print(f"sft: {path}  model: {Path(run_dir) / 'checkpoint'}")
