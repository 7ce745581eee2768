"""`sgsd sft`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, Device, Force, RunDir, Seed, app, cli_errors, console, out, progress_bars
from stages import sft

D = sft.SFTConfig()


@app.command("sft", rich_help_panel=PIPELINE)
@cli_errors
def sft_cmd(
    run_dir: RunDir,
    model: Annotated[str, typer.Option("--model", help="Model to fine-tune: HF folder, hub id, .gguf, LoRA adapter or checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="JSONL or Parquet with string columns prompt (one user turn) and completion.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps; 0 = --epochs passes over the data.")] = D.steps,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data when --steps is 0.")] = D.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per optimizer step.")] = D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = D.lr,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = D.warmup_steps,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="cosine (to --min-lr-ratio) or constant.")] = D.lr_schedule,
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="Cosine floor as a fraction of --lr.")] = D.min_lr_ratio,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = D.weight_decay,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient-norm clip (<= 0: off).")] = D.max_grad_norm,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Chat template thinking flag of the prompts (match the rollout stage's).")] = D.thinking,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N rows.")] = None,
    seed: Seed = D.seed,
    device: Device = D.device,
    save_every: Annotated[int, typer.Option("--save-every", help="Snapshot checkpoints/step_XXXXXX every N steps (0: only the final checkpoint).")] = 0,
    keep_last: Annotated[int, typer.Option("--keep-last", help="Snapshots kept (0 = all).")] = D.keep_last,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the newest checkpoint of --run-dir, refusing a corrupt one; latest-valid; never; or a checkpoint folder.")] = "auto",
    force: Force = False,
) -> None:
    """Supervised fine-tuning on prompt/completion pairs: chat template applied, loss on the completion only; checkpoints and resume as `sgsd train`."""
    cfg = sft.SFTConfig(model=model, data=str(data), steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                        warmup_steps=warmup_steps, lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, thinking=thinking, limit=limit,
                        seed=seed, device=device, save_every=save_every, keep_last=keep_last)
    with progress_bars() as bars:
        path = sft.run(cfg, run_dir, resume=resume, force=force, progress=bars,
                       log=lambda s: console.print(s, highlight=False, markup=False))
    out.print(f"sft: {path}  model: {Path(run_dir) / 'checkpoint'}")
