"""`sgsd rollout`."""

from __future__ import annotations

from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, Device, Dtype, Force, GgufFile, RunDir, Seed, app, cli_errors, out, parse_shard, progress_bars
from stages import rollout


@app.command("rollout", rich_help_panel=PIPELINE)
@cli_errors
def rollout_cmd(
    run_dir: RunDir,
    model: Annotated[str, typer.Option("--model", help="HF model folder, hub id, .gguf file, or LoRA adapter folder.")],
    problems: Annotated[str | None, typer.Option("--problems", help="JSONL/Parquet file with id, problem, answer, or a benchmark name (aime24, aime25, hmmt25, math500, train). Default: the demo set in data/demo/.")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per problem (1 for SGSD/OPSD, 8 for GRPO).")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")] = 1.1,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1.0 = off).")] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k sampling (0 = off).")] = 20,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Maximum completion tokens.")] = 1024,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode of the chat template (the student uses non-thinking mode by default).")] = False,
    seed: Seed = 0,
    backend: Annotated[str, typer.Option("--backend", help="Generation backend: auto (vLLM if installed, else hf-fast on CUDA, else hf), vllm, hf-fast (static-cache engine with slot refill), hf.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (transformers backend).")] = 32,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N problems.")] = None,
    policy_step: Annotated[int, typer.Option("--policy-step", help="Policy step recorded in every row.")] = 0,
    shard: Annotated[str | None, typer.Option("--shard", help="i/n: process every n-th problem starting at i and write rollout/part-i-of-n.parquet.")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Folder holding benchmark files (else $SGSD_DATA_DIR, ../shared/data, hub).")] = None,
    gguf_file: GgufFile = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Force = False,
) -> None:
    """Sample student completions: one row per (problem, sample) with token ids and sampling log-probs."""
    cfg = rollout.RolloutConfig(
        model=model, problems=problems or rollout.RolloutConfig.problems, gguf_file=gguf_file, n=n, temperature=temperature, top_p=top_p,
        top_k=top_k, max_new_tokens=max_new_tokens, thinking=thinking, seed=seed, backend=backend,
        batch_size=batch_size, limit=limit, policy_step=policy_step, shard=parse_shard(shard),
        data_dir=data_dir, device=device, dtype=dtype,
    )
    with progress_bars() as bars:
        path = rollout.run(cfg, run_dir, force=force, progress=bars)
    out.print(f"rollouts: {path}")
