"""`sgsd sft`: supervised fine-tuning on any JSONL of prompt/completion pairs.

Each row's ``prompt`` is one user turn put through the model's chat template (assistant header appended,
``thinking`` as configured); ``completion`` is tokenized and closed with the EOS token.  The loss is the
mean negative log-likelihood of the completion tokens only (the prompt is context), computed by the packed
scoring core (:func:`stages.engine.scoring.score_segments`, fp32 log-softmax, varlen attention).

Checkpoint and resume contract of ``sgsd train`` (:mod:`stages.engine.checkpoint`): ``<run_dir>/checkpoint``
after the last step, ``<run_dir>/checkpoints/step_XXXXXX`` every ``save_every`` steps; each holds the
model (the folder is a model folder), optimizer, scheduler, RNG states, metrics so far and the sampler
position, with checksums.  A rerun resumes from the newest valid checkpoint (``resume``: auto,
latest-valid, never or a path) and reproduces an uninterrupted run; a finished run with the same config
and data is skipped.  Output table ``sft.parquet``: one row per optimizer step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from stages.engine import checkpoint as ckpt
from stages.engine import training
from stages.engine.config import Checked, opt, shared_opt, stage_key
from stages.engine.distributed import rng_state, seed_all, set_rng_state
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import read_table


@dataclass
class SFTConfig(Checked):
    model: str = opt("", "Model to fine-tune: HF folder, hub id, .gguf, LoRA adapter or checkpoint folder.", group="Data")
    data: str = opt("", "JSONL or Parquet with string columns prompt (one user turn) and completion (a boolean thinking column, if present, sets each row's chat-template flag).", group="Data")
    gguf_file: str | None = shared_opt("gguf_file", group="Data")
    steps: int = opt(0, "Optimizer steps; 0 = --epochs passes over the data (epochs x rows // batch size).", group="Optimisation", ge=0)
    epochs: int = opt(1, "Passes over the data when --steps is 0.", group="Optimisation", ge=1)
    batch_size: int = opt(64, "Examples per optimizer step.", group="Optimisation", ge=1)
    lr: float = opt(3e-3, "Peak learning rate (AdamW).", group="Optimisation", gt=0)
    warmup_steps: int = opt(50, "Linear warmup steps.", group="Optimisation", ge=0)
    lr_schedule: str = opt("cosine", "cosine (to --min-lr-ratio) or constant.", group="Optimisation", choices=("cosine", "constant"))
    min_lr_ratio: float = opt(0.1, "Cosine floor as a fraction of --lr.", group="Optimisation", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay.", group="Optimisation", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient-norm clip (<= 0: off).", group="Optimisation")
    thinking: bool = opt(False, "Chat template thinking flag of the prompts (match the rollout stage's); a row's own boolean thinking column wins.", group="Data")
    limit: int | None = opt(None, "Use only the first N rows.", group="Data", ge=1)
    token_budget: int = opt(16384, "Tokens per packed forward.", group="Engine", ge=1)
    logit_chunk: int = opt(2048, "Positions per [positions, vocab] log-softmax chunk.", group="Engine", ge=1)
    seed: int = opt(0, "Random seed (data order).", group="Optimisation", ge=0)
    # not part of the stage key
    device: str = shared_opt("device", group="Engine")
    save_every: int = opt(0, "Snapshot checkpoints/step_XXXXXX every N steps (0: only the final checkpoint).", group="Checkpoints", ge=0, key=False)
    keep_last: int = opt(2, "Snapshots kept (0 = all).", group="Checkpoints", ge=0, key=False)
    log_every: int = opt(50, "A log line every N optimizer steps (0: none).", group="Checkpoints", ge=0, key=False)

    def check(self) -> "SFTConfig":
        # ranges and choices: Checked, on every construction
        if not self.model:
            raise InputError(None, "a model is required (--model)")
        if not self.data:
            raise InputError(None, "a data file is required (--data)")
        return self

    def key(self) -> dict:
        return stage_key(self)


def load_pairs(path: str | Path, limit: int | None = None) -> pl.DataFrame:
    df = read_table(Path(path), {"prompt": str, "completion": str})
    if limit:
        df = df.head(limit)
    if df.height == 0:
        raise InputError(path, "no prompt/completion rows")
    bad = df.filter((pl.col("completion").str.len_chars() == 0) | pl.col("prompt").is_null() | pl.col("completion").is_null())
    if bad.height:
        raise InputError(path, f"{bad.height} rows have an empty or null prompt/completion")
    if "thinking" in df.columns:
        if df.schema["thinking"] != pl.Boolean or df["thinking"].null_count():
            raise InputError(path, "column 'thinking' must be true/false on every row (or absent)")
    return df


def encode(tok, df: pl.DataFrame, thinking: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt ids through the chat template, completion ids + EOS) per row; identical prompts encoded once.
    A row's ``thinking`` column (when present) is its chat-template thinking flag, else ``thinking``."""
    from stages.engine.prompts import chat_prompt_ids

    eos = tok.eos_token_id
    cache: dict[tuple[str, bool], tuple[int, ...]] = {}
    out = []
    flags = df["thinking"].to_list() if "thinking" in df.columns else [thinking] * df.height
    for p, c, th in zip(df["prompt"].to_list(), df["completion"].to_list(), flags):
        key = (p, bool(th))
        if key not in cache:
            cache[key] = tuple(chat_prompt_ids(tok, p, key[1]))
        out.append((cache[key], tuple(tok(c, add_special_tokens=False)["input_ids"]) + (eos,)))
    return out


