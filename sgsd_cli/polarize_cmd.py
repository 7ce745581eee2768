"""`sgsd polarize`: options generated from PolarizeConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import Force, RunDir, out, progress_bars
from sgsd_cli.options import stage_command
from stages import polarize

Rollouts = Annotated[Path | None, typer.Option("--rollouts", help="Rollout table (default: RUN_DIR/rollout.parquet or RUN_DIR/rollout/).", rich_help_panel="Inputs")]
Scores = Annotated[Path | None, typer.Option("--scores", help="Teacher scores (default: RUN_DIR/score_teachers.parquet or RUN_DIR/score_teachers/).", rich_help_panel="Inputs")]


@stage_command("polarize", polarize.PolarizeConfig, section="polarize")
def polarize_cmd(cfg: polarize.PolarizeConfig, run_dir: RunDir, rollouts: Rollouts = None, scores: Scores = None,
                 force: Force = False) -> None:
    """Grade rollouts and compute support, stance, polarity and category per (rollout, teacher)."""
    with progress_bars() as bars:
        path = polarize.run(cfg, run_dir, rollouts=rollouts, scores=scores, force=force, progress=bars)
    out.print(f"polarities: {path}")
