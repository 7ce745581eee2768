"""`sgsd train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, RunDir, app, cli_errors, console, out, progress_bars
from stages import train
from stages.engine.config import build, parse_sets, resolve
from stages.engine.io import InputError

D = train.TrainConfig()  # defaults shown in --help


def _opt(flag: str, text: str, default=None):
    shown = f" (default: {default})" if default not in (None, "") else ""
    return typer.Option(flag, help=text + shown)


@app.command("train", rich_help_panel=PIPELINE)
@cli_errors
def train_cmd(
    run_dir: RunDir,
    config: Annotated[Path | None, typer.Option("--config", help="TOML recipe; its 'train' table gives defaults for every option below.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one option: key=value or train.key=value (TOML literal), repeatable; wins over --config and the options below.")] = None,
    objective: Annotated[str | None, _opt("--objective", "sgsd (gated skill-conditioned self-distillation), opsd (clipped forward KL to a gold-answer teacher) or grpo.", D.objective)] = None,
    model: Annotated[str | None, _opt("--model", "Policy to train: HF folder, hub id, .gguf file, LoRA adapter folder, or a training checkpoint folder (continues its optimizer state and policy step).")] = None,
    gguf_file: Annotated[str | None, _opt("--gguf-file", "GGUF file name inside the --model folder.")] = None,
    steps: Annotated[int | None, _opt("--steps", "Optimizer steps to run in this run directory; 0 = one pass over the table (x --num-iterations).", D.steps)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", "Global batch: rollouts per optimizer step (= micro batch x accumulation x world size; 0 = the whole table).", D.batch_size)] = None,
    micro_batch_size: Annotated[int | None, _opt("--micro-batch-size", "Rollouts per forward pass on each device.", D.micro_batch_size)] = None,
    lr: Annotated[float | None, _opt("--lr", "Peak learning rate (AdamW).", D.lr)] = None,
    lr_schedule: Annotated[str | None, _opt("--lr-schedule", "constant or cosine (both after linear warmup).", D.lr_schedule)] = None,
    warmup_steps: Annotated[int | None, _opt("--warmup-steps", "Linear warmup steps.", D.warmup_steps)] = None,
    schedule_steps: Annotated[int | None, _opt("--schedule-steps", "Cosine horizon in policy steps (0 = --steps).", D.schedule_steps)] = None,
    min_lr_ratio: Annotated[float | None, _opt("--min-lr-ratio", "Cosine floor as a fraction of --lr.", D.min_lr_ratio)] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", "AdamW weight decay.", D.weight_decay)] = None,
    max_grad_norm: Annotated[float | None, _opt("--max-grad-norm", "Gradient-norm clip (<= 0: off).", D.max_grad_norm)] = None,
    precision: Annotated[str | None, _opt("--precision", "auto (bf16-mixed on bf16 GPUs, else fp32), fp32, bf16-mixed (fp32 weights, bf16 compute), bf16 (bf16 weights).", D.precision)] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="As in the other stages: auto, fp32 or bf16 weights (the same as --precision auto / fp32 / bf16).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute decoder layers in backward to save memory.")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--no-lora", help="Train a LoRA adapter (peft) instead of all weights.")] = None,
    lora_r: Annotated[int | None, _opt("--lora-r", "LoRA rank.", D.lora_r)] = None,
    lora_alpha: Annotated[int | None, _opt("--lora-alpha", "LoRA alpha.", D.lora_alpha)] = None,
    lora_dropout: Annotated[float | None, _opt("--lora-dropout", "LoRA dropout.", D.lora_dropout)] = None,
    lora_target: Annotated[str | None, _opt("--lora-target", "LoRA target modules: all-linear or a comma list (q_proj,k_proj,...).", D.lora_target)] = None,
    save_merged: Annotated[bool | None, typer.Option("--save-merged/--no-save-merged", help="With LoRA, also save the adapter merged into the base weights (checkpoint/merged).")] = None,
    teacher_mode: Annotated[str | None, _opt("--teacher-mode", "live (current weights, no grad), fixed (sgsd: stored teacher log-probs; opsd: the initial weights) or ema. Default: live for sgsd, fixed for opsd.")] = None,
    ema_decay: Annotated[float | None, _opt("--ema-decay", "EMA teacher decay per optimizer step.", D.ema_decay)] = None,
    teacher_model: Annotated[str | None, _opt("--teacher-model", "Weights of the fixed teacher / GRPO reference under full fine-tuning (default: the initial weights).")] = None,
    tau: Annotated[float | None, _opt("--tau", "SGSD gate temperature tau.", D.tau)] = None,
    scoring_temperature: Annotated[float | None, _opt("--scoring-temperature", "Temperature of the training log-probs (default: the score-teachers table's for sgsd, the rollout's for grpo, 1 for opsd).")] = None,
    kl_clip: Annotated[float | None, _opt("--kl-clip", "OPSD: clip of each vocabulary term of the forward KL (<= 0: off).", D.kl_clip)] = None,
    kl_top_k: Annotated[int | None, _opt("--kl-top-k", "OPSD: sum over the teacher's top-k tokens only (0 = full vocabulary).", D.kl_top_k)] = None,
    kl_chunk: Annotated[int | None, _opt("--kl-chunk", "OPSD: token positions per [tokens, vocab] chunk.", D.kl_chunk)] = None,
    clip_eps: Annotated[float | None, _opt("--clip-eps", "GRPO: PPO ratio clip epsilon (lower, and upper unless --clip-eps-high).", D.clip_eps)] = None,
    clip_eps_high: Annotated[float | None, _opt("--clip-eps-high", "GRPO: upper ratio clip epsilon.")] = None,
    num_iterations: Annotated[int | None, _opt("--num-iterations", "GRPO: optimizer steps per batch of rollouts.", D.num_iterations)] = None,
    kl_beta: Annotated[float | None, _opt("--kl-beta", "GRPO: weight of the k3 KL to a reference model (0 = no reference).", D.kl_beta)] = None,
    scale_std: Annotated[bool | None, typer.Option("--scale-std/--no-scale-std", help="GRPO: divide advantages by the group std.")] = None,
    loss_agg: Annotated[str | None, _opt("--loss-agg", "GRPO: token-mean or sequence-mean.", D.loss_agg)] = None,
    mask_truncated: Annotated[bool | None, typer.Option("--mask-truncated/--no-mask-truncated", help="GRPO/OPSD: drop completions cut at the token limit from the loss.")] = None,
    token_budget: Annotated[int | None, _opt("--token-budget", "Tokens per packed forward.", D.token_budget)] = None,
    logit_chunk: Annotated[int | None, _opt("--logit-chunk", "Positions per [positions, vocab] log-softmax chunk.", D.logit_chunk)] = None,
    distributed: Annotated[str | None, _opt("--distributed", "Under torchrun: ddp or fsdp (FSDP2 fully_shard); auto = ddp.", D.distributed)] = None,
    seed: Annotated[int | None, _opt("--seed", "Random seed (data order, dropout, LoRA init).", D.seed)] = None,
    device: Annotated[str | None, _opt("--device", "torch device: auto, cpu, cuda ...", D.device)] = None,
    save_every: Annotated[int | None, _opt("--save-every", "Snapshot checkpoints/step_N every N optimizer steps (0: only the final checkpoint/).", D.save_every)] = None,
    keep_last: Annotated[int | None, _opt("--keep-last", "Snapshots kept (0 = all).", D.keep_last)] = None,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the newest checkpoint of --run-dir, refusing a corrupt one; latest-valid: fall back to the newest valid one; never; or a checkpoint folder.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Retrain even if train.parquet is up to date, discarding this run directory's checkpoints.")] = False,
) -> None:
    """Train the policy on one run directory's tables with the sgsd, opsd or grpo objective."""
    loc = locals()
    if dtype is not None and precision is None:
        alias = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
        if dtype not in alias:
            raise InputError(None, f"--dtype for training must be auto, fp32 or bf16 (got '{dtype}'); see --precision")
        loc["precision"] = alias[dtype]
    names = [f for f in train.TrainConfig.__dataclass_fields__ if f != "RUNTIME_FIELDS"]
    cli = {k: loc[k] for k in names if k in loc and loc[k] is not None}
    stray = sorted(set(parse_sets(set_ or [], "train")) - {"train"})
    if stray:
        raise InputError("--set", f"sgsd train takes train.* overrides only (got {', '.join(s + '.*' for s in stray)})")
    sections, source = resolve(config, set_ or [], {"train": cli}, default_section="train")
    # a loop recipe names the model, objective, seed and device in its loop table
    shared = {k: v for k, v in sections.get("loop", {}).items() if k in ("model", "gguf_file", "objective", "seed", "device")}
    cfg = build(train.TrainConfig, {**shared, **sections.get("train", {})}, "train", source)
    with progress_bars() as bars:
        path = train.run(cfg, run_dir, resume=resume, force=force, progress=bars,
                         log=lambda s: console.print(s, highlight=False, markup=False))
    out.print(f"train: {path}")