def nll_loss(model, pairs, cfg: SFTConfig) -> tuple[torch.Tensor, int]:
    """Mean NLL over the completion tokens of ``pairs`` (the prompt tokens carry no loss)."""
    from stages.engine.scoring import Segment, score_segments

    segs = [Segment.of(p, c) for p, c in pairs]
    lps = score_segments(model, segs, token_budget=cfg.token_budget, logit_chunk=cfg.logit_chunk, grad=True)
    flat = torch.cat(lps)
    return -flat.mean(), int(flat.numel())


def _save(path: Path, model, tok, opt, sched, state: dict, rows: list[dict], meta: dict,
          progress: ProgressFn | None = None) -> Path:
    from stages.engine.models import save_model

    def fill(tmp: Path) -> None:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / "rank_00000.pt")
        save_model(model, tok, tmp / "model")
        training.lift_model_dir(tmp)
        training.write_checkpoint_files(tmp, optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                                        rows=rows, state=state, meta=meta)

    return ckpt.write(path, fill, progress=progress)


def run(cfg: SFTConfig, run_dir: str | Path, *, resume: str = "auto", force: bool = False,
        progress: ProgressFn | None = None,
        log: Callable[[str], None] | None = None) -> Path:
    """Stage entry point: returns ``<run_dir>/sft.parquet``; the model is ``<run_dir>/checkpoint``."""
    from stages.engine.models import ModelSpec, load_model
    from stages.engine.scoring import varlen_attention

    say = log or (lambda s: None)
    cfg.check()
    run_dir = Path(run_dir)
    df = load_pairs(cfg.data, cfg.limit)  # bad data fails before any model is loaded or file written
    stage = StageRun(run_dir, "sft", cfg, inputs={"data": cfg.data}, force=force, seed=cfg.seed)
    if stage.done:
        say(f"sft: {stage.output} is up to date")
        return stage.output
    if force and resume in ckpt.RESUME_MODES:
        resume = "never"
        import shutil

        for p in ckpt.candidates(run_dir):
            shutil.rmtree(p, ignore_errors=True)
    start = ckpt.find_resume(run_dir, resume, warn=say)
    state = ckpt.validate(start) if start else None
    if state is not None and state.get("config_key") != cfg.key():
        raise ckpt.CheckpointError(start, "the sft config changed since this checkpoint was written; pass --force "
                                          "to start over or --resume never")
    model, tok, spec = load_model(str(start) if start else cfg.model, None if start else cfg.gguf_file,
                                  device=cfg.device, dtype="fp32", trainable=True)
    base_spec = ModelSpec(**json.loads((start / ckpt.META).read_text())["base_model"]) if start else spec
    for p in model.parameters():
        p.requires_grad_(True)
    pairs = encode(tok, df, cfg.thinking)
    n, B = len(pairs), min(cfg.batch_size, len(pairs))
    total = cfg.steps or cfg.epochs * max(1, n // B)
    opt, sched = training.adamw_and_schedule((p for p in model.parameters() if p.requires_grad), lr=cfg.lr,
                                             weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                             schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio, horizon=total)
    sampler = training.Sampler(n, B, cfg.seed)
    done, rows = 0, []
    if start:
        opt.load_state_dict(ckpt.load_state(start / "optimizer.pt"))
        sched.load_state_dict(ckpt.load_state(start / "scheduler.pt"))
        done = int(state["local_step"])
        rows = training.saved_rows(start)
        set_rng_state(ckpt.load_state(start / "rng" / "rank_00000.pt"))
        say(f"sft: resuming from {start} at step {done}/{total}")

    def save(path: Path, step: int) -> Path:
        st = {"policy_step": step, "local_step": step, "run_dir": str(run_dir.resolve()), "config_key": cfg.key(),
              "config": asdict(cfg), "sampler": {"rows": n, "batch_size": B, "seed": cfg.seed, "position": step},
              "world_size": 1, "stage": "sft"}
        meta = {"format": ckpt.FORMAT, "policy_step": step, "objective": "sft", "bank_version": None,
                "base_model": base_spec.to_json(), "adapter": False, "teacher_mode": None, "teacher_init": None,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return _save(path, model, tok, opt, sched, st, rows, meta, progress=progress)

    advance = progress("sft", total) if progress else None
    if advance and done:
        advance(done)
    model.train()
    t_run = time.time()
    for step in range(done, total):
        seed_all(cfg.seed, step, 0)
        t0 = time.time()
        batch = [pairs[i] for i in sampler.batch(step)]
        with varlen_attention(model):
            loss, ntok = nll_loss(model, batch, cfg)
            if not torch.isfinite(loss):
                raise InputError(cfg.data, f"the loss became non-finite at step {step + 1}; lower --lr")
            loss.backward()
        gn = training.clip_grad_norm(list(model.parameters()), cfg.max_grad_norm)
        lr = training.optimizer_step(opt, sched)
        rows.append({"step": step + 1, "loss": float(loss.detach()), "grad_norm": gn, "lr": lr,
                     "tokens": ntok, "wall_s": time.time() - t0})
        if advance:
            advance(1)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            say(f"sft step {step + 1}/{total}: loss {rows[-1]['loss']:.4f} lr {lr:.3g} ({time.time() - t_run:.0f}s)")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save(ckpt.step_dir(run_dir, step + 1), step + 1)
            ckpt.prune(run_dir, cfg.keep_last)
    final = run_dir / ckpt.FINAL
    if not (start is not None and start.resolve() == final.resolve() and done == total):
        save(final, total)
    model.eval()
    stage.finish(pl.DataFrame(rows, schema={"step": pl.Int64, "loss": pl.Float64, "grad_norm": pl.Float64,
                                           "lr": pl.Float64, "tokens": pl.Int64, "wall_s": pl.Float64}),
                 extra={"resolved_config": asdict(cfg), "checkpoint": str(final), "steps": total, "rows_in_data": n,
                        "batch_size": B, "final_loss": rows[-1]["loss"] if rows else None})
    return stage.output
