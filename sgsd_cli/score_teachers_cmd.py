"""`sgsd score-teachers`: options generated from ScoreTeachersConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import Force, RunDir, out, parse_shard, progress_bars
from sgsd_cli.options import stage_command
from stages import score_teachers

Rollouts = Annotated[Path | None, typer.Option("--rollouts", help="Rollout table (default: RUN_DIR/rollout.parquet or RUN_DIR/rollout/).", rich_help_panel="Inputs")]


@stage_command("score-teachers", score_teachers.ScoreTeachersConfig, section="score_teachers", converters={"shard": parse_shard})
def score_teachers_cmd(cfg: score_teachers.ScoreTeachersConfig, run_dir: RunDir, rollouts: Rollouts = None,
                       force: Force = False) -> None:
    """Score every rollout under the student prompt and K skill-conditioned teacher prompts."""
    with progress_bars() as bars:
        path = score_teachers.run(cfg, run_dir, rollouts=rollouts, force=force, progress=bars)
    out.print(f"teacher scores: {path}")
