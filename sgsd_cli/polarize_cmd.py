"""`sgsd polarize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, Force, GgufFile, RunDir, app, cli_errors, out, progress_bars
from stages import polarize


@app.command("polarize", rich_help_panel=PIPELINE)
@cli_errors
def polarize_cmd(
    run_dir: RunDir,
    model: Annotated[str | None, typer.Option("--model", help="Model whose tokenizer defines the token mask (default: the rollout table's model).")] = None,
    rollouts: Annotated[Path | None, typer.Option("--rollouts", help="Rollout table (default: RUN_DIR/rollout.parquet or RUN_DIR/rollout/).")] = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="Teacher scores (default: RUN_DIR/score_teachers.parquet or RUN_DIR/score_teachers/).")] = None,
    verify_timeout: Annotated[float, typer.Option("--verify-timeout", help="Hard timeout per verifier call, seconds (a timeout scores 0 and is counted).")] = 5.0,
    workers: Annotated[int | None, typer.Option("--workers", help="Verifier worker processes (default: CPU count).")] = None,
    clip: Annotated[float, typer.Option("--clip", help="Clip of Delta in the support score.")] = 3.0,
    stance_threshold: Annotated[float, typer.Option("--stance-threshold", help="|a_k| above which a teacher takes a stance.")] = 0.05,
    gguf_file: GgufFile = None,
    force: Force = False,
) -> None:
    """Grade rollouts and compute support, stance, polarity and category per (rollout, teacher)."""
    cfg = polarize.PolarizeConfig(model=model, gguf_file=gguf_file, verify_timeout_s=verify_timeout, workers=workers,
                                  clip=clip, stance_threshold=stance_threshold)
    with progress_bars() as bars:
        path = polarize.run(cfg, run_dir, rollouts=rollouts, scores=scores, force=force, progress=bars)
    out.print(f"polarities: {path}")
