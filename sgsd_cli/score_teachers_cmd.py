"""`sgsd score-teachers`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, Device, Dtype, Force, GgufFile, RunDir, Seed, app, cli_errors, out, parse_shard, progress_bars
from stages import score_teachers


@app.command("score-teachers", rich_help_panel=PIPELINE)
@cli_errors
def score_teachers_cmd(
    run_dir: RunDir,
    model: Annotated[str, typer.Option("--model", help="The policy (student = teacher weights): HF folder, hub id, .gguf, or adapter folder.")],
    bank: Annotated[str | None, typer.Option("--bank", help="Skill bank JSON (format of shared/data/skill_banks/*.json). Default: the demo bank in data/demo/.")] = None,
    rollouts: Annotated[Path | None, typer.Option("--rollouts", help="Rollout table (default: RUN_DIR/rollout.parquet or RUN_DIR/rollout/).")] = None,
    index: Annotated[str | None, typer.Option("--index", help="Index built by `sgsd build-index` (refused if built from another bank version).")] = None,
    retrieval: Annotated[str, typer.Option("--retrieval", help="lexical | embedding | hybrid | random.")] = "lexical",
    encoder: Annotated[str | None, typer.Option("--encoder", help="Sentence encoder for embedding retrieval without an index.")] = None,
    k: Annotated[int, typer.Option("--k", help="Top-k skills and top-k mistakes; K = min of the two counts teachers.")] = 8,
    weight_temperature: Annotated[float, typer.Option("--weight-temperature", help="Softmax temperature of the teacher weights.")] = 1.0,
    scoring_temperature: Annotated[float, typer.Option("--scoring-temperature", help="Temperature of the scored log-probs (recorded in every row).")] = 1.0,
    token_budget: Annotated[int, typer.Option("--token-budget", help="Tokens per packed micro-batch of the scoring core.")] = 16384,
    logit_chunk: Annotated[int, typer.Option("--logit-chunk", help="Positions per fp32 log-softmax chunk.")] = 2048,
    rollouts_per_batch: Annotated[int, typer.Option("--rollouts-per-batch", help="Rollouts whose student + K teacher sequences are scored together.")] = 16,
    shard: Annotated[str | None, typer.Option("--shard", help="i/n: score every n-th rollout starting at i; writes score_teachers/part-i-of-n.parquet.")] = None,
    seed: Seed = 0,
    gguf_file: GgufFile = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Force = False,
) -> None:
    """Score every rollout under the student prompt and K skill-conditioned teacher prompts."""
    cfg = score_teachers.ScoreTeachersConfig(
        model=model, bank=bank or score_teachers.ScoreTeachersConfig.bank, gguf_file=gguf_file, index=index, retrieval=retrieval, encoder=encoder, k=k,
        weight_temperature=weight_temperature, scoring_temperature=scoring_temperature, token_budget=token_budget,
        logit_chunk=logit_chunk, rollouts_per_batch=rollouts_per_batch, seed=seed, shard=parse_shard(shard),
        device=device, dtype=dtype,
    )
    with progress_bars() as bars:
        path = score_teachers.run(cfg, run_dir, rollouts=rollouts, force=force, progress=bars)
    out.print(f"teacher scores: {path}")
